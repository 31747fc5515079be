"""Export of a tiny trained run: SavedModel serving raw images, .keras, LiteRT, parity."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import REPO
from pipeline import exporting as export
from pipeline.data.sources import resize_image
from pipeline.errors import PipelineError
from pipeline.runs.reader import load_run

# Runs in a fresh interpreter: TensorFlow and NumPy only, no `pipeline`.
SERVE_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
serve = loaded.signatures["serving_default"]
rng = np.random.default_rng(1)
out = {"modules": sorted(m for m in sys.modules if m.split(".")[0] == "pipeline")}
for h, w in ((16, 16), (23, 31), (40, 12)):
    images = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    result = serve(images=tf.constant(images))
    out[f"{h}x{w}"] = {
        "images": images.tolist(),
        "probabilities": result["probabilities"].numpy().tolist(),
        "dtype": result["probabilities"].dtype.name,
        "classes": [c.decode() for c in result["classes"].numpy()],
    }
out["attributes"] = [
    [c.decode() for c in loaded.class_names.numpy()],
    int(loaded.image_size.numpy()),
    loaded.resize.numpy().decode(),
]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny_run(own_tiny_run):
    """The CLI exports into the run's export/: a copy of the shared one."""
    return own_tiny_run.path


@pytest.fixture(scope="module")
def exported(tiny_run):
    """The CLI exports SavedModel and .keras; returns its output."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.export",
            f"run_dir={tiny_run}",
            "format=[saved_model,keras]",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _probabilities(model, images: np.ndarray, mode: str = "crop") -> np.ndarray:
    resized = np.stack([resize_image(image, 16, mode).numpy() for image in images])
    return keras.ops.convert_to_numpy(keras.ops.softmax(model(resized.astype("float32"))))


def test_parity_report_and_class_names_travel(tiny_run, exported):
    out = tiny_run / "export"
    parity = json.loads((out / "parity.json").read_text())
    assert parity["tolerance"] == 1e-4 and parity["checkpoint"] == "final"
    assert set(parity["formats"]) == {"saved_model", "keras"}
    for fmt, result in parity["formats"].items():
        assert 0.0 <= result["max_abs_diff"] <= 1e-4, fmt
        assert (out / result["path"]).exists()
        assert f"{fmt:<12} {out / result['path']}  max |diff|" in exported
    info = json.loads((out / "class_names.json").read_text())
    assert info == {"class_names": ["cat", "dog", "fox"], "image_size": 16, "resize": "crop"}
    assert (out / "saved_model" / "assets" / "class_names.txt").read_text() == "cat\ndog\nfox\n"


def test_saved_model_serves_raw_uint8_in_a_fresh_process(tiny_run, exported):
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, str(tiny_run / "export" / "saved_model")],
        capture_output=True,
        text=True,
        cwd=tiny_run,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    served = json.loads(proc.stdout.splitlines()[-1])
    assert served.pop("modules") == []
    assert served.pop("attributes") == [["cat", "dog", "fox"], 16, "crop"]
    model = keras.saving.load_model(tiny_run / "model.keras")
    for size, result in served.items():
        assert result["classes"] == ["cat", "dog", "fox"] and result["dtype"] == "float32", size
        expected = _probabilities(model, np.array(result["images"], np.uint8))
        np.testing.assert_allclose(result["probabilities"], expected, atol=1e-4, err_msg=size)
        np.testing.assert_allclose(np.sum(result["probabilities"], 1), 1.0, atol=1e-5)


def test_exported_keras_model_matches_the_run(tiny_run, exported):
    model = keras.saving.load_model(tiny_run / "model.keras")
    copy = keras.saving.load_model(tiny_run / "export" / "model.keras")
    images = np.random.default_rng(2).integers(0, 256, (4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(copy(images), model(images), atol=1e-5)


def test_model_is_rebuilt_in_float32_under_a_mixed_policy(tiny_run):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = load_run(tiny_run).build_model("final")
        assert keras.mixed_precision.global_policy().name == "mixed_float16"  # put back
    finally:
        keras.mixed_precision.set_global_policy("float32")
    dtypes = {layer.compute_dtype for layer in model.get_layer("cnn").layers}
    assert dtypes == {"float32"}


def test_parity_failure_is_reported_and_raised(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)  # any difference fails
    with pytest.raises(PipelineError, match="disagrees with the in-memory one"):
        export.export_run(tiny_run, formats=["keras"], out_dir=tmp_path)
    assert json.loads((tmp_path / "parity.json").read_text())["formats"]["keras"]["path"]


def test_tflite_without_litert_names_the_package(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # import fails
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(PipelineError, match="needs the ai-edge-litert package.*pip install"):
        export.export_run(tiny_run, formats=["tflite"], out_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_tflite_export_through_keras_litert(tiny_run, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="format=tflite is checked with ai-edge-litert")
    report = export.export_run(tiny_run, formats=["tflite"], out_dir=tmp_path)
    assert report["formats"]["tflite"]["max_abs_diff"] <= 1e-4
    assert (tmp_path / "model.tflite").stat().st_size > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"formats": ["torchscript"]},
            "format must be one or more of saved_model, keras, tflite, onnx",
        ),
        ({"checkpoint": "middle"}, "checkpoint must be one of best, last, final; got 'middle'"),
    ],
)
def test_bad_arguments_are_named(tiny_run, tmp_path, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        export.export_run(tiny_run, out_dir=tmp_path, **kwargs)


def test_import_leaves_tensorflow_alone():
    code = "import sys, pipeline.export; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
