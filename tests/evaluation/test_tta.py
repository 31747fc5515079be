"""Test-time augmentation: its views, the wrapper, and eval.tta / predict --tta / export tta."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, run_test_split
from pipeline.data.sources import resize_image
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.evaluation.tta import TTA_MODES, views, with_tta
from pipeline.export import export_run
from pipeline.predict import main, predict, read_image
from pipeline.runs.reader import load_run

SIZE = 32  # pixels a side in the unit tests


def _images(n=3, size=SIZE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _conv_model(size=SIZE, classes=4) -> keras.Model:
    """Not mirror-symmetric: a 3x3 convolution, then a dense layer on every position."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D(4)(x)
    outputs = keras.layers.Dense(classes)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def _linear_model(size=SIZE, classes=4) -> keras.Model:
    keras.utils.set_random_seed(2)
    inputs = keras.Input((size, size, 3))
    outputs = keras.layers.Dense(classes)(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, outputs)


def _numpy_views(x: np.ndarray, mode: str) -> list[tuple[float, np.ndarray]]:
    """The views of ``mode`` built with NumPy alone: mirror, reflect-pad by 1, crop."""
    mirror = np.flip(x, axis=2)
    if mode == "none":
        return [(1.0, x)]
    if mode == "flip":
        return [(0.5, x), (0.5, mirror)]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    height, width = x.shape[1:3]
    up_left = padded[:, :height, :width]
    down_right = padded[:, 2:, 2:]
    return [
        (0.25, x),
        (0.25, mirror),
        (0.125, up_left),
        (0.125, np.flip(up_left, axis=2)),
        (0.125, down_right),
        (0.125, np.flip(down_right, axis=2)),
    ]


def _logits(model, x) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False)).astype("float64")


def _softmax(logits) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("mode", TTA_MODES)
def test_views_are_the_numpy_mirrors_and_shifts(mode):
    x = _images()
    got = views(x, mode)
    expected = _numpy_views(x, mode)
    assert sum(w for w, _ in got) == pytest.approx(1.0, abs=1e-12)
    assert [w for w, _ in got] == [w for w, _ in expected]
    for (_, view), (_, want) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(view), want)
    if mode == "flip_translate":  # the shifts moved pixels: the views are not all the same
        assert not np.array_equal(expected[2][1], x) and not np.array_equal(expected[4][1], x)


@pytest.mark.parametrize("mode", ["flip", "flip_translate"])
def test_with_tta_is_the_weighted_mean_of_the_logits_over_the_views(mode):
    model, x = _conv_model(), _images()
    wrapped = with_tta(model, mode)
    got = _logits(wrapped, x)
    expected = sum(w * _logits(model, view) for w, view in _numpy_views(x, mode))
    assert got.shape == (3, 4) and wrapped.output.dtype == "float32"
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, _logits(model, x), atol=1e-3)  # the views changed the logits


def test_flip_tta_is_mirror_invariant_and_linear_models_average_the_images():
    x = _images()
    conv = with_tta(_conv_model(), "flip")
    np.testing.assert_allclose(_logits(conv, np.flip(x, 2)), _logits(conv, x), atol=1e-5)
    linear = _linear_model()
    mean_image = (x + np.flip(x, axis=2)) / 2  # a linear model's mean logits: its mean input
    np.testing.assert_allclose(
        _logits(with_tta(linear, "flip"), x), _logits(linear, mean_image), rtol=1e-5, atol=1e-4
    )


def test_none_is_the_model_itself_and_a_bad_mode_is_named():
    model = _linear_model()
    assert with_tta(model, "none") is model
    with pytest.raises(
        PipelineError, match="tta must be one of none, flip, flip_translate; got 'x4'"
    ):
        with_tta(model, "x4")


@pytest.fixture(scope="module")
def tiny_run(own_tiny_run):
    """evaluate logs to the run's tensorboard/eval: a copy of the shared one."""
    return own_tiny_run.path, own_tiny_run.folder


@pytest.fixture(scope="module")
def final_model(tiny_run):
    return load_run(tiny_run[0]).build_model("final")


@pytest.fixture(scope="module")
def flip_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("flip_export")
    return export_run(tiny_run[0], formats=["saved_model"], tta="flip", out_dir=out), out


def test_evaluate_with_flip_scores_the_tta_logits(tiny_run, final_model, tmp_path):
    run_dir, folder = tiny_run
    report = evaluate(run_dir, checkpoint="final", tta="flip", out_dir=tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["tta"] == "flip" and saved["accuracy"] == report["accuracy"]
    x, labels = run_test_split(run_dir, folder, 16)
    probs = _softmax(_logits(with_tta(final_model, "flip"), x))
    assert saved["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels), abs=1e-12)
    loss = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert saved["loss"] == pytest.approx(loss, rel=1e-4)
    plain = _softmax(_logits(final_model, x))
    assert saved["loss"] != pytest.approx(-np.log(plain[np.arange(len(labels)), labels]).mean())


@pytest.mark.parametrize(
    ("command", "override", "key"),
    [("evaluate", "eval.tta=mirror", "eval.tta"), ("export", "tta=mirror", "tta")],
)
def test_commands_refuse_an_unknown_tta_in_one_line(tiny_run, command, override, key):
    proc = subprocess.run(
        [sys.executable, "-m", f"pipeline.{command}", f"run_dir={tiny_run[0]}", override],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = f"error: {key} must be one of none, flip, flip_translate; got 'mirror'\n"
    assert proc.stderr.endswith(message)


def test_predict_with_flip_is_the_softmax_of_the_tta_logits(tiny_run, final_model, tmp_path):
    run_dir, folder = tiny_run
    files = sorted(str(p) for p in (folder / "dog").glob("img[0-2].*"))
    rows = predict(run_dir, files, top_k=3, tta="flip")
    pixels = np.stack([resize_image(read_image(f), 16, "crop").numpy() for f in files])
    expected = _softmax(_logits(with_tta(final_model, "flip"), pixels.astype("float32")))
    for row, probs in zip(rows, expected, strict=True):
        got = {p["class"]: p["probability"] for p in row["predictions"]}
        np.testing.assert_allclose([got[c] for c in ("cat", "dog", "fox")], probs, atol=1e-5)
    assert main([str(run_dir), files[0], "--tta", "sideways"]) == 2


def test_predict_refuses_tta_on_a_saved_model(flip_export, tmp_path, capsys):
    _, out = flip_export
    image = tmp_path / "a.png"
    keras.utils.save_img(image, _images(1, 16)[0])
    assert main([str(out / "saved_model"), str(image), "--tta", "flip"]) == 2
    err = capsys.readouterr().err
    assert "--tta flip cannot be added to the SavedModel" in err and "tta=flip" in err
    rows = predict(out / "saved_model", [str(image)])  # its own flip TTA, baked in
    assert rows[0]["error"] is None and len(rows[0]["predictions"]) == 3


def test_exported_saved_model_holds_the_tta(flip_export, final_model):
    report, out = flip_export
    parity = json.loads((out / "parity.json").read_text())
    assert parity["tta"] == "flip" and parity["formats"]["saved_model"]["tta"] == "flip"
    assert report["formats"]["saved_model"]["max_abs_diff"] <= 1e-4
    loaded = tf.saved_model.load(str(out / "saved_model"))
    assert loaded.tta.numpy() == b"flip"
    images = np.random.default_rng(4).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    served = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"]
    x = images.astype("float32")
    expected = _softmax(_logits(with_tta(final_model, "flip"), x))
    np.testing.assert_allclose(served.numpy(), expected, atol=1e-4)
    assert not np.allclose(served.numpy(), _softmax(_logits(final_model, x)), atol=1e-4)


def test_export_refuses_tta_for_keras_and_unknown_modes(tiny_run, tmp_path):
    with pytest.raises(PipelineError, match=r"tta=flip can be baked into .* not \['keras'\]"):
        export_run(tiny_run[0], formats=["saved_model", "keras"], tta="flip", out_dir=tmp_path)
    with pytest.raises(PipelineError, match="tta must be one of none, flip, flip_translate"):
        export_run(tiny_run[0], tta="both", out_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_tflite_export_holds_the_tta(tiny_run, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="format=tflite is checked with ai-edge-litert")
    report = export_run(tiny_run[0], formats=["tflite"], tta="flip_translate", out_dir=tmp_path)
    assert report["tta"] == "flip_translate"
    assert report["formats"]["tflite"]["max_abs_diff"] <= 1e-4
