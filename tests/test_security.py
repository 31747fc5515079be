"""Safe artifacts (hashes, safe loading), the `_target_` allowlist and predict's input limits."""

import json
import shutil

import hydra
import keras
import numpy as np
import pytest
from PIL import Image

from conftest import compose, png_header_only
from pipeline import predict as predict_module
from pipeline import security
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.export import export_run
from pipeline.predict import load_predictor, main, predict
from pipeline.runs import hashes
from pipeline.runs.reader import load_run

MAX_PIXELS = 1_000_000  # the run's data.max_pixels: predict's default limit


@pytest.fixture(scope="module")
def run_dir(tiny_runs, tmp_path_factory):
    """A tiny run, exported, with its artifacts' hashes recorded as train.py records them."""
    shared = tiny_runs("trainer.epochs=1", "export.formats=[]", f"data.max_pixels={MAX_PIXELS}")
    run = shared.copy_to(tmp_path_factory.mktemp("security") / "run").path
    hashes.record_artifacts(run, [run / "model.keras", *(run / "checkpoints").glob("*.h5")])
    export_run(run, formats=["saved_model", "keras"])  # records its own files
    return run


@pytest.fixture
def run_copy(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "run")


def test_every_artifact_has_its_sha256_in_the_manifest(run_dir):
    artifacts = json.loads((run_dir / "manifest.json").read_text())["artifacts"]
    assert set(artifacts) == {
        "model.keras",
        "checkpoints/best.weights.h5",
        "checkpoints/last.weights.h5",
        "export/saved_model",
        "export/model.keras",
        "export/class_names.json",
    }
    assert artifacts["model.keras"] == hashes.sha256_file(run_dir / "model.keras")
    assert artifacts["export/saved_model"] == hashes.sha256_tree(run_dir / "export/saved_model")
    assert all(len(h) == 64 for h in artifacts.values())


def test_tree_hash_sees_renamed_and_changed_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1")
    first = hashes.sha256_tree(tmp_path / "a")
    (tmp_path / "a" / "x.bin").rename(tmp_path / "a" / "y.bin")
    second = hashes.sha256_tree(tmp_path / "a")
    (tmp_path / "a" / "y.bin").write_bytes(b"2")
    assert len({first, second, hashes.sha256_tree(tmp_path / "a")}) == 3


@pytest.mark.parametrize(
    "tampered", ["model.keras", "checkpoints/last.weights.h5", "export/saved_model/saved_model.pb"]
)
def test_a_tampered_file_is_refused_by_evaluate_predict_and_export(run_copy, tampered):
    with open(run_copy / tampered, "ab") as f:
        f.write(b"\0")
    shown = tampered.split("/saved_model.pb")[0]
    message = rf"{shown} was modified after training \(sha256 \w+ != \w+ recorded"
    if tampered == "model.keras":
        with pytest.raises(PipelineError, match=message):
            load_predictor(run_copy)
        with pytest.raises(PipelineError, match=message):
            export_run(run_copy, formats=["keras"], out_dir=run_copy / "again")
        assert not (run_copy / "again").exists()
    elif tampered.startswith("checkpoints"):
        with pytest.raises(PipelineError, match=message):
            evaluate(run_copy, checkpoint="last")
        assert not (run_copy / "eval").exists()
    else:
        with pytest.raises(PipelineError, match=message):
            load_predictor(run_copy / "export" / "saved_model")


def test_an_older_run_without_hashes_loads_with_a_warning(run_copy, caplog):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    del manifest["artifacts"]
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_run(run_copy).build_model("last") is not None
    assert "records no artifact hashes" in caplog.text


def _lambda_model(canary):
    inputs = keras.Input((4,))
    # a lambda is saved as bytecode; it runs whenever the layer is called, on load too
    code = f"lambda x: (open({str(canary)!r}, 'w').close(), x)[1]"  # the path in its bytecode
    touch = keras.layers.Lambda(eval(code))
    hidden = touch(inputs)
    touch.name = "sneaky"
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def test_a_keras_file_with_a_lambda_layer_is_refused_and_runs_nothing(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "model.keras"
    _lambda_model(canary).save(path)
    canary.unlink()  # building the model above called the lambda once
    with pytest.raises(PipelineError, match=r"model\.keras holds layer\(s\) sneaky \(Lambda\)"):
        security.safe_load_keras(path)
    with pytest.raises(PipelineError, match=r"sneaky \(Lambda\)"):
        load_predictor(path)
    assert not canary.exists()
    keras.saving.load_model(path, safe_mode=False)  # the canary works: unsafe loading runs it
    assert canary.exists()


def test_legacy_h5_models_need_the_unsafe_flag(tmp_path, capsys):
    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(pooled))
    model.save(tmp_path / "old.h5")
    with pytest.raises(PipelineError, match=r"old\.h5 is a legacy HDF5 .* --allow-unsafe-h5"):
        security.safe_load_keras(tmp_path / "old.h5")
    assert security.safe_load_keras(tmp_path / "old.h5", allow_unsafe=True).output_shape == (
        None,
        3,
    )
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    assert main([str(tmp_path / "old.h5"), str(image)]) == 2
    assert "--allow-unsafe-h5" in capsys.readouterr().err
    assert main([str(tmp_path / "old.h5"), str(image), "--allow-unsafe-h5"]) == 0
    with pytest.raises(PipelineError, match="is a weights file"):
        security.safe_load_keras(tmp_path / "x.weights.h5")


@pytest.mark.parametrize(
    "override",
    [
        "optimizer._target_=os.system",
        "optimizer._target_=pipeline.runs.manifest.subprocess.run",  # a module reached through ours
        "optimizer._target_=keras.optimizers.schedules.os.system",
        "+optimizer.extra._target_=builtins.exec",  # nested: instantiate would build it too
    ],
)
def test_a_target_outside_the_allowlist_is_refused_before_anything_runs(tmp_path, override):
    canary = tmp_path / "canary"
    cfg = compose([override, f"+optimizer.command='touch {canary}'"])
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(PipelineError, match=rf"{key}='[\w.]+' is not allowed.*nothing was run"):
        security.check_targets(cfg)
    assert not canary.exists()


def test_allowlisted_targets_pass_and_hydra_settings_are_left_alone(tmp_path):
    for optimizer in ("sgd", "adam", "adamw"):
        security.check_targets(compose([f"optimizer={optimizer}"]))
    security.check_targets({"hydra": {"sweeper": {"_target_": "hydra._internal.BasicSweeper"}}})
    security.check_targets({"cb": [{"_target_": "keras.callbacks.EarlyStopping"}]})
    security.check_targets({"s": {"_target_": "pipeline.training.schedules.WarmupSchedule"}})
    with pytest.raises(PipelineError, match=r"cb\.0\._target_='os\.remove'"):
        security.check_targets({"cb": [{"_target_": "os.remove"}]})
    target = tmp_path / "made"
    cfg = compose(["optimizer._target_=${oc.env:NOT_SET_ANYWHERE,os.mkdir}"])
    with pytest.raises(PipelineError, match="'os.mkdir' is not allowed"):  # resolved, then judged
        security.check_targets(cfg)
    hydra.utils.instantiate({"_target_": "os.mkdir", "_args_": [str(target)]})
    assert target.is_dir()  # what the refused config would have done


def test_oversized_and_non_image_files_are_refused_without_decoding(run_dir, tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(good)
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    png_header_only(tmp_path / "big.png", 1200, 1200)  # 1.44 M > the run's 1 M
    (tmp_path / "notes.png").write_text("not pixels")
    decoded = []
    real = predict_module.read_image
    monkeypatch.setattr(predict_module, "read_image", lambda p: decoded.append(p) or real(p))
    files = [str(tmp_path / n) for n in ("good.png", "bomb.png", "big.png", "notes.png")]
    rows = predict(run_dir, files)
    assert decoded == [str(good)]
    assert rows[0]["error"] is None and len(rows[0]["predictions"]) == 3
    assert rows[1]["error"].startswith("refused: bomb.png is too large, not decoded")
    assert rows[2]["error"] == (
        f"refused: big.png is 1200x1200 = 1440000 pixels > --max-pixels={MAX_PIXELS}, not "
        "decoded; shrink the image or pass a larger --max-pixels"
    )
    assert "notes.png is not an image" in rows[3]["error"]
    rows = predict(run_dir, [str(good)], max_pixels=399)  # 20 x 20 = 400
    assert "20x20 = 400 pixels > --max-pixels=399" in rows[0]["error"]
