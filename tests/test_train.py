"""`train(cfg)` end to end on tiny data, the pre-flight fallback, and the CLI."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, TINY, compose
from pipeline.errors import PipelineError
from pipeline.train import train
from pipeline.training import loop as trainer
from pipeline.training.devices import Plan

METRIC_KEYS = [
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "epochs",
    "train_time_s",
    "wall_time_s",
    "images_per_sec",
    "strategy",
    "num_replicas",
    "precision",
    "jit_compile",
    "fallbacks",
]


@pytest.fixture(scope="module")
def tiny_run(tiny_runs):
    """The shared 2-epoch folder run (these tests only read it) and what train() returned."""
    run = tiny_runs("trainer.epochs=2")
    return run.path, run.metrics, run.folder


def test_run_dir_holds_every_artifact(tiny_run):
    run_dir, metrics, _ = tiny_run
    for name in (
        ".hydra/config.yaml",
        "metrics.json",
        "manifest.json",
        "model.keras",
        "checkpoints/best.weights.h5",
        "checkpoints/last.weights.h5",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert list((run_dir / "tensorboard" / "validation").glob("events.out.tfevents.*"))
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in saved, key
    assert saved["epochs"] == 2 and saved["strategy"] == "default" and saved["num_replicas"] == 1
    assert saved["precision"] == "float32" and saved["jit_compile"] is False  # auto on CPU
    assert saved["images_per_sec"] > 0 and saved["fallbacks"] == []
    assert saved == json.loads(json.dumps(metrics))  # what train() returned


def test_test_accuracy_matches_a_recomputation(tiny_run):
    run_dir, metrics, folder = tiny_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    model = keras.saving.load_model(run_dir / "model.keras")
    names = manifest["data"]["class_names"]
    images, labels = [], []
    from PIL import Image

    from pipeline.data.sources import resize_image

    for rel in manifest["data"]["splits"]["test"]:
        img = np.asarray(Image.open(folder / rel).convert("RGB"))
        images.append(resize_image(img, 16, "crop").numpy())
        labels.append(names.index(rel.split("/")[0]))
    probs = model.predict(np.stack(images).astype("float32"), verbose=0)
    accuracy = float(np.mean(np.argmax(probs, 1) == np.array(labels)))
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_manifest_rebuilds_the_splits(tiny_run):
    run_dir, _, folder = tiny_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    d = manifest["data"]
    assert d["class_names"] == ["cat", "dog", "fox"]
    assert d["image_shape"] == [16, 16, 3] and len(d["mean"]) == 3 and len(d["std"]) == 3
    splits = [set(d["splits"][s]) for s in ("train", "val", "test")]
    everything = {str(p.relative_to(folder)) for p in folder.rglob("*.*")}
    assert set.union(*splits) == everything and sum(map(len, splits)) == len(everything)
    assert d["counts"] == {s: len(d["splits"][s]) for s in ("train", "val", "test")}
    assert d["fingerprint"].startswith("folder-")
    assert manifest["versions"]["tensorflow"].startswith("2.21")
    assert "git_commit" in manifest and manifest["devices"]["gpus"] == []
    doctor = manifest["devices"]["doctor"]
    assert doctor["ok"] is True and doctor["plan"]["precision"]["resolved"] == "float32"
    assert manifest["plan"]["reasons"]


def test_model_takes_raw_pixels_and_normalizes_inside(tiny_run):
    run_dir, _, _ = tiny_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    model = keras.saving.load_model(run_dir / "model.keras")
    mean = np.array(manifest["data"]["mean"]) * 255.0
    normalize = model.get_layer("normalize")
    rescale = model.get_layer("rescale")
    out = normalize(rescale(np.broadcast_to(mean, (1, 16, 16, 3)).astype("float32")))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), 0.0, atol=1e-4)


def _tags(folder) -> set[str]:
    tags = set()
    for event_file in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_tensorboard_has_loss_accuracy_lr_and_speed(tiny_run):
    run_dir, _, _ = tiny_run
    tags = _tags(run_dir / "tensorboard" / "train")
    for tag in (
        "epoch/loss",
        "epoch/accuracy",
        "epoch/lr",
        "epoch/train_images_per_sec",
    ):
        assert tag in tags, (tag, tags)
    assert "images/train_batch_augmented" in tags
    assert {"epoch/loss", "epoch/accuracy"} <= _tags(run_dir / "tensorboard" / "validation")
    final = _tags(run_dir / "tensorboard" / "hparams") - {"_hparams_/session_start_info"}
    assert final == {
        "result/val_accuracy",
        "result/val_loss",
        "result/test_accuracy",
        "result/test_loss",
    }
    everything = set().union(*(_tags(d) for d in (run_dir / "tensorboard").iterdir()))
    assert not [t for t in everything if t.startswith(("evaluation_", "epoch_", "batch_"))]


def test_tfds_dataset_trains_through_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    cfg = compose(["data=cifar10", "trainer.epochs=1", f"data.cache_dir={tmp_path}", *TINY])
    with tfds.testing.mock_data(num_examples=16):
        metrics = train(cfg, run_dir=tmp_path / "run")
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and np.isfinite(metrics["test_loss"])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"]["splits"] == {
        "train": "train[:90%]",
        "val": "train[90%:]",
        "test": "test",
    }


class _NumpyOnly(keras.layers.Layer):
    """A layer XLA cannot compile (a Python function inside)."""

    def call(self, x):
        y = tf.numpy_function(lambda a: a, [x], x.dtype)
        y.set_shape(x.shape)
        return y


class _Float32Only(keras.layers.Layer):
    """A layer that breaks under a mixed policy, as some custom ops do."""

    def compute_output_shape(self, input_shape):  # so building the model never calls `call`
        return input_shape

    def call(self, x):
        if self.compute_dtype != "float32":
            raise TypeError(f"no kernel for {self.compute_dtype}")
        return x


def _tiny_model(layer_cls):
    def build():
        inputs = keras.Input((4,))
        x = layer_cls()(inputs)
        return keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(x))

    return build


def _build(layer_cls, precision, jit):
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, tf.one_hot(np.arange(8) % 3, 3))).batch(4)
    plan = Plan(strategy="default", precision=precision, jit_compile=jit)
    model, attempts = trainer.build_compiled(
        strategy=tf.distribute.get_strategy(),
        plan=plan,
        build_model=_tiny_model(layer_cls),
        build_optimizer=lambda: keras.optimizers.SGD(0.1),
        preflight_data=ds.take(1),
        seed=0,
        compile_kwargs={"label_smoothing": 0.0, "steps_per_execution": 1, "num_classes": 3},
    )
    keras.mixed_precision.set_global_policy("float32")
    return model, attempts, plan


def test_preflight_turns_xla_off_when_it_fails():
    model, attempts, plan = _build(_NumpyOnly, "float32", True)
    assert [a["ok"] for a in attempts] == [False, True]
    assert attempts[0]["jit_compile"] is True and "unsupported operations" in attempts[0]["error"]
    assert plan.jit_compile is False and "jit_compile True -> False" in plan.reasons[-1]
    assert model.optimizer.iterations.numpy() == 0  # the pre-flight step was undone


def test_preflight_falls_back_to_float32_after_xla():
    _, attempts, plan = _build(_Float32Only, "mixed_float16", True)
    tried = [(a["precision"], a["jit_compile"], a["ok"]) for a in attempts]
    assert tried == [
        ("mixed_float16", True, False),
        ("mixed_float16", False, False),
        ("float32", False, True),
    ]
    assert (plan.precision, plan.jit_compile) == ("float32", False)


def test_preflight_step_leaves_weights_untouched():
    def build():
        keras.utils.set_random_seed(0)
        return _tiny_model(keras.layers.Identity)()

    before = build().get_weights()
    model, attempts, _ = _build(keras.layers.Identity, "float32", False)
    assert attempts == [{"precision": "float32", "jit_compile": False, "ok": True, "error": None}]
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def _cli(*args, timeout=300, env=None):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=env,
    )


def test_debug_fast_checks_a_config_in_one_short_epoch_with_a_quiet_terminal(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's
    proc = _cli(*TINY, "debug=fast", f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["limit_batches"] == 2
    model = keras.saving.load_model(run_dir / "model.keras")
    assert int(model.optimizer.iterations.numpy()) == 2  # two training steps in all
    assert not (run_dir / "export").exists() and not (run_dir / "backup").exists()
    # TensorFlow's start-up lines are gone (absl's notice, GPU probing, CPU build facts)
    for noise in ("absl::InitializeLog", "cuInit", "cudart_stub", "oneDNN custom operations"):
        assert noise not in proc.stderr, proc.stderr
    assert "precision / XLA      float32 / off" in proc.stdout  # as the first line spells it
    assert "XLA: off" in proc.stdout and "limited to" in proc.stdout
    assert f"tensorboard --logdir {run_dir}" in proc.stdout
    assert f"python -m pipeline.evaluate run_dir={run_dir}" in proc.stdout


def test_cli_bad_data_path_is_one_clear_line(tmp_path):
    proc = _cli("data=folder", f"data.path={tmp_path}/nope", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    assert f"data.path='{tmp_path}/nope' is not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_refuses_gradient_accumulation_across_replicas(tmp_path):
    proc = _cli(
        "trainer.strategy=mirrored",
        "trainer.logical_cpus=2",
        "optimizer.gradient_accumulation_steps=2",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert proc.returncode == 2
    assert "gradient_accumulation_steps=2 does not work with 2 replicas" in proc.stderr


@pytest.mark.slow
def test_default_config_reaches_99_percent_on_digits(tmp_path):
    """The README's first command: the default cnn on digits, >= 99% test accuracy."""
    metrics = train(compose(["trainer.verbose=0"]), run_dir=tmp_path / "run")
    assert metrics["test_accuracy"] >= 0.99, metrics


def test_train_refuses_a_target_outside_the_allowlist(tmp_path):
    canary = tmp_path / "canary"
    cfg = compose(["optimizer._target_=os.system", f"+optimizer.command='touch {canary}'"])
    with pytest.raises(PipelineError, match=r"optimizer\._target_='os\.system' is not allowed"):
        train(cfg, run_dir=tmp_path / "run")
    assert not canary.exists() and not (tmp_path / "run").exists()


def test_run_records_artifact_hashes(tiny_run):
    run_dir, _, _ = tiny_run
    from pipeline.runs import hashes

    artifacts = json.loads((run_dir / "manifest.json").read_text())["artifacts"]
    assert artifacts["model.keras"] == hashes.sha256_file(run_dir / "model.keras")
    assert "checkpoints/best.weights.h5" in artifacts and "export/saved_model" in artifacts
