"""Safe artifacts (hashes, safe loading), the `_target_` allowlist and predict's input limits."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
import keras
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF_DIR, REPO, compose, png_header_only
from pipeline import predict as predict_module
from pipeline import security
from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.export import export_run
from pipeline.predict import load_predictor, main, predict
from pipeline.runs import hashes, manifest, target
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


def test_allowlisted_targets_pass_and_hydra_gets_only_its_own(tmp_path):
    for optimizer in ("sgd", "adam", "adamw", "sgd_offsets"):
        security.check_targets(compose([f"optimizer={optimizer}"]))
    for choice in ("launcher=joblib", "launcher=slurm", "hparams_search=optuna"):
        security.check_targets(_with_hydra([choice]))  # Hydra's launchers, sweepers, callbacks
    with pytest.raises(PipelineError, match=r"hydra\.callbacks\.x\._target_='os\.system'"):
        security.check_targets({"hydra": {"callbacks": {"x": {"_target_": "os.system"}}}})
    with pytest.raises(PipelineError, match="'pipeline.runs.sweep.SweepSummary' is not allowed"):
        security.check_targets({"optimizer": {"_target_": "pipeline.runs.sweep.SweepSummary"}})
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


def test_every_target_in_conf_is_on_the_lists():
    """A class added to conf/ must be added to the lists, or every run is refused."""
    found = set()
    for path in Path(CONF_DIR).rglob("*.yaml"):
        found |= {
            line.split(":", 1)[1].strip()
            for line in path.read_text().splitlines()
            if line.strip().startswith("_target_:")
        }
    assert "keras.optimizers.SGD" in found
    assert found <= security.ALLOWED_TARGETS | security.HYDRA_TARGETS


def _with_hydra(overrides):
    """The composed config with its ``hydra:`` section, as Hydra instantiates from it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "target",
    [
        "pipeline.runs.manifest.git_commit",  # runs git, and the hooks a repo's .git/config names
        "pipeline.exporting.export_saved_model",  # deletes the folder it is given
        "pipeline.runs.sweep.record_failure",  # any function of ours: not a class of the list
        "pipeline.training.callbacks.FreezeLayers",  # a class of ours, but not one for configs
        "keras.optimizers.schedules.serialize",
        "keras.callbacks.BackupAndRestore",  # writes where its config says
    ],
)
def test_only_the_listed_classes_pass_wherever_the_target_sits(target):
    for where in ({"optimizer": {"name": {}}}, {"data": {"x": [{}]}}, {"anything": {}}):
        tree = json.loads(json.dumps(where).replace("{}", json.dumps({"_target_": target})))
        with pytest.raises(PipelineError, match=rf"_target_='{target}' is not allowed"):
            security.check_targets(tree)


@pytest.mark.parametrize(
    "made",
    ["${oc.create:{_target_: os.system, command: x}}", '${oc.decode:"{_target_: os.system}"}'],
)
def test_a_mapping_made_by_an_interpolation_is_checked_too(made):
    cfg = compose([])
    OmegaConf.update(cfg, "optimizer.extra", made, force_add=True)  # a string, until resolved
    with pytest.raises(PipelineError, match=r"optimizer\.extra\._target_='os\.system'"):
        security.check_targets(cfg)


def test_the_optimizer_factory_checks_what_it_instantiates(tmp_path):
    from pipeline.config import optimizer_factory

    keep = tmp_path / "keep"
    keep.mkdir()
    cfg = compose([])  # not through check_config: a caller that skipped it
    payload = {"_target_": "pipeline.exporting.export_saved_model", "path": str(keep)}
    OmegaConf.update(cfg, "optimizer.name", payload, force_add=True)
    with pytest.raises(PipelineError, match="'pipeline.exporting.export_saved_model' is not"):
        optimizer_factory(
            cfg.optimizer, schedule_cfg=cfg.schedule, global_batch=128, steps_per_epoch=1, epochs=1
        )
    assert keep.is_dir()


def test_an_interpolation_loop_is_refused_not_followed_forever():
    cfg = OmegaConf.create({"a": {"x": "${b}"}, "b": {"y": "${a}"}})  # a.x.y.x.y...
    with pytest.raises(PipelineError, match=r"a\.x\.y\.x.* is nested over 100 levels deep"):
        security.check_targets(cfg)


def _train_cli(tmp_path, *args):
    """``python -m pipeline.train`` run in a subprocess, from ``tmp_path``."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", *args, f"hydra.run.dir={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )


def _refused_in_one_line(proc, key_and_target):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith("error: ") and key_and_target in lines[-1], lines[-3:]
    assert "Traceback" not in proc.stderr


def _git_repo_with_hook(folder, canary):
    """A git checkout whose .git/config makes `git status` run `touch <canary>`."""
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
    folder.mkdir()
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    subprocess.run([*git, "config", "core.fsmonitor", f"touch {canary}"], check=True)


@pytest.mark.parametrize("key", ["optimizer.name", "hydra.callbacks.shared"])
def test_an_experiment_file_cannot_run_git_hooks(tmp_path, key):
    """Hydra instantiates ``hydra.callbacks`` before the command runs: checked before that."""
    canary = tmp_path / "canary"
    _git_repo_with_hook(tmp_path / "dataset", canary)
    manifest.git_commit(tmp_path / "dataset")  # the attack works when the function runs
    assert canary.exists()
    canary.unlink()
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    nested = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(key.split(".")))
    indent = "  " * (key.count(".") + 1)
    (tmp_path / "conf" / "experiment" / "shared.yaml").write_text(
        f"# @package _global_\n{nested}"
        f"{indent}_target_: pipeline.runs.manifest.git_commit\n"
        f"{indent}path: ${{data.path}}\n"
    )
    proc = _train_cli(
        tmp_path,
        f"--config-dir={tmp_path / 'conf'}",
        "experiment=shared",
        "data=folder",
        f"data.path={tmp_path / 'dataset'}",
    )
    _refused_in_one_line(proc, f"{key}._target_='pipeline.runs.manifest.git_commit'")
    assert not canary.exists()


def test_a_multirun_launcher_target_is_checked_before_hydra_builds_it(tmp_path):
    proc = _train_cli(tmp_path, "-m", "hydra.launcher._target_=os.system")
    _refused_in_one_line(proc, "hydra.launcher._target_='os.system'")
    assert not (tmp_path / "multirun.yaml").exists() and not (tmp_path / "outputs").exists()


def _delete_payload(folder) -> str:
    return (
        "{_target_:pipeline.exporting.export_saved_model,model:null,path:"
        f"{folder},class_names:[a],image_size:32,resize:crop}}"
    )


def test_a_command_line_target_cannot_delete_a_folder(tmp_path):
    canary = tmp_path / "keep"
    canary.mkdir()
    (canary / "file").write_text("precious")
    proc = _train_cli(tmp_path, f"+optimizer.name={_delete_payload(canary)}")
    _refused_in_one_line(proc, "optimizer.name._target_='pipeline.exporting.export_saved_model'")
    assert (canary / "file").read_text() == "precious"


def test_a_shared_runs_saved_config_is_checked_before_resume(tmp_path):
    canary = tmp_path / "keep"
    canary.mkdir()
    (canary / "file").write_text("precious")
    run = tmp_path / "shared_run"
    (run / ".hydra").mkdir(parents=True)
    (run / "backup").mkdir()
    (run / "backup" / "ckpt-1.npz").write_bytes(b"")
    saved = OmegaConf.to_container(compose([]), resolve=False)
    saved["optimizer"]["name"] = OmegaConf.to_container(
        OmegaConf.create(_delete_payload(canary).replace(":", ": ").replace(",", ", "))
    )
    OmegaConf.save(OmegaConf.create(saved), run / ".hydra" / "config.yaml")
    with pytest.raises(PipelineError, match=r"resume: .*config\.yaml: optimizer\.name\._target_"):
        target.saved_config(run)
    proc = _train_cli(tmp_path, f"resume={run}")
    _refused_in_one_line(proc, "optimizer.name._target_='pipeline.exporting.export_saved_model'")
    assert (canary / "file").read_text() == "precious"
    assert not (tmp_path / "out" / "model.keras").exists()


def test_oversized_and_non_image_files_are_refused_without_decoding(run_dir, tmp_path, monkeypatch):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(good)
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    png_header_only(tmp_path / "big.png", 1200, 1200)  # 1.44 M > the run's 1 M
    (tmp_path / "notes.png").write_text("not pixels")
    decoded = []
    real = predict_module.read_image
    monkeypatch.setattr(
        predict_module, "read_image", lambda p, **kw: decoded.append(p) or real(p, **kw)
    )
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
