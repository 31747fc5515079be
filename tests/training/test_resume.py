"""Resume after SIGKILL and SIGTERM, atomic and corrupt backups, NaN stops, deterministic runs."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.errors import PipelineError
from pipeline.models import build
from pipeline.runs import hashes
from pipeline.runs import target as runs
from pipeline.training import backups as resume
from pipeline.training import callbacks

REPO = Path(__file__).resolve().parents[2]
RESUMABLE = [  # not conftest.TINY: digits at batch 64 (STEPS_PER_EPOCH), deterministic, logged
    "data.image_size=16",
    "model.width=4",
    "trainer.verbose=2",
    "trainer.confusion_matrix_every=0",
    "trainer.deterministic=true",
    "export.formats=[]",
]
STEPS_PER_EPOCH = 21  # digits: 1,295 training images at batch 64
FINISHING = [*(o for o in RESUMABLE if not o.startswith("export.")), "export.formats=[saved_model]"]


def _train(tmp_path, name, *overrides, env=None, timeout=240, base=RESUMABLE):
    """Runs ``python -m pipeline.train`` with its run dir at ``tmp_path/name``."""
    cmd = [sys.executable, "-m", "pipeline.train", *base, *overrides]
    cmd.append(f"hydra.run.dir={tmp_path / name}")
    return subprocess.run(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _weights(run_dir: Path) -> list[np.ndarray]:
    arrays = []
    with h5py.File(run_dir / "checkpoints" / "last.weights.h5") as f:
        f.visititems(lambda _, o: arrays.append(o[()]) if isinstance(o, h5py.Dataset) else None)
    return arrays


def _states(run_dir: Path) -> list[dict]:
    return [resume.read_state(p) for p in resume.backups(run_dir / "backup")]


def _epoch_steps(run_dir: Path, tag="epoch/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted((run_dir / "tensorboard" / "train").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["tensors"]:  # TF2 summaries store scalars as tensors
            steps += [e.step for e in acc.Tensors(tag)]
    return steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    done = _train(tmp, "run", "trainer.epochs=3")
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / "run"


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted):
    killed = _train(tmp_path, "run", "trainer.epochs=3", env={callbacks.KILL_HOOK: "2:5"})
    assert killed.returncode == -9  # SIGKILL: no cleanup ran
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists()
    assert [(s["epoch"], s["step"]) for s in _states(run)] == [(1, 0)]  # the epoch-1 backup

    resumed = _train(tmp_path, "resume_log", f"resume={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {run / 'backup'}" in resumed.stdout and "at epoch 2" in resumed.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["resumed_from"]["epoch"] == 1
    assert len(json.loads((run / "history.json").read_text())["loss"]) == 3
    assert sorted(_epoch_steps(run)) == [0, 1, 2]  # TensorBoard continues, no step twice
    full, again = _weights(uninterrupted), _weights(run)
    assert len(full) == len(again) > 10
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a, b)  # deterministic: bit-identical


def test_two_deterministic_runs_give_identical_weights(tmp_path, uninterrupted):
    again = _train(tmp_path, "run", "trainer.epochs=3")
    assert again.returncode == 0, again.stderr[-2000:]
    for a, b in zip(_weights(uninterrupted), _weights(tmp_path / "run"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mid_epoch_step_backup_resumes_where_it_stopped(tmp_path):
    every = ["trainer.epochs=2", "trainer.backup_every_steps=4"]
    killed = _train(tmp_path, "run", *every, env={callbacks.KILL_HOOK: "2:10"})
    assert killed.returncode == -9
    run = tmp_path / "run"
    assert (_states(run)[0]["epoch"], _states(run)[0]["step"]) == (1, 8)  # newest: step 8

    resumed = _train(tmp_path, "resume_log", f"resume={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at epoch 2, step 8" in resumed.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"] == {"backup": "ckpt-000000029.npz", "epoch": 1, "step": 8}
    assert metrics["epochs"] == 2
    # the resumed epoch ran only the 13 batches left: 42 optimizer steps in all, not 50
    assert _states(run)[0]["iterations"] == 2 * STEPS_PER_EPOCH


def test_sigterm_saves_a_backup_exits_143_and_resumes(tmp_path):
    term = _train(tmp_path, "run", "trainer.epochs=2", env={callbacks.KILL_HOOK: "1:6:TERM"})
    assert term.returncode == 143, term.stderr[-2000:]
    assert "stopped by SIGTERM at epoch 1, step 7" in term.stderr
    run = tmp_path / "run"
    assert f"resume={run}" in term.stderr
    assert (_states(run)[0]["epoch"], _states(run)[0]["step"]) == (0, 7)

    resumed = _train(tmp_path, "resume_log", f"resume={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


def test_nan_stops_with_epoch_and_step_and_keeps_the_last_good_backup(tmp_path):
    bad = _train(tmp_path, "run", "trainer.epochs=3", env={callbacks.NAN_HOOK: "2:3"})
    assert bad.returncode == 2
    assert "the loss became nan at epoch 2, step 3" in bad.stderr
    run = tmp_path / "run"
    assert f"{run / 'backup'}" in bad.stderr and "lower optimizer.lr" in bad.stderr
    states = _states(run)
    assert [(s["epoch"], s["step"]) for s in states] == [(1, 0)]
    assert all(np.isfinite(states[0]["history"]["loss"]))


@pytest.mark.parametrize("step", ["save", "export"])  # evaluate: the test below
def test_a_run_killed_after_training_is_finished_by_resume(tmp_path, step):
    """Before: resume= said "nothing to resume"; evaluate and export refused the run."""
    kill = {callbacks.KILL_AFTER_TRAINING_HOOK: step}
    killed = _train(tmp_path, "run", "trainer.epochs=1", env=kill, base=FINISHING)
    assert killed.returncode == -9
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists()

    resumed = _train(tmp_path, "resume_log", f"resume={run}", base=FINISHING)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "finishing the run" in resumed.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["resumed_from"]["epoch"] == 1
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["export_max_abs_diff"] < 1e-3
    assert _states(run)[0]["iterations"] == STEPS_PER_EPOCH  # no step trained again
    artifacts = json.loads((run / "manifest.json").read_text())["artifacts"]
    assert artifacts["model.keras"] == hashes.sha256_file(run / "model.keras")
    assert "export/saved_model" in artifacts and (run / "export" / "parity.json").is_file()
    assert not list(run.glob(".*.keras")) and not (run / ".lock").exists()

    again = _train(tmp_path, "again_log", f"resume={run}", base=FINISHING)
    assert again.returncode == 2 and "nothing to resume" in again.stderr


def test_a_run_killed_in_its_final_evaluation_resumes_to_the_uninterrupted_result(
    tmp_path, uninterrupted
):
    kill = {callbacks.KILL_AFTER_TRAINING_HOOK: "evaluate"}
    assert _train(tmp_path, "run", "trainer.epochs=3", env=kill).returncode == -9
    run = tmp_path / "run"
    resumed = _train(tmp_path, "resume_log", f"resume={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full = json.loads((uninterrupted / "metrics.json").read_text())
    done = json.loads((run / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "val_accuracy", "train_loss", "best_epoch"):
        assert done[key] == full[key], key
    a, b = (keras.saving.load_model(r / "model.keras") for r in (uninterrupted, run))
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_of_a_dir_with_a_junk_backup_is_one_line_and_exit_2(tmp_path):
    kill = {callbacks.KILL_AFTER_TRAINING_HOOK: "evaluate"}
    assert _train(tmp_path, "run", "trainer.epochs=1", env=kill).returncode == -9
    run = tmp_path / "run"
    (backup,) = resume.backups(run / "backup")
    state = np.frombuffer(json.dumps([1, 2]).encode(), np.uint8)  # a state that is no dict
    np.savez(backup, __state__=state)
    junk = _train(tmp_path, "resume_log", f"resume={run}")
    assert junk.returncode == 2, junk.stderr[-2000:]
    errors = [ln for ln in junk.stderr.splitlines() if ln.startswith(("error:", "Traceback"))]
    assert len(errors) == 1 and f"backup {backup} is unreadable" in errors[0]
    assert "move that folder away" in errors[0]


def test_a_full_disk_during_training_names_the_file_and_keeps_the_last_backup(
    tmp_path, monkeypatch
):
    """Before: an OSError traceback (exit code 1) that said nothing of the backups."""
    from conftest import TINY, compose
    from pipeline.train import train

    savez, calls = np.savez, []

    def fills_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the second backup: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        savez(*args, **kwargs)

    monkeypatch.setattr(resume.np, "savez", fills_the_disk)
    run = tmp_path / "run"
    with pytest.raises(PipelineError) as stopped:
        train(compose([*TINY, "trainer.epochs=2", "export.formats=[]"]), run_dir=run)
    (kept,) = resume.backups(run / "backup")
    assert resume.read_state(kept)["epoch"] == 1
    message = str(stopped.value)
    assert message.startswith(f"the disk is full: writing {run / 'backup' / 'ckpt-'}")
    assert f"the last backup, {kept}, is whole" in message and f"resume={run}" in message
    assert not list((run / "backup").glob(".*.tmp")) and not (run / "metrics.json").exists()
    assert not (run / ".lock").exists()


def test_a_full_disk_without_an_errno_is_recognised_by_its_text(tmp_path):
    from pipeline import train as command

    h5py_style = OSError(
        "Unable to synchronously create file (file write failed: errno = 28, "
        "error message = 'No space left on device')"
    )
    match = r"the disk is full: writing a file under .*no backup"
    with pytest.raises(PipelineError, match=match), command._full_disk_is_one_line(tmp_path):
        raise h5py_style


# Backups written and read in this process, on a small model: no training.


def _compiled(seed=0, width=4):
    keras.utils.set_random_seed(seed)
    model = build(
        "cnn", num_classes=3, input_shape=(16, 16, 3), width=width, mean=[0.5] * 3, std=[0.2] * 3
    )
    model.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


SIGNATURE = {"model": {"arch": "cnn"}, "batch_size": 8, "data_fingerprint": "abc"}


def _save(directory, model, epoch):
    model.optimizer.iterations.assign(epoch * 10)
    return resume.save(
        directory,
        model,
        epoch=epoch,
        step=0,
        history={"loss": [1.0] * epoch},
        best=0.5,
        signature=SIGNATURE,
    )


def test_restore_puts_back_weights_and_optimizer_state_and_keeps_two(tmp_path):
    model = _compiled()
    for epoch in (1, 2, 3):
        path = _save(tmp_path, model, epoch)
    assert [p.name for p in resume.backups(tmp_path)] == [path.name, "ckpt-000000020.npz"]
    assert not list(tmp_path.glob(".*.tmp"))  # written to a temporary name, then renamed
    saved = [keras.ops.convert_to_numpy(v) for v in model.variables]
    other = _compiled(seed=1)
    restored = resume.restore(tmp_path, other, SIGNATURE)
    assert (restored.epoch, restored.step, restored.best) == (3, 0, 0.5)
    assert int(other.optimizer.iterations) == 30
    for a, b in zip(saved, other.variables, strict=True):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))


def test_a_corrupt_newest_backup_falls_back_to_the_one_before(tmp_path, caplog):
    model = _compiled()
    _save(tmp_path, model, 1)
    newest = _save(tmp_path, model, 2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    (tmp_path / ".ckpt-000000030.npz.tmp").write_bytes(b"half a file")  # a crash mid-save
    restored = resume.restore(tmp_path, _compiled(seed=1), SIGNATURE)
    assert restored.epoch == 1 and restored.path.name == "ckpt-000000010.npz"
    assert f"backup {newest} is unreadable" in caplog.text


def test_when_every_backup_is_corrupt_it_refuses_to_start_over(tmp_path):
    model = _compiled()
    for epoch in (1, 2):
        _save(tmp_path, model, epoch).write_bytes(b"not a zip file")
    with pytest.raises(PipelineError, match=r"every backup in .* is unreadable.*move that folder"):
        resume.restore(tmp_path, _compiled(), SIGNATURE)


def test_a_backup_of_another_model_or_batch_size_is_refused(tmp_path):
    _save(tmp_path, _compiled(), 1)
    other = {**SIGNATURE, "batch_size": 16}
    with pytest.raises(PipelineError, match=r"data.batch_size \(run: 8, now: 16\)"):
        resume.restore(tmp_path, _compiled(), other)
    with pytest.raises(PipelineError, match=r"its model variables do not match"):
        resume.restore(tmp_path, _compiled(width=8), SIGNATURE)


# Which run resume= picks (config level: no TensorFlow needed).


def _fake_run(root: Path, name: str, cfg: dict, *, finished=False, mtime=0.0) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    choices = {"model": cfg["model"]["arch"], "data": cfg["data"]["source"], "hydra/launcher": "x"}
    hydra = {"hydra": {"runtime": {"choices": choices}}}
    (run / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(hydra)))
    (run / "backup").mkdir()
    backup = run / "backup" / "ckpt-000000010.npz"
    backup.write_bytes(b"x")
    os.utime(backup, (mtime, mtime))
    if finished:
        (run / "metrics.json").write_text("{}")
    return run


def _cfg(arch="cnn", batch=64, epochs=3, path=None):
    data = {"source": "digits", "batch_size": batch, "image_size": 16, "path": path}
    return {"model": {"arch": arch}, "data": data, "trainer": {"epochs": epochs}, "resume": None}


def test_resume_auto_picks_the_newest_unfinished_run_with_the_same_settings(tmp_path):
    _fake_run(tmp_path, "old", _cfg(), mtime=1000)
    newest = _fake_run(tmp_path, "new", _cfg(), mtime=2000)
    _fake_run(tmp_path, "done", _cfg(), finished=True, mtime=3000)
    _fake_run(tmp_path, "other", _cfg(arch="resnet20"), mtime=4000)
    cfg = OmegaConf.create({**_cfg(), "resume": "auto"})
    run_dir, _ = runs.resolve(cfg, ["resume=auto"], tmp_path)
    assert run_dir == newest
    with pytest.raises(PipelineError, match=r"found no unfinished run .* \(3 unfinished"):
        runs.resolve(OmegaConf.create({**_cfg(batch=32), "resume": "auto"}), [], tmp_path)


def test_resume_a_dir_uses_its_config_and_refuses_what_cannot_change(tmp_path):
    run = _fake_run(tmp_path, "run", _cfg(path="/data/a"))
    now = OmegaConf.create({**_cfg(epochs=9), "resume": str(run)})  # the defaults, not the run's
    again = [f"resume={run}", "model=cnn", "data=digits", "trainer.epochs=9"]  # its own groups
    run_dir, cfg = runs.resolve(now, again, tmp_path)
    assert run_dir == run and cfg.trainer.epochs == 9 and cfg.data.path == "/data/a"
    assert cfg.resume is None
    bigger = OmegaConf.create({**_cfg(batch=128), "resume": str(run)})
    with pytest.raises(PipelineError, match=r"data.batch_size \(run: 64, now: 128\)"):
        runs.resolve(bigger, [f"resume={run}", "data.batch_size=128"], tmp_path)
    other = OmegaConf.create({**_cfg(arch="inception"), "resume": str(run)})
    with pytest.raises(PipelineError, match=r"model=inception differs from the run's model"):
        runs.resolve(other, [f"resume={run}", "model=inception"], tmp_path)
    with pytest.raises(PipelineError, match=r"has no .hydra/config.yaml"):
        runs.resolve(OmegaConf.create({**_cfg(), "resume": str(tmp_path)}), [], tmp_path)


def test_deterministic_keeps_xla_off_on_a_gpu_under_auto():
    from pipeline.training import devices as trainer

    gpu = trainer.Devices(gpus=[{"name": "GPU:0", "compute_capability": [9, 0]}], cpus=["CPU:0"])
    kwargs = {"strategy": "auto", "precision": "auto", "jit_compile": "auto", "devices": gpu}
    assert trainer.plan(**kwargs).jit_compile is True
    plan = trainer.plan(**kwargs, deterministic=True)
    assert (
        plan.jit_compile is False
        and "jit_compile auto -> False (trainer.deterministic)" in plan.reasons
    )
    assert trainer.plan(**{**kwargs, "jit_compile": True}, deterministic=True).jit_compile is True


def test_float16_overflow_skips_the_step_instead_of_stopping():
    from pipeline.training import loop as trainer

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build(
            "cnn", num_classes=3, input_shape=(16, 16, 3), width=4, mean=[0.5] * 3, std=[0.2] * 3
        )
        trainer._compile(
            model,
            keras.optimizers.SGD(0.1),
            jit_compile=False,
            label_smoothing=0.0,
            steps_per_execution=1,
            num_classes=3,
        )
        x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
        y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
        model.train_on_batch(x, y)  # builds the optimizer
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        model.optimizer.dynamic_scale.assign(2.0**60)  # scaled float16 gradients overflow
        before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
        loss = model.train_on_batch(x, y, return_dict=True)["loss"]
        assert np.isfinite(loss)  # RunState stops only on a non-finite loss
        assert float(model.optimizer.dynamic_scale) == 2.0**59  # halved, and the step skipped
        for a, b in zip(before, model.trainable_variables, strict=True):
            np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_nan_weights_behind_a_finite_loss_stop_at_the_epoch_end(tmp_path):
    model = _compiled()
    state = callbacks.RunState(tmp_path, signature=SIGNATURE)
    state.set_model(model)
    state.on_epoch_begin(0)
    state.on_epoch_end(0, {"loss": 1.0})
    assert state.non_finite is None and len(resume.backups(tmp_path)) == 1
    kernel = model.trainable_variables[0]  # a NaN a ReLU can turn into a finite loss
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    state.on_epoch_begin(1)
    state.on_epoch_end(1, {"loss": 0.5})
    assert state.non_finite == {"epoch": 2, "step": 0, "loss": "weights"} and model.stop_training
    (kept,) = resume.backups(tmp_path)
    assert resume.read_state(kept)["epoch"] == 1  # the bad state was not backed up


def test_a_file_gone_after_training_stops_the_resume_and_it_finishes_once_restored(
    tmp_path, tiny_folder
):
    """Issue 15, item 4: a vanished image is one line; put back, ``resume=`` finishes the run."""
    images = Path(shutil.copytree(tiny_folder, tmp_path / "images"))
    folder = [
        "data=folder",
        f"data.path={images}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.batch_size=8",
        "trainer.epochs=1",
    ]
    kill = {callbacks.KILL_AFTER_TRAINING_HOOK: "evaluate"}
    killed = _train(tmp_path, "run", *folder, env=kill)
    assert killed.returncode != 0 and not (tmp_path / "run" / "metrics.json").exists()
    moved = sorted((images / "cat").iterdir())[0]
    moved.rename(tmp_path / moved.name)
    gone = _train(tmp_path, "again", f"resume={tmp_path / 'run'}")
    assert gone.returncode == 2, gone.stderr[-2000:]
    assert gone.stderr.strip().splitlines()[-1].startswith("error: cannot resume from")
    assert "fingerprint" in gone.stderr and not (tmp_path / "run" / "metrics.json").exists()
    (tmp_path / moved.name).rename(moved)
    back = _train(tmp_path, "again", f"resume={tmp_path / 'run'}")
    assert back.returncode == 0, back.stderr[-2000:]
    assert "finishing the run" in back.stdout + back.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_accuracy"] >= 0
