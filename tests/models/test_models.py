"""Model zoo: registry, build() preprocessing, weights, parameter counts, one train step."""

import functools
import logging

import keras
import numpy as np
import pytest

from pipeline import models
from pipeline.models import keras_app
from pipeline.models.layers import ImagenetPreprocess

NUM_CLASSES = 10
INPUT_SHAPE = (32, 32, 3)
MEAN = [0.5, 0.45, 0.4]  # [0, 1] scale
STD = [0.25, 0.2, 0.3]

# model.count_params() of build(name, num_classes=10, input_shape=(32, 32, 3)): all
# weights, BatchNorm moving statistics included (Normalization holds no weights).
EXPECTED_PARAMS = {
    "cnn": 289_642,
    "fastnet": 1_973_944,  # + frozen whitening and BN statistics; training/test_fast_recipe.py
    "inception": 1_654_538,  # the compact Inception of Zhang et al. (32px < 75px)
    "keras_app": 4_062_381,  # EfficientNetB0
    "resnet18": 11_191_242,
    "resnet20": 274_042,
    "resnet32": 469_370,
    "resnet34": 21_306_826,
    "resnet44": 664_698,
    "resnet50": 23_608_202,
    "resnet56": 860_026,
    "resnet101": 42_678_666,
    "resnet110": 1_739_002,
    "resnet152": 58_391_434,
}


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@pytest.fixture
def policy():
    """Restores the global dtype policy after the test."""
    before = keras.config.dtype_policy().name
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(before)


def _build(arch="cnn", **kwargs):
    kwargs = {"num_classes": NUM_CLASSES, "input_shape": INPUT_SHAPE, **kwargs}
    if kwargs.get("pretrained") is None:
        kwargs = {"mean": MEAN, "std": STD, **kwargs}
    return models.build(arch, **kwargs)


def _pixels(n=4, shape=INPUT_SHAPE, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, *shape)).astype("float32")


def _trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_registry_lists_every_model():
    assert models.list_models() == sorted(EXPECTED_PARAMS)


# Deeper variants of a family train through the same code as its shallowest member,
# which takes the train step; they are built, counted and run forward only.
DEEPER_VARIANTS = {
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet34",
    "resnet101",
    "resnet152",
}


@pytest.mark.parametrize("arch", models.list_models())
def test_build_and_one_train_step(arch):
    model = _build(arch)
    assert model.count_params() == EXPECTED_PARAMS[arch]
    x = _pixels(n=4)
    if arch not in DEEPER_VARIANTS:
        model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        y = keras.utils.to_categorical(np.arange(4) % NUM_CLASSES, NUM_CLASSES)
        loss = model.train_on_batch(x, y)
        assert np.isfinite(loss)
    logits = model(x, training=False)
    assert tuple(logits.shape) == (4, NUM_CLASSES)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


@pytest.mark.parametrize(
    ("arch", "num_classes", "input_shape", "trainable", "published"),
    [
        ("resnet20", 10, (32, 32, 3), True, 272_474),  # torch_resnet_cifar.py
        ("resnet18", 1000, (224, 224, 3), True, 11_689_512),  # torchvision
        ("resnet34", 1000, (224, 224, 3), True, 21_797_672),  # torchvision
        ("resnet50", 1000, (224, 224, 3), False, 25_636_712),  # keras ResNet50
        ("inception", 1000, (299, 299, 3), False, 23_851_784),  # keras InceptionV3
    ],
)
def test_published_param_counts(arch, num_classes, input_shape, trainable, published):
    # PyTorch counts parameters only (BatchNorm running statistics are buffers);
    # Keras's count_params() includes the moving statistics.
    model = models.get_model(arch)(num_classes, input_shape)
    count = _trainable_count(model) if trainable else model.count_params()
    assert count == published


@pytest.mark.parametrize(
    ("arch", "millions"),
    [("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7)],
)
def test_cifar_resnet_sizes_match_he_et_al(arch, millions):
    count = _trainable_count(models.get_model(arch)(10, (32, 32, 3)))
    assert count == pytest.approx(millions * 1e6, rel=0.03)


def test_mixed_bfloat16_policy_gives_float32_logits(policy):
    policy("mixed_bfloat16")
    model = _build("resnet20")
    assert model.get_layer("resnet20").get_layer("stem_conv").compute_dtype == "bfloat16"
    logits = model(_pixels(n=2), training=False)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


def test_register_model_refuses_duplicates():
    def cnn(num_classes, input_shape):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="'cnn' is already registered"):
        models.register_model(cnn)
    assert models.get_model("cnn") is not cnn


def test_unknown_model_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError, match="'resnet21'") as error:
        models.get_model("resnet21")
    assert "resnet20" in str(error.value)
    assert "inception" in str(error.value)
    with pytest.raises(ValueError, match="'nope'"):
        _build("nope")


def test_keras_app_builds_mobilenetv2():
    model = _build("keras_app", name="MobileNetV2")
    assert model.get_layer("MobileNetV2").preprocess_mode == "tf"
    logits = model(_pixels(n=2), training=False)
    assert tuple(logits.shape) == (2, NUM_CLASSES)


def test_keras_app_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="'MobileNetV9'.*MobileNetV2"):
        _build("keras_app", name="MobileNetV9")


@pytest.mark.parametrize(
    ("application", "mode"),
    [
        ("ResNet50", "caffe"),
        ("VGG16", "caffe"),
        ("ResNet50V2", "tf"),
        ("InceptionV3", "tf"),
        ("InceptionResNetV2", "tf"),
        ("Xception", "tf"),
        ("MobileNet", "tf"),
        ("MobileNetV2", "tf"),
        ("NASNetMobile", "tf"),
        ("DenseNet121", "torch"),
        ("EfficientNetB0", "none"),
        ("EfficientNetV2B0", "none"),
        ("ConvNeXtTiny", "none"),
        ("MobileNetV3Small", "none"),
    ],
)
def test_preprocess_mode_of_applications(application, mode):
    assert keras_app.preprocess_mode(application) == mode


def test_every_application_has_a_preprocess_mode():
    for application in keras_app.application_names():
        assert keras_app.preprocess_mode(application) in ("caffe", "tf", "torch", "none")


@pytest.mark.parametrize(
    ("mode", "module"),
    [("caffe", "resnet"), ("tf", "mobilenet_v2"), ("torch", "densenet")],
)
def test_imagenet_preprocess_equals_keras_preprocess_input(mode, module):
    x = _pixels(n=2, shape=(8, 8, 3))
    expected = getattr(keras.applications, module).preprocess_input(x.copy())
    got = keras.ops.convert_to_numpy(ImagenetPreprocess(mode)(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_imagenet_preprocess_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'bgr'"):
        ImagenetPreprocess("bgr")


@pytest.mark.parametrize(
    ("arch", "kwargs", "application", "mode"),
    [
        ("resnet50", {}, "ResNet50", "caffe"),
        ("keras_app", {"name": "DenseNet121"}, "DenseNet121", "torch"),
        ("inception", {"input_shape": (75, 75, 3)}, "InceptionV3", "tf"),
    ],
)
def test_pretrained_uses_the_weights_preprocessing(monkeypatch, arch, kwargs, application, mode):
    # Nothing may download here: let the application build without its weights.
    original = getattr(keras.applications, application)
    requested = []

    @functools.wraps(original)
    def without_download(*args, weights=None, **options):
        requested.append(weights)
        return original(*args, weights=None, **options)

    monkeypatch.setattr(keras.applications, application, without_download)
    model = _build(arch, pretrained="imagenet", **kwargs)
    assert requested == ["imagenet"]
    assert model.get_layer("imagenet_preprocess").mode == mode
    assert "normalize" not in [layer.name for layer in model.layers]


def test_normalization_maps_the_mean_image_to_zero():
    model = _build("cnn")
    normalized = keras.Model(model.input, model.get_layer("normalize").output)
    mean_image = np.broadcast_to(np.float32(MEAN) * 255, (1, *INPUT_SHAPE))
    np.testing.assert_allclose(normalized(mean_image), 0.0, atol=1e-5)
    one_std_up = np.broadcast_to((np.float32(MEAN) + np.float32(STD)) * 255, (1, *INPUT_SHAPE))
    np.testing.assert_allclose(normalized(one_std_up), 1.0, atol=1e-5)


def test_build_requires_mean_and_std_without_pretrained():
    with pytest.raises(ValueError, match="mean and std"):
        models.build("cnn", num_classes=10, input_shape=INPUT_SHAPE)
    with pytest.raises(ValueError, match="one value per channel"):
        _build("cnn", mean=[0.5], std=[0.25])


@pytest.mark.parametrize("arch", ["cnn", "resnet20", "resnet18", "resnet110"])
def test_pretrained_without_keras_weights_is_refused(arch):
    with pytest.raises(ValueError, match=f"Model '{arch}' has no imagenet weights"):
        _build(arch, pretrained="imagenet")


def test_pretrained_inception_below_75px_says_why():
    with pytest.raises(ValueError, match="InceptionV3.*75x75"):
        _build("inception", pretrained="imagenet")


def test_unknown_pretrained_value_is_refused():
    with pytest.raises(ValueError, match="'cifar10'"):
        _build("resnet50", pretrained="cifar10")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes must be an int >= 1, got 0"),
        ({"input_shape": (32, 32)}, r"input_shape .*got \(32, 32\)"),
        ({"norm": "group"}, "norm must be one of .*'group'"),
        ({"dropout": 1.5}, "dropout must be in .*1.5"),
        ({"width": 0}, "width must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _build("cnn", **kwargs)


def test_cnn_norm_options():
    plain = _build("cnn", norm="none").get_layer("cnn")
    assert not [layer for layer in plain.layers if "BatchNormalization" in type(layer).__name__]
    assert plain.get_layer("stage1_conv1_conv").use_bias
    synced = _build("cnn", norm="sync").get_layer("cnn")
    assert synced.get_layer("stage1_conv1_bn").synchronized


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_weights_fine_tune_to_new_classes(tmp_path, caplog, suffix):
    source = _build("cnn")
    path = tmp_path / f"digits{suffix}"
    if suffix == ".keras":
        source.save(path)
    else:
        source.save_weights(path)
    with caplog.at_level(logging.WARNING, logger="pipeline.models"):
        target = _build("cnn", num_classes=5, weights=str(path))

    for layer in ("stage1_conv1_conv", "stage3_conv2_conv"):
        saved = source.get_layer("cnn").get_layer(layer).kernel
        loaded = target.get_layer("cnn").get_layer(layer).kernel
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded), saved.numpy())
    assert tuple(source.get_layer("cnn").get_layer("logits").kernel.shape) == (128, 10)
    assert tuple(target.get_layer("cnn").get_layer("logits").kernel.shape) == (128, 5)
    assert any(str(path) in r.message and "logits" in r.message for r in caplog.records)


def test_weights_missing_file_names_the_path(tmp_path):
    path = tmp_path / "missing.weights.h5"
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        _build("cnn", weights=str(path))


def test_weights_with_another_suffix_are_refused(tmp_path):
    with pytest.raises(ValueError, match="model.h5"):
        _build("cnn", weights=str(tmp_path / "model.h5"))


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"arch": "cnnn"}, "model=cnnn: Unknown model 'cnnn'"),  # ValueError
        ({"arch": "cnn", "depth": 3}, "model=cnn: .*'depth'"),  # TypeError
        ({"arch": "cnn", "weights": "/no/w.weights.h5"}, "model=cnn: weights file not found"),
    ],
)
def test_build_from_config_names_the_model_and_the_problem(section, match):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=match):
        models.build_from_config(
            section, num_classes=3, input_shape=(16, 16, 3), mean=MEAN, std=STD
        )


def test_build_from_config_extra_arguments_win_over_the_section():
    section = {"arch": "cnn", "width": 4, "weights": "/no/w.weights.h5"}
    model = models.build_from_config(
        section, num_classes=3, input_shape=(16, 16, 3), mean=MEAN, std=STD, weights=None
    )
    assert model.name == "cnn" and model.output_shape == (None, 3)
    assert model.get_layer("cnn").get_layer("stage1_conv1_conv").filters == 4
    assert section == {"arch": "cnn", "width": 4, "weights": "/no/w.weights.h5"}  # not changed


def test_keras_file_round_trip(tmp_path):
    model = _build("resnet20")
    x = _pixels(n=2)
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_imagenet_preprocess_round_trips_in_a_keras_file(tmp_path):
    inputs = keras.Input(shape=(8, 8, 3))
    model = keras.Model(inputs, ImagenetPreprocess("torch")(inputs))
    model.save(tmp_path / "pre.keras")
    reloaded = keras.models.load_model(tmp_path / "pre.keras")
    assert isinstance(reloaded.layers[-1], ImagenetPreprocess)
    assert reloaded.layers[-1].mode == "torch"


def _bn_model(layer_cls, jit_compile=False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 5))
    x = keras.layers.Conv2D(5, 3, padding="same", name="conv")(inputs)
    x = layer_cls(momentum=0.9, epsilon=1e-5, name="bn")(x)
    outputs = keras.layers.Dense(3, name="dense")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fused_batch_norm_trains_like_keras_batch_normalization(jit_compile):
    from pipeline.models.layers import BatchNorm

    x = np.random.default_rng(0).normal(2.0, 3.0, (8, 6, 6, 5)).astype("float32")
    y = np.arange(8) % 3
    runs = []
    for cls in (keras.layers.BatchNormalization, BatchNorm):
        model = _bn_model(cls, jit_compile)
        for _ in range(3):
            model.train_on_batch(x, y)
        runs.append(
            (
                [keras.ops.convert_to_numpy(v) for v in model.variables],
                model.predict(x, verbose=0),
                keras.ops.convert_to_numpy(model(x, training=True)),
            )
        )
    (keras_vars, keras_eval, keras_train), (fused_vars, fused_eval, fused_train) = runs
    assert len(keras_vars) == len(fused_vars) == 8  # same variables: checkpoints interchange
    for a, b in zip(keras_vars, fused_vars, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)  # moving mean and variance included
    np.testing.assert_allclose(keras_eval, fused_eval, atol=1e-5)
    np.testing.assert_allclose(keras_train, fused_train, atol=1e-5)


def test_fused_batch_norm_is_what_the_models_use_and_reloads(tmp_path):
    from pipeline.models.layers import BatchNorm

    model = models.build("resnet20", num_classes=10, input_shape=(32, 32, 3), mean=MEAN, std=STD)
    layers = list(model._flatten_layers(include_self=False))  # nested models too
    norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 21 and all(isinstance(layer, BatchNorm) for layer in norms)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert sum(isinstance(la, BatchNorm) for la in again._flatten_layers(include_self=False)) == 21
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), again.predict(x, verbose=0), atol=1e-5)
    sync = models.build(
        "cnn", num_classes=3, input_shape=(16, 16, 3), norm="sync", mean=MEAN, std=STD
    )
    sync_norms = [la for la in sync._flatten_layers() if isinstance(la, BatchNorm)]
    assert sync_norms and all(layer.synchronized for layer in sync_norms)


def test_import_pipeline_models_is_enough_to_load_a_compiled_model(tmp_path):
    """The README's promise, for a model compiled with our optimizer and schedule."""
    import subprocess
    import sys

    from pipeline.training.optimizers import SGD
    from pipeline.training.schedules import WarmupSchedule

    model = _build("cnn")
    schedule = WarmupSchedule(peak_lr=0.1, total_steps=10, warmup_steps=2, kind="linear")
    model.compile(optimizer=SGD(learning_rate=schedule, offset_lr_multiplier=4.0), loss="mse")
    model.train_on_batch(_pixels(n=2), np.zeros((2, NUM_CLASSES)))
    model.save(tmp_path / "model.keras")
    code = (
        "import keras, pipeline.models\n"
        f"m = keras.saving.load_model({str(tmp_path / 'model.keras')!r})\n"
        "print(type(m.optimizer).__name__, m.optimizer.offset_lr_multiplier)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["SGD", "4.0"]
