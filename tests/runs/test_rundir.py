"""One process per run dir: unique default dirs, the lock, and finished runs left unchanged."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.errors import PipelineError
from pipeline.runs import rundir

REPO = Path(__file__).resolve().parents[2]
QUICK = ["data.image_size=16", "model.width=4", "trainer.verbose=0", "export.formats=[]"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HOLD_LOCK = (  # a live process holding a run dir's lock until its stdin closes
    "import sys; from pipeline.runs import rundir; rundir.acquire(sys.argv[1]); "
    "print('locked', flush=True); sys.stdin.read()"
)


def _cli(cwd: Path, module: str, *args: str, timeout=240, popen=False):
    cmd = [sys.executable, "-m", module, *args]
    kwargs = {"cwd": cwd, "env": ENV, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    if popen:
        return subprocess.Popen(cmd, text=True, **kwargs)
    return subprocess.run(cmd, text=True, timeout=timeout, **kwargs)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "Traceback"))]


def test_two_runs_started_together_get_their_own_directories(tmp_path):
    """Before: both got outputs/<date>/<time>/ when started in the same second."""
    jobs = [_cli(tmp_path, "pipeline.train", *QUICK, "trainer.epochs=1", popen=True)]
    jobs.append(_cli(tmp_path, "pipeline.train", *QUICK, "trainer.epochs=1", popen=True))
    for job in jobs:
        _, err = job.communicate(timeout=240)
        assert job.returncode == 0, err[-2000:]
    runs = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/metrics.json"))
    assert len(runs) == 2
    for run in runs:
        assert re.fullmatch(r"\d\d-\d\d-\d\d-[0-9a-f]{6}", run.name), run.name
        assert not (run / rundir.LOCK_FILE).exists()  # released at the end


def test_run_id_is_fixed_in_a_process_and_differs_between_processes():
    code = "from pipeline.runs import rundir; print(rundir.run_id(), rundir.run_id())"
    ids = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
        first, again = out.stdout.split()
        assert first == again and re.fullmatch(r"[0-9a-f]{6}", first)
        ids.append(first)
    assert ids[0] != ids[1]


def test_a_second_process_on_a_live_run_dir_is_one_line_and_exit_2(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run)],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = _cli(tmp_path, "pipeline.train", *QUICK, f"hydra.run.dir={run}")
        assert second.returncode == 2, second.stderr[-2000:]
        (line,) = _error_lines(second.stderr)
        assert f"{run} is in use by another run (pid {holder.pid}" in line
        assert not (run / ".hydra").exists()  # refused before Hydra wrote anything
    finally:
        holder.communicate("", timeout=30)
    with rundir.locked(run):  # its holder gone (it never released it): taken over
        assert (run / rundir.LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_the_lock_is_counted_in_a_process_refused_to_others_and_taken_over_when_stale(
    tmp_path, caplog
):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    (tmp_path / rundir.LOCK_FILE).write_text(f"{dead}\n")  # left by a run killed with -9
    caplog.set_level("INFO")
    with rundir.locked(tmp_path):
        assert f"taking over the lock of pid {dead}" in caplog.text
        assert (tmp_path / rundir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with rundir.locked(tmp_path):  # the same process again (Hydra's callback, then train)
            pass
        assert (tmp_path / rundir.LOCK_FILE).is_file()
        code = f"from pipeline.runs import rundir; rundir.acquire({str(tmp_path)!r})"
        other = subprocess.run(
            [sys.executable, "-c", code], env=ENV, capture_output=True, text=True
        )
        assert f"in use by another run (pid {os.getpid()}" in other.stderr
    assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_a_finished_run_is_refused_before_hydra_rewrites_its_config(tmp_path, tiny_runs):
    """Before: refused, but only after .hydra/config.yaml held the other model."""
    run = tiny_runs("trainer.epochs=1").copy_to(tmp_path / "run").path
    config = (run / ".hydra" / "config.yaml").read_bytes()
    other = _cli(tmp_path, "pipeline.train", "model=resnet20", f"hydra.run.dir={run}")
    assert other.returncode == 2, other.stderr[-2000:]
    (line,) = _error_lines(other.stderr)
    assert f"hydra.run.dir={run} holds a finished run" in line
    assert (run / ".hydra" / "config.yaml").read_bytes() == config
    assert not (run / ".hydra" / "hydra.yaml").exists()
    evaluated = _cli(tmp_path, "pipeline.evaluate", f"run_dir={run}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert (run / "eval" / "report.json").is_file()
    exported = _cli(tmp_path, "pipeline.export", f"run_dir={run}")
    assert exported.returncode == 0, exported.stderr[-2000:]


def _unfinished(tmp_path: Path, arch: str) -> Path:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    cfg = {"model": {"arch": arch}, "data": {"source": "digits", "batch_size": 64}}
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return run


def test_an_unfinished_run_of_another_model_is_refused_and_of_the_same_accepted(tmp_path):
    run = _unfinished(tmp_path, "cnn")
    same = OmegaConf.create(
        {"model": {"arch": "cnn"}, "data": {"source": "digits", "batch_size": 64}}
    )
    rundir.check_run_dir(run, same)  # a sweep re-running a killed job in its own dir
    other = OmegaConf.merge(same, {"model": {"arch": "resnet20"}})
    with pytest.raises(PipelineError, match=r"another model \(run: \{'arch': 'cnn'\}"):
        rundir.check_run_dir(run, other)
