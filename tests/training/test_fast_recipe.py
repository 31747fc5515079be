"""The CIFAR-10 speed records' recipe: fastnet, its layers, and each training technique."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import compose, run_test_split, write_image_folder
from pipeline import models
from pipeline.data import augment
from pipeline.data.sources import load_folder
from pipeline.evaluation import tta
from pipeline.models.layers import AlternatingFlip, PartialIdentity, PatchWhitening
from pipeline.train import train
from pipeline.training import callbacks, optimizers
from pipeline.training.schedules import WarmupSchedule

TORCH_PARAMS = 1_972_792  # ../shared/bench/torch_fast_cifar.py, widths 64/256/256
WHITEN_KERNEL = 2 * 2 * 3 * 24  # frozen here; a parameter in PyTorch
BN_SCALES = 2 * (64 + 256 + 256)  # fixed at 1: no variable here, frozen parameters in PyTorch


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def _trainable(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_fastnet_has_the_reference_parameter_count():
    net = models.get_model("fastnet")(10, (32, 32, 3))
    assert _trainable(net) + WHITEN_KERNEL + BN_SCALES == TORCH_PARAMS
    assert not net.get_layer("whiten").kernel.trainable
    bn = net.get_layer("block1_bn1")
    assert (bn.momentum, bn.epsilon, bn.scale, bn.center) == (0.6, 1e-12, False, True)
    assert net.get_layer("head").use_bias is False
    assert net.get_layer("logits").scale == pytest.approx(1 / 9)


def test_fastnet_wider_variant_and_bad_widths():
    wide = models.get_model("fastnet")(10, (32, 32, 3), widths=(128, 384, 384))
    convs = [layer.filters for layer in wide.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs == [128, 128, 384, 384, 384, 384]
    with pytest.raises(ValueError, match=r"widths must be three ints >= 1, got \[64, 256\]"):
        models.get_model("fastnet")(10, (32, 32, 3), widths=(64, 256))
    with pytest.raises(ValueError, match="at least 32x32"):
        models.get_model("fastnet")(10, (16, 16, 3))


def _correlated_images(n=64, size=12, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, size, size, 1))
    smooth = base + np.roll(base, 1, axis=1) + np.roll(base, 1, axis=2)  # neighbours correlate
    mix = np.array([[1.0, 0.8, 0.5]])  # and so do the channels
    return (smooth * mix + 0.3 * rng.normal(size=(n, size, size, 3))).astype("float32")


def test_whitening_filters_decorrelate_the_patches_they_come_from():
    images = _correlated_images()
    layer = PatchWhitening(kernel_size=2, epsilon=0.0)
    layer.adapt(images)
    out = keras.ops.convert_to_numpy(layer(images)).reshape(-1, 24)  # bias is still zero
    half = out[:, :12]
    second_moment = half.T @ half / len(half)
    np.testing.assert_allclose(second_moment, np.eye(12), atol=1e-3)
    np.testing.assert_allclose(out[:, 12:], -half, atol=1e-6)  # each filter and its negative
    patches = np.lib.stride_tricks.sliding_window_view(images, (2, 2), axis=(1, 2))
    raw_moment = np.mean(patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12) ** 2, axis=0)
    assert raw_moment.std() > 0.1  # the input was far from white


def test_whitening_is_set_from_training_images_at_build():
    images = np.random.default_rng(1).uniform(0, 255, (40, 32, 32, 3)).astype("float32")
    kwargs = {"num_classes": 3, "input_shape": (32, 32, 3), "mean": [0.5] * 3, "std": [0.25] * 3}
    model = models.build("fastnet", adapt_images=images, widths=(8, 8, 8), **kwargs)
    whiten = model.get_layer("fastnet").get_layer("whiten")
    expected = PatchWhitening(kernel_size=2)
    expected.adapt((images / 255.0 - 0.5) / 0.25)  # what reaches it: the model's normalization
    np.testing.assert_allclose(whiten.kernel.numpy(), expected.kernel.numpy(), rtol=1e-3, atol=1e-4)


def test_partial_identity_passes_the_first_channels_through():
    kernel = keras.ops.convert_to_numpy(PartialIdentity("he_uniform")((3, 3, 4, 6)))
    for o in range(4):
        expected = np.zeros((3, 3, 4))
        expected[1, 1, o] = 1.0
        np.testing.assert_array_equal(kernel[..., o], expected)
    assert np.abs(kernel[..., 4:]).min() >= 0 and np.abs(kernel[..., 4:]).max() > 0


def test_records_schedule_warms_from_a_fifth_and_ends_at_seven_percent():
    schedule = WarmupSchedule(
        peak_lr=1.5, total_steps=100, warmup_steps=23, kind="linear", warmup_from=0.2, final=0.07
    )
    lr = [float(schedule(s)) for s in (0, 23, 100)]
    assert lr == pytest.approx([0.3, 1.5, 0.105])
    assert float(schedule(11)) == pytest.approx(1.5 * (0.2 + 0.8 * 11 / 23))
    assert float(schedule(61)) == pytest.approx(1.5 * (1 - 0.93 * 38 / 77))
    restored = WarmupSchedule.from_config(schedule.get_config())
    assert float(restored(61)) == pytest.approx(float(schedule(61)))


def test_offset_learning_rate_multiplier_moves_batchnorm_offsets_only():
    bn = keras.layers.BatchNormalization(scale=False)
    dense = keras.layers.Dense(3, use_bias=False)
    bn.build((None, 3))
    dense.build((None, 3))
    variables = [bn.beta, dense.kernel]
    for var in variables:
        var.assign(keras.ops.ones(var.shape))
    opt = optimizers.SGD(learning_rate=0.1, weight_decay=0.5, offset_lr_multiplier=64.0)
    opt.apply([keras.ops.ones(v.shape) for v in variables], variables)
    # decoupled decay 0.5 * 0.1 for both, then the step: 0.1 for the kernel, 6.4 for beta
    np.testing.assert_allclose(dense.kernel.numpy(), 1 - 0.05 - 0.1, rtol=1e-6)
    np.testing.assert_allclose(bn.beta.numpy(), 1 - 0.05 - 6.4, rtol=1e-6)
    assert optimizers.SGD.from_config(opt.get_config()).offset_lr_multiplier == 64.0
    with pytest.raises(ValueError, match="offset_lr_multiplier must be > 0, got 0"):
        optimizers.SGD(offset_lr_multiplier=0)


def _tiny_dense_model():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, name="first")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    return model


def test_lookahead_pulls_weights_to_the_slow_copy_on_its_schedule():
    model = _tiny_dense_model()
    model.optimizer.build(model.trainable_variables)
    look = callbacks.Lookahead(total_steps=10, every=5, base=0.95, power=3)
    look.set_model(model)
    look.on_train_begin()
    slow = [v.numpy().copy() for v, _ in look._pairs]
    assert len(slow) == len(model.trainable_variables) + 2  # + BN moving mean and variance
    for var, _ in look._pairs:
        var.assign(var.numpy() + 1.0)  # the fast weights moved
    model.optimizer.iterations.assign(3)  # not an update step
    look.on_train_batch_end(0)
    np.testing.assert_array_equal(look._pairs[0][0].numpy(), slow[0] + 1.0)
    model.optimizer.iterations.assign(5)
    look.on_train_batch_end(0)
    decay = 0.95**5 * 0.5**3
    for (var, _), before in zip(look._pairs, slow, strict=True):
        np.testing.assert_allclose(var.numpy(), before + (1 - decay) * 1.0, rtol=1e-6)
    middle = [v.numpy().copy() for v, _ in look._pairs]
    for var, _ in look._pairs:
        var.assign(var.numpy() + 2.0)
    model.optimizer.iterations.assign(10)  # the last step: an update, then the slow weights
    look.on_train_batch_end(0)
    for (var, _), before in zip(look._pairs, middle, strict=True):
        np.testing.assert_allclose(var.numpy(), before + (1 - 0.95**5) * 2.0, rtol=1e-5)


def test_freeze_layers_stops_gradient_momentum_and_decay_after_its_epochs():
    model = _tiny_dense_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=0.1), loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(32, 2)).astype("float32")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(
            (model.get_layer("first").kernel.numpy().copy(), model.get_layer("out").kernel.numpy())
        )
    )
    initial = model.get_layer("first").kernel.numpy().copy()
    freeze = callbacks.FreezeLayers({"first": 1})
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[freeze, record])
    assert not np.array_equal(seen[0][0], initial)  # trained in epoch 1
    np.testing.assert_array_equal(seen[1][0], seen[0][0])  # frozen after epoch 1
    np.testing.assert_array_equal(seen[2][0], seen[0][0])
    assert not np.array_equal(seen[2][1], seen[1][1])  # the others still train
    with pytest.raises(ValueError, match=r"names layers \['whiten'\] that model"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callbacks.FreezeLayers({"whiten": 3})])


def _distinct_images(n=12, size=8):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3)).astype("uint8")


def test_alternating_flip_mirrors_each_image_on_exactly_every_other_epoch():
    images = _distinct_images()
    ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(len(images), "int32")))
    pool = augment.fixed_flip(ds, seed=3).shuffle(len(images), seed=0).batch(5)
    model = keras.Sequential([keras.Input((8, 8, 3)), AlternatingFlip()])
    setter = callbacks.AlternatingFlipEpochs()
    setter.set_model(model)
    orientation = np.zeros((4, len(images)), int)  # 0: as stored, 1: mirrored
    for epoch in range(4):
        setter.on_epoch_begin(epoch)
        for batch, _ in pool:
            seen = keras.ops.convert_to_numpy(model(tf.cast(batch, "float32"), training=True))
            for image in seen:
                same = np.flatnonzero((image == images).all(axis=(1, 2, 3)))
                mirrored = np.flatnonzero((image == images[:, :, ::-1]).all(axis=(1, 2, 3)))
                index = same[0] if len(same) else mirrored[0]
                orientation[epoch, index] = 0 if len(same) else 1
    assert (orientation[1:] != orientation[:-1]).all()  # every image, every epoch boundary
    assert 0 < orientation[0].sum() < len(images)  # the fixed coins differ between images
    plain = keras.ops.convert_to_numpy(model(tf.cast(images, "float32"), training=False))
    np.testing.assert_array_equal(plain, images)  # identity at inference


def test_reflect_padding_crops_are_windows_of_the_mirrored_border():
    images = _distinct_images(n=6, size=32).astype("float32")
    crop = augment.crop_flip_fn(32, crop_padding=2, flip=False, pad_mode="reflect")
    out, _ = crop(tf.constant(images), tf.zeros([6]))
    padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")
    for image, source in zip(out.numpy(), padded, strict=True):
        windows = [source[i : i + 32, j : j + 32] for i in range(5) for j in range(5)]
        assert any(np.array_equal(image, w) for w in windows)
    with pytest.raises(ValueError, match="pad_mode must be one of zeros, reflect, got 'wrap'"):
        augment.crop_flip_fn(32, crop_padding=2, flip=False, pad_mode="wrap")


def test_val_fraction_zero_keeps_every_non_test_image_for_training(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=10)
    source = load_folder(
        path=str(folder), image_size=16, seed=0, val_fraction=0, cache_dir=str(tmp_path)
    )
    assert (source.train.count, source.val.count, source.test.count) == (27, 0, 3)
    assert len(list(source.val.images)) == 0


def _tiny_recipe(folder, cache_dir, *overrides: str):
    """The recipe's config on a tiny folder: 8-filter blocks, batches of 8, no export."""
    return compose(
        [
            "experiment=cifar10_94",
            "data=folder",
            f"data.path={folder}",
            "data.batch_size=8",
            "model.widths=[8,8,8]",
            "model.whiten_images=16",
            "trainer.verbose=0",
            "export.formats=[]",
            f"data.cache_dir={cache_dir}",
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    folder = write_image_folder(root / "images", per_class=12, size=32)
    cfg = _tiny_recipe(
        folder,
        root,
        "trainer.epochs=3",
        "trainer.freeze_after={whiten:1}",
        "trainer.test_each_epoch=true",
    )
    run_dir = root / "run"
    assert cfg.trainer.precision == "mixed_bfloat16"  # the recipe's
    # float32 here: the tests compare the run's own test metrics with pipeline.evaluate's,
    # which rebuilds the model in float32; on 3 test images a tiny bfloat16 model's
    # near-tied logits can come out the other way there.
    cfg.trainer.precision = "float32"
    return run_dir, train(cfg, run_dir=run_dir), folder


def test_recipe_trains_without_a_validation_split(recipe_run):
    run_dir, metrics, _ = recipe_run
    assert metrics["tta"] == "flip_translate"
    assert not any(k.startswith("val_") for k in metrics)
    assert (run_dir / "checkpoints" / "last.weights.h5").is_file()
    assert not (run_dir / "checkpoints" / "best.weights.h5").exists()
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["test_accuracy"]) == 3  # the learning curve, one point per epoch
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data"]["counts"] == {"train": 33, "val": 0, "test": 3}


def test_recipe_test_metrics_are_the_tta_ones_of_the_final_model(recipe_run):
    run_dir, metrics, folder = recipe_run
    x, labels = run_test_split(run_dir, folder, 32)
    model = keras.saving.load_model(run_dir / "model.keras")
    logits = tta.with_tta(model, "flip_translate").predict(x, verbose=0)
    plain = model.predict(x, verbose=0)
    assert metrics["test_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert metrics["test_plain_accuracy"] == pytest.approx(np.mean(plain.argmax(1) == labels))
    assert metrics["test_loss"] != pytest.approx(metrics["test_plain_loss"])


def test_recipe_model_reloads_cleanly_with_its_whitening_set(recipe_run):
    run_dir, _, _ = recipe_run
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no optimizer-variable mismatch on load
        model = keras.saving.load_model(run_dir / "model.keras")
    whiten = model.get_layer("fastnet").get_layer("whiten")
    assert np.abs(whiten.bias.numpy()).max() > 0  # it trained in the first epoch
    assert not whiten.kernel.trainable  # the filters never do


def test_evaluate_of_a_run_without_validation_uses_its_final_model(recipe_run, tmp_path):
    from pipeline.evaluate import evaluate

    run_dir, metrics, _ = recipe_run
    report = evaluate(run_dir, tta="flip_translate", out_dir=tmp_path)  # checkpoint=best asked
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_the_recipe_trains_in_bfloat16(tmp_path):
    """The recipe's precision end to end: bfloat16 compute, float32 weights and logits."""
    folder = write_image_folder(tmp_path / "images", per_class=6, size=32)
    cfg = _tiny_recipe(folder, tmp_path, "trainer.epochs=1", "logger=[]")
    try:
        metrics = train(cfg, run_dir=tmp_path / "run")
    finally:
        keras.mixed_precision.set_global_policy("float32")  # as the other tests expect
    assert metrics["precision"] == "mixed_bfloat16" and np.isfinite(metrics["test_loss"])
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    (logits,) = [x for x in layers if x.name == "logits"]
    assert logits.dtype_policy.name == "float32"
    convs = [x for x in layers if isinstance(x, keras.layers.Conv2D)]
    assert convs and {c.dtype_policy.name for c in convs} == {"mixed_bfloat16"}
    assert {w.dtype for c in convs for w in c.weights} == {"float32"}
