"""``backend=jax``: training on the tf.data pipeline, and a benchmark with no TensorFlow."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("jax")


def _run(args, tmp_path, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_jax_backend_trains_one_epoch_of_cnn_on_digits(tmp_path):
    run_dir = tmp_path / "run"
    _run(
        [
            "-m",
            "pipeline.train",
            "backend=jax",
            "trainer.epochs=1",
            "model.width=8",
            "export.formats=[]",
            "trainer.verbose=0",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert metrics["backend"] == "jax"
    assert manifest["plan"]["backend"] == "jax"
    assert metrics["strategy"] == "jax_single"
    assert math.isfinite(metrics["test_accuracy"])
    assert (run_dir / "model.keras").exists()


def test_jax_backend_splits_batches_over_local_devices(tmp_path):
    run_dir = tmp_path / "run"
    _run(
        [
            "-m",
            "pipeline.train",
            "backend=jax",
            "trainer.epochs=1",
            "model.width=4",
            "data.image_size=16",
            "export.formats=[]",
            "trainer.verbose=0",
            "trainer.preflight=false",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},  # two CPU devices
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["strategy"], metrics["num_replicas"]) == ("jax_data_parallel", 2)
    assert math.isfinite(metrics["test_accuracy"])


@pytest.mark.parametrize("tensorflow_installed", [True, False], ids=["tf_present", "tf_absent"])
def test_jax_bench_on_synthetic_data_imports_no_tensorflow(tmp_path, tensorflow_installed):
    """Not even opportunistically where TensorFlow is installed; and it runs where it is not."""
    blocker = tmp_path / "blocked" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("TensorFlow is blocked by the test")\n')
    blocked = [] if tensorflow_installed else [str(blocker.parent)]
    run_dir = tmp_path / "run"
    code = (
        "import runpy, sys\n"
        "sys.argv = ['pipeline.bench', 'backend=jax', 'data=synthetic', 'model.width=4',\n"
        "    'data.image_size=16', 'data.batch_size=8', 'bench.synthetic_images=32',\n"
        "    'bench.warmup_steps=1', 'bench.steps=2', 'bench.windows=2',\n"
        f"    'hydra.run.dir={run_dir}']\n"
        "try:\n"
        "    runpy.run_module('pipeline.bench', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('NO_TENSORFLOW')\n"
    )
    pythonpath = os.pathsep.join(filter(None, [*blocked, os.environ.get("PYTHONPATH")]))
    proc = _run(["-c", code], tmp_path, {"PYTHONPATH": pythonpath})
    assert "NO_TENSORFLOW" in proc.stdout
    result = json.loads((run_dir / "bench.json").read_text())
    assert result["plan"]["backend"] == "jax"
    assert "jit_compile auto -> True (JAX)" in result["plan"]["reasons"]  # devices.plan's answer
    assert set(result["images_per_sec"]) == {"synthetic", "keras_fit"}
    assert all(rate > 0 for rate in result["images_per_sec"].values())


def test_the_config_key_picks_the_backend_over_keras_backend(tmp_path):
    code = (
        "from hydra import compose, initialize_config_dir\n"
        "from pipeline.config import CONF_DIR\n"
        "with initialize_config_dir(config_dir=CONF_DIR, version_base='1.3'):\n"
        "    print(compose('config').backend, compose('config', ['backend=tensorflow']).backend)\n"
    )
    proc = _run(["-c", code], tmp_path, {"KERAS_BACKEND": "jax"})
    assert proc.stdout.split() == ["jax", "tensorflow"]
