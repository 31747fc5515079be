"""Evaluation of a tiny trained run, its metrics, and the confusion-matrix callback."""

import json
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO, run_test_split, write_image_folder
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.evaluation.metrics import classification_metrics, expected_calibration_error
from pipeline.training.callbacks import SUMMARY_TAG, ConfusionMatrixLogger

REPORT_KEYS = (
    "loss",
    "accuracy",
    "top_k",
    "top_k_accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "ece",
    "calibration",
    "mistakes",
)


@pytest.fixture(scope="module")
def tiny_run(own_tiny_run):
    """evaluate writes eval/ and tensorboard/eval into the run: a copy of the shared one."""
    return own_tiny_run.path, own_tiny_run.folder


@pytest.fixture(scope="module")
def last_report(tiny_run):
    run_dir, _ = tiny_run
    return evaluate(run_dir, checkpoint="last")


def _events(folder) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {}
    for event_file in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_report_has_every_metric_and_the_pngs(tiny_run, last_report):
    run_dir, _ = tiny_run
    saved = json.loads((run_dir / "eval" / "report.json").read_text())
    assert saved == json.loads(json.dumps(last_report))
    for key in REPORT_KEYS:
        assert key in saved, key
    assert saved["checkpoint"] == "last" and saved["weights"] == "checkpoints/last.weights.h5"
    assert saved["top_k"] == 3  # min(5, 3 classes)
    assert set(saved["per_class"]) == {"cat", "dog", "fox"}
    for scores in saved["per_class"].values():
        assert set(scores) == {"precision", "recall", "f1", "support"}
    cm = np.array(saved["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == saved["data"]["count"] == 3
    assert len(saved["calibration"]) == 15 and 0.0 <= saved["ece"] <= 1.0
    for mistake in saved["mistakes"]:
        assert mistake["true"] != mistake["predicted"] and mistake["member"].count("/") == 1
    for name in ("confusion_matrix", "mistakes"):
        with Image.open(run_dir / "eval" / f"{name}.png") as png:
            assert png.mode == "RGB" and min(png.size) >= 32
    tags = _events(run_dir / "tensorboard" / "eval")  # pictures; the numbers are in report.json
    assert tags == {"images/confusion_matrix": [2], "images/mistakes": [2]}  # the run's epochs


def test_metrics_equal_a_numpy_recomputation(tiny_run, last_report):
    run_dir, folder = tiny_run
    images, labels = run_test_split(run_dir, folder, 16)
    model = keras.saving.load_model(run_dir / "model.keras")  # the last epoch's weights
    logits = model.predict(images, verbose=0).astype("float64")
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    predicted = probs.argmax(1)
    assert last_report["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    loss = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert last_report["loss"] == pytest.approx(loss, rel=1e-4)
    cm = np.zeros((3, 3), int)
    for t, p in zip(labels, predicted, strict=True):
        cm[t, p] += 1
    assert last_report["confusion_matrix"] == cm.tolist()
    conf = probs.max(1)
    bins = np.minimum((np.ceil(conf * 15) - 1).astype(int), 14)
    ece = sum(
        np.mean(bins == b)
        * abs(np.mean(predicted[bins == b] == labels[bins == b]) - conf[bins == b].mean())
        for b in np.unique(bins)
    )
    assert last_report["ece"] == pytest.approx(ece, abs=1e-5)
    wrong = np.flatnonzero(predicted != labels)
    assert [m["index"] for m in last_report["mistakes"]] == wrong[np.argsort(-conf[wrong])].tolist()


def test_classification_metrics_on_known_values():
    probs = np.array([[0.7, 0.2, 0.1], [0.62, 0.28, 0.1], [0.1, 0.85, 0.05], [0.18, 0.18, 0.64]])
    labels = np.array([0, 1, 1, 2])
    m = classification_metrics(np.log(probs), labels, ["a", "b", "c"])
    assert m["accuracy"] == 0.75 and m["top_k"] == 3 and m["top_k_accuracy"] == 1.0
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    a = m["per_class"]["a"]
    assert (a["precision"], a["recall"], a["support"]) == (0.5, 1.0, 1)
    assert a["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["recall"] == 0.5 and m["per_class"]["b"]["precision"] == 1.0
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.28, 0.85, 0.64])))
    # bin 9 = (9/15, 10/15] holds 0.62 (wrong) and 0.64 (right); 0.7 and 0.85 are alone, right
    assert [b["count"] for b in m["calibration"]][9:13] == [2, 1, 0, 1]
    assert m["ece"] == pytest.approx((2 * abs(0.5 - 0.63) + (1 - 0.7) + (1 - 0.85)) / 4)


def test_ece_is_zero_when_confidence_matches_accuracy():
    ece, bins = expected_calibration_error(np.array([1.0, 1.0, 0.5, 0.5]), [1, 1, 1, 0])
    assert ece == pytest.approx(0.0) and bins[-1]["count"] == 2 and bins[7]["count"] == 2


def test_evaluates_another_folder_with_the_same_classes(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    other = write_image_folder(tmp_path / "other", classes=("dog", "cat"), per_class=2, seed=1)
    report = evaluate(run_dir, test_path=str(other), out_dir=tmp_path / "out")
    assert report["data"] == {"split": "folder", "path": str(other), "count": 4, "quarantined": []}
    assert report["checkpoint"] == "best" and report["per_class"]["fox"]["support"] == 0
    assert {report["per_class"][c]["support"] for c in ("cat", "dog")} == {2}
    assert (tmp_path / "out" / "report.json").is_file()


def test_a_broken_file_in_another_folder_is_quarantined_and_named(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    other = write_image_folder(tmp_path / "other", classes=("cat",), per_class=2)
    (other / "cat" / "broken.png").write_bytes(b"not an image")
    report = evaluate(run_dir, test_path=str(other), out_dir=tmp_path / "out")
    assert report["data"]["count"] == 2
    assert [(q["path"], q["reason"]) for q in report["data"]["quarantined"]] == [
        ("cat/broken.png", "not an image")
    ]


def test_a_changed_test_split_is_refused(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("tensorboard", "eval"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["data"]["splits"]["test"][0] = "cat/renamed.png"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="differs from the one in .*manifest.json"):
        evaluate(copy)


def test_missing_checkpoint_names_the_file(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    with pytest.raises(PipelineError, match="checkpoint must be one of best, last, final"):
        evaluate(run_dir, checkpoint="middle")


def test_cli_refuses_a_folder_with_other_class_names(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    other = write_image_folder(tmp_path / "zoo", classes=("cat", "emu", "yak"), per_class=1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            f"run_dir={run_dir}",
            f"data.test_path={other}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "has class folders ['emu', 'yak'] that the model" in proc.stderr
    assert "['cat', 'dog', 'fox']" in proc.stderr and "Traceback" not in proc.stderr


def test_import_leaves_tensorflow_alone():
    code = "import sys, pipeline.evaluate; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_confusion_matrix_logger_writes_images_every_n_epochs(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4)).astype("float32")
    y = np.arange(12) % 3
    val = tf.data.Dataset.from_tensor_slices((x, tf.one_hot(y, 3))).batch(5)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    logger = ConfusionMatrixLogger(val, ["a", "b", "c"], tmp_path, every_n_epochs=2)
    model.fit(val, epochs=3, verbose=0, shuffle=False, callbacks=[logger])
    assert _events(tmp_path / "validation") == {SUMMARY_TAG: [1, 2]}  # epoch 2 and the last
    predicted = model.predict(x, verbose=0).argmax(1)
    expected = np.zeros((3, 3), int)
    np.add.at(expected, (y, predicted), 1)
    np.testing.assert_array_equal(logger.matrix, expected)
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1, got 0"):
        ConfusionMatrixLogger(val, ["a"], tmp_path, every_n_epochs=0)
