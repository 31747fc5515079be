"""`python -m pipeline.predict` on a tiny run, its .keras export and its SavedModel."""

import csv
import io
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from pipeline.data.sources import resize_image
from pipeline.export import export_run
from pipeline.predict import main, predict

GOOD = ("a.png", "b.jpg", "c.gif")


@pytest.fixture(scope="module")
def tiny_run(own_tiny_run):
    """A copy of the shared 2-epoch run, exported to a SavedModel and a .keras file."""
    export_run(own_tiny_run.path, formats=["saved_model", "keras"])
    return own_tiny_run.path


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Three good images of different sizes and formats, a corrupt one, and a text file."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(3)
    for name, (h, w) in zip(GOOD, ((20, 20), (30, 18), (16, 40)), strict=True):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image, skipped in folders")
    return folder


def test_folder_with_a_corrupt_file_gives_a_row_per_file(tiny_run, mixed_folder, tmp_path):
    out = tmp_path / "rows.json"
    code = main([str(tiny_run), str(mixed_folder), "--format", "json", "--output", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["file"] for r in rows] == [
        str(mixed_folder / n) for n in ("a.png", "b.jpg", "broken.png", "c.gif")
    ]
    bad = rows[2]
    assert bad["predictions"] == [] and "cannot read image" in bad["error"]
    assert "broken.png" in bad["error"]
    for row in rows[:2] + rows[3:]:
        assert row["error"] is None and len(row["predictions"]) == 3  # top-5 of 3 classes
        probs = [p["probability"] for p in row["predictions"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert {p["class"] for p in row["predictions"]} == {"cat", "dog", "fox"}


def test_probabilities_match_the_keras_model(tiny_run, mixed_folder):
    rows = predict(tiny_run, [str(mixed_folder / "b.jpg")], top_k=1)
    model = keras.saving.load_model(tiny_run / "model.keras")
    with Image.open(mixed_folder / "b.jpg") as image:
        pixels = resize_image(np.asarray(image.convert("RGB")), 16, "crop").numpy()
    logits = model(pixels[None].astype("float32"))
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(logits))[0]
    best = int(np.argmax(probs))
    assert rows[0]["predictions"] == [
        {"class": ["cat", "dog", "fox"][best], "probability": pytest.approx(float(probs[best]))}
    ]


def test_run_dir_keras_file_and_saved_model_agree(tiny_run, mixed_folder):
    inputs = [str(mixed_folder)]
    results = [
        predict(model, inputs, top_k=3)
        for model in (
            tiny_run,
            tiny_run / "export" / "model.keras",
            tiny_run / "export" / "saved_model",
        )
    ]
    for rows in results[1:]:
        assert [r["file"] for r in rows] == [r["file"] for r in results[0]]
        for row, ref in zip(rows, results[0], strict=True):
            assert [p["class"] for p in row["predictions"]] == [
                p["class"] for p in ref["predictions"]
            ]
            np.testing.assert_allclose(
                [p["probability"] for p in row["predictions"]],
                [p["probability"] for p in ref["predictions"]],
                atol=1e-5,
            )


def test_csv_and_table_outputs(tiny_run, mixed_folder, capsys):
    assert main([str(tiny_run), str(mixed_folder), "--format", "csv", "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    table = list(csv.reader(io.StringIO(captured.out)))
    assert table[0] == ["file", "class_1", "probability_1", "class_2", "probability_2", "error"]
    assert len(table) == 5 and table[3][0].endswith("broken.png") and table[3][5]
    assert all(row[5] == "" and row[1] in ("cat", "dog", "fox") for row in table[1:3])
    assert "1 of 4 inputs could not be classified" in captured.err
    assert main([str(tiny_run), str(mixed_folder / "a.png"), "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "class", "1", "prob", "1"] and len(lines) == 2


def test_exit_code_is_1_when_nothing_is_predicted(tiny_run, mixed_folder, tmp_path, capsys):
    missing = str(tmp_path / "missing.jpg")
    assert main([str(tiny_run), str(mixed_folder / "broken.png"), missing]) == 1
    out = capsys.readouterr().out
    assert "error: cannot read image" in out and "error: no such file or folder" in out


def test_bad_model_is_one_clear_error(tmp_path, mixed_folder, capsys):
    assert main([str(tmp_path), str(mixed_folder)]) == 2
    err = capsys.readouterr().err
    assert f"MODEL='{tmp_path}' is not a training run directory" in err


def test_help_is_fast_and_leaves_tensorflow_alone():
    code = (
        "import sys, pipeline.predict\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0 and "MODEL" in proc.stdout and "--top-k" in proc.stdout


@pytest.mark.parametrize("where", ["folder", "missing_parent"])
def test_bad_output_is_refused_before_any_image_is_read(where, tmp_path, mixed_folder, capsys):
    out = tmp_path if where == "folder" else tmp_path / "no" / "such" / "rows.json"
    # MODEL is bad too: the --output error coming first shows nothing was loaded or read
    assert main([str(tmp_path / "no_model"), str(mixed_folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output ") and str(out) in err and len(err.splitlines()) == 1
    assert ("is a folder" if where == "folder" else "does not exist") in err


def test_full_disk_on_output_leaves_the_old_file_whole(tiny_run, mixed_folder, tmp_path, capsys):
    import errno

    out = tmp_path / "rows.csv"
    out.write_text("earlier results\n")

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pipeline.predict.os.fsync", full)
        code = main([str(tiny_run), str(mixed_folder / "a.png"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and str(out) in err
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]  # no temporary file left


def test_saved_model_without_variables_is_one_line(tiny_run, mixed_folder, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(tiny_run / "export" / "saved_model", tmp_path / "saved_model")
    shutil.rmtree(copy / "variables")
    assert main([str(copy), str(mixed_folder / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "variables/" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("content", ["{not json", '{"class_names": "cat"}', "[1, 2, 3]", "42"])
def test_malformed_class_names_json_is_one_line(tiny_run, mixed_folder, tmp_path, content, capsys):
    import shutil

    model = shutil.copy(tiny_run / "export" / "model.keras", tmp_path / "model.keras")
    (tmp_path / "class_names.json").write_text(content)
    assert main([str(model), str(mixed_folder / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "class_names.json" in err and len(err.splitlines()) == 1


def test_progress_goes_to_stderr_and_stdout_stays_the_results(tiny_run, mixed_folder, capsys):
    assert main([str(tiny_run), str(mixed_folder), "--format", "json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)  # stdout is the JSON alone, as before
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == ["a.png", "b.jpg", "broken.png", "c.gif"]
    progress = [line for line in captured.err.splitlines() if "classifying" in line]
    assert len(progress) == 1  # not a terminal: the closing line only, for a short run
    assert progress[0].startswith("  classifying 4/4 images (") and " images/s, " in progress[0]
    assert progress[0].endswith(" s)")
