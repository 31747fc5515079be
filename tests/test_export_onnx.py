"""ONNX export of a tiny run (Keras's ``model.export(format="onnx")``, checked with
onnxruntime), its TTA, and ``pipeline.predict`` on the ``.onnx`` file."""

import json
import shutil
import sys

import keras
import numpy as np
import pytest

from conftest import compose, run_module, run_test_split
from pipeline import exporting
from pipeline.errors import PipelineError
from pipeline.evaluation.tta import with_tta
from pipeline.predict import main, predict

CLASSES = ["cat", "dog", "fox"]
INSTALL = 'pip install "pipeline-cnn-trainer[onnx]"'


def _needs_onnx():
    for package in exporting.ONNX_PACKAGES:
        pytest.importorskip(package, reason='format=onnx: pip install -e ".[onnx]"')


@pytest.fixture(scope="module")
def onnx_run(own_tiny_run):
    """``python -m pipeline.export run_dir=<own copy> format=onnx``: the run and the process."""
    _needs_onnx()
    proc = run_module("pipeline.export", f"run_dir={own_tiny_run.path}", "format=onnx")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return own_tiny_run, proc


@pytest.fixture(scope="module")
def final_model(own_tiny_run):
    return keras.saving.load_model(own_tiny_run.path / "model.keras")


def _softmax(logits) -> np.ndarray:
    return keras.ops.convert_to_numpy(keras.ops.softmax(logits))


def _onnx_probabilities(path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels"]
    return session.run(None, {"pixels": pixels.astype(np.float32)})[0]


def test_cli_writes_onnx_parity_class_names_and_a_line_per_step(onnx_run):
    run, proc = onnx_run
    out = run.path / "export"
    parity = json.loads((out / "parity.json").read_text())
    onnx = parity["formats"]["onnx"]
    assert onnx["path"] == "model.onnx" and onnx["tta"] == "none"
    assert 0.0 <= onnx["max_abs_diff"] <= exporting.PARITY_TOLERANCE == parity["tolerance"]
    assert json.loads((out / "class_names.json").read_text()) == {
        "class_names": CLASSES,
        "image_size": 16,
        "resize": "crop",
    }
    assert f"onnx         {out / 'model.onnx'}  max |diff|" in proc.stdout
    steps = [line.split(" in ")[0] for line in proc.stderr.splitlines() if " s" in line]
    assert "  onnx: exported" in steps and "  onnx: parity checked" in steps
    assert "exported in" not in proc.stdout  # stdout stays the summary
    artifacts = json.loads((run.path / "manifest.json").read_text())["artifacts"]
    assert "export/model.onnx" in artifacts


def test_onnx_probabilities_match_the_keras_model_on_test_images(onnx_run, final_model):
    run, _ = onnx_run
    pixels, _ = run_test_split(run.path, run.folder, 16)
    pixels = pixels[:5]
    got = _onnx_probabilities(run.path / "export" / "model.onnx", pixels)
    expected = _softmax(final_model(pixels))
    assert got.shape == (len(pixels), 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=exporting.PARITY_TOLERANCE)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_tta_is_baked_into_the_onnx_export(own_tiny_run, final_model, tmp_path):
    _needs_onnx()
    report = exporting.export_run(own_tiny_run.path, formats=["onnx"], tta="flip", out_dir=tmp_path)
    assert report["formats"]["onnx"]["tta"] == "flip"
    assert report["formats"]["onnx"]["max_abs_diff"] <= exporting.PARITY_TOLERANCE
    pixels = np.random.default_rng(4).integers(0, 256, (4, 16, 16, 3)).astype(np.float32)
    got = _onnx_probabilities(tmp_path / "model.onnx", pixels)
    expected = _softmax(with_tta(final_model, "flip")(pixels))
    np.testing.assert_allclose(got, expected, atol=exporting.PARITY_TOLERANCE)
    mirrored = _onnx_probabilities(tmp_path / "model.onnx", pixels[:, :, ::-1])
    np.testing.assert_allclose(mirrored, got, atol=1e-5)  # flip TTA sees both views either way
    assert np.abs(got - _softmax(final_model(pixels))).max() > 1e-6  # not the plain model


def test_predict_on_onnx_equals_predict_on_the_run(onnx_run):
    run, _ = onnx_run
    inputs = [str(run.folder)]
    on_onnx = predict(run.path / "export" / "model.onnx", inputs, top_k=3)
    on_run = predict(run.path, inputs, top_k=3)
    assert [r["file"] for r in on_onnx] == [r["file"] for r in on_run] and len(on_run) == 30
    for row, ref in zip(on_onnx, on_run, strict=True):
        assert row["error"] is None and ref["error"] is None
        assert [p["class"] for p in row["predictions"]] == [p["class"] for p in ref["predictions"]]
        np.testing.assert_allclose(
            [p["probability"] for p in row["predictions"]],
            [p["probability"] for p in ref["predictions"]],
            atol=1e-5,
        )


def _copy_onnx(run, dest, *, names: str | None = "same", broken: bool = False):
    dest.mkdir()
    model = dest / "model.onnx"
    if broken:
        model.write_bytes(b"\x08\x07 not a protobuf of an ONNX graph")
    else:
        shutil.copy(run.path / "export" / "model.onnx", model)
    if names == "same":
        shutil.copy(run.path / "export" / "class_names.json", dest)
    elif names is not None:
        (dest / "class_names.json").write_text(names)
    return model


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_names", "class_names.json is missing: an ONNX MODEL needs the class_names.json"),
        ("broken", "cannot be loaded as an ONNX model"),
        ("other_names", "lists 2 classes at 16 px: it belongs to another model"),
        ("tta", "--tta flip cannot be added to the ONNX model"),
    ],
)
def test_predict_on_a_bad_onnx_is_one_line(onnx_run, tmp_path, capsys, case, message):
    run, _ = onnx_run
    names = {"no_names": None, "other_names": json.dumps(["cat", "dog"])}.get(case, "same")
    model = _copy_onnx(run, tmp_path / "copy", names=names, broken=case == "broken")
    image = next(run.folder.rglob("*.png"))
    extra = ["--tta", "flip"] if case == "tta" else []
    assert main([str(model), str(image), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and len(captured.err.splitlines()) == 1
    assert message in captured.err and captured.out == ""


def test_missing_packages_name_the_extra(own_tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # find_spec and import both fail
    with pytest.raises(PipelineError, match=r"format=onnx needs tf2onnx, not installed: pip ins"):
        exporting.export_run(own_tiny_run.path, formats=["onnx"], out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(PipelineError, match=r"export: format=onnx needs tf2onnx"):
        from pipeline.config import check_config

        check_config(compose(["export.formats=[onnx]"]))

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"never read")
    (tmp_path / "class_names.json").write_text(json.dumps(CLASSES))
    assert main([str(model), str(tmp_path / "class_names.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {model} needs onnxruntime, not installed: {INSTALL} " + (
        '(in a checkout: pip install -e ".[onnx]")\n'
    )


def test_training_exports_onnx_from_export_formats(tiny_runs):
    _needs_onnx()
    run = tiny_runs("trainer.epochs=1", "export.formats=[onnx]")
    parity = json.loads((run.path / "export" / "parity.json").read_text())
    assert list(parity["formats"]) == ["onnx"]
    assert run.metrics["export_max_abs_diff"] == parity["formats"]["onnx"]["max_abs_diff"] <= 1e-4
    assert (run.path / "export" / "model.onnx").stat().st_size > 0
