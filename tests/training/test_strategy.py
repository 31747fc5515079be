"""MirroredStrategy over 2 logical CPUs matches one device; XLA on it falls back.

Each run is its own process: two tf.distribute strategies in one process can
clash on collective keys.
"""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import pipeline.models  # noqa: F401  (registers our layers and schedule for load_model)
from conftest import REPO, write_image_folder

# 3 classes x 10 images: 1 val + 1 test per class leaves 24 training images,
# three global batches of 8 that split evenly into 4 + 4 across two replicas.
COMMON = [
    "data=folder",
    "data.image_size=16",
    "data.batch_size=8",
    "augment=none",
    "model.width=4",  # the default cnn's BatchNorm: synchronized by trainer.sync_batchnorm=auto
    "model.dropout=0.0",
    "trainer.epochs=2",
    "trainer.verbose=0",
]


def _train(run_dir, *overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", *COMMON, *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategy")
    folder = write_image_folder(root / "images", per_class=10)
    single = _train(root / "single", f"data.path={folder}", "trainer.strategy=default")
    mirrored = _train(
        root / "mirrored",
        f"data.path={folder}",
        "trainer.strategy=mirrored",
        "trainer.logical_cpus=2",
        "trainer.jit_compile=true",  # fails over logical CPUs: the pre-flight must fall back
    )
    return root, single, mirrored


def test_mirrored_uses_two_replicas(runs):
    _, single, mirrored = runs
    assert single["num_replicas"] == 1 and single["strategy"] == "default"
    assert mirrored["num_replicas"] == 2 and mirrored["strategy"] == "mirrored"
    assert (single["sync_batchnorm"], mirrored["sync_batchnorm"]) == (False, True)


def test_a_saved_model_is_not_left_synchronized(runs):
    """Synchronized only while training: model.keras loads anywhere (JAX refuses the flag)."""
    root, _, _ = runs
    model = keras.saving.load_model(root / "mirrored" / "model.keras")
    layers = model._flatten_layers()
    norms = [x for x in layers if isinstance(x, keras.layers.BatchNormalization)]
    assert norms and not any(layer.synchronized for layer in norms)


def test_mirrored_matches_one_device(runs):
    root, single, mirrored = runs
    history = [json.loads((root / r / "history.json").read_text()) for r in ("single", "mirrored")]
    np.testing.assert_allclose(history[0]["loss"], history[1]["loss"], atol=1e-5, rtol=0)
    models = [keras.saving.load_model(root / r / "model.keras") for r in ("single", "mirrored")]
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_xla_over_logical_cpus_falls_back_and_is_recorded(runs):
    root, _, mirrored = runs
    assert mirrored["jit_compile"] is False
    assert [(f["precision"], f["jit_compile"]) for f in mirrored["fallbacks"]] == [
        ("float32", True)
    ]
    manifest = json.loads((root / "mirrored" / "manifest.json").read_text())
    assert any("jit_compile True -> False" in r for r in manifest["plan"]["reasons"])
