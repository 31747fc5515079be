"""One process per run directory: a unique default name, a lock, and a guard before Hydra writes.

- The default ``hydra.run.dir`` ends in ``${run_id:}``, a short random id drawn
  once per process, so two runs started in the same second get two directories.
- :func:`locked` holds ``<run_dir>/.lock`` (an ``flock`` on a file holding the
  pid) while a run writes there; a second process is refused with the holder's
  pid. The kernel drops the lock when its process dies, however it dies, so the
  lock file a killed run leaves behind is taken over.
- :class:`RunDirGuard`, a Hydra callback, runs before Hydra writes ``.hydra/``
  into the run directory: it refuses a finished run, a run of another model,
  batch size or data, and a directory another process holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import secrets
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import PipelineError
from pipeline.runs import target

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_ID_RESOLVER = "run_id"
_HELD: dict[Path, list] = {}  # run dir -> [open lock file, how many holders in this process]


@functools.cache
def run_id() -> str:
    """This process's short random id (6 hex digits), the same at every call."""
    return secrets.token_hex(3)


def register_resolvers() -> None:
    """Registers ``${run_id:}`` with OmegaConf; call before Hydra composes the config."""
    OmegaConf.register_new_resolver(RUN_ID_RESOLVER, run_id, replace=True)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def acquire(run_dir: str | os.PathLike) -> None:
    """Takes ``run_dir``'s lock for this process (again: counted, see :func:`release`).

    Raises:
        PipelineError: another live process holds it.
    """
    run_dir = Path(os.path.abspath(run_dir))
    if run_dir in _HELD:
        _HELD[run_dir][1] += 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (kept open while the lock is held)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise PipelineError(
                f"{run_dir} is in use by another run (pid {_holder(path)}, in {LOCK_FILE}): "
                "wait for it to end, or pick another directory."
            ) from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break  # else its holder removed the file as we opened it: lock the new one
        handle.close()
    stale = _holder(path)
    if stale != "unknown" and stale != str(os.getpid()):
        log.info("taking over the lock of pid %s in %s (no longer running)", stale, run_dir)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD[run_dir] = [handle, 1]


def release(run_dir: str | os.PathLike) -> None:
    """Drops one hold of ``run_dir``'s lock; the last removes the lock file."""
    run_dir = Path(os.path.abspath(run_dir))
    held = _HELD.get(run_dir)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[run_dir]
    with contextlib.suppress(OSError):
        (run_dir / LOCK_FILE).unlink()
    held[0].close()


@contextlib.contextmanager
def locked(run_dir: str | os.PathLike):
    """Holds ``run_dir``'s lock for the ``with`` block (see :func:`acquire`)."""
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def _in_cluster() -> bool:
    """Workers of one multi-worker run share a run dir (= ``distributed.cluster_source()``)."""
    env = os.environ
    tasks = env.get("SLURM_STEP_NUM_TASKS", "0") if env.get("SLURM_PROCID") else "0"
    return bool(env.get("TF_CONFIG")) or (tasks.isdigit() and int(tasks) > 1)


def check_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Refuses a new run in a finished run's directory, or one of other settings.

    Raises:
        PipelineError: ``run_dir`` holds a finished run, or an unfinished one
            with another model, batch size or data.
    """
    if (run_dir / target.FINISHED).exists():
        raise PipelineError(
            f"hydra.run.dir={run_dir} holds a finished run: a new run would overwrite its "
            "config and results. Leave hydra.run.dir out for a new directory, or train it "
            f"longer with resume={run_dir} trainer.epochs=N."
        )
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        differences = target.config_differences(OmegaConf.load(saved), cfg)
        if differences:
            raise PipelineError(
                f"hydra.run.dir={run_dir} holds a run with another "
                + "; ".join(differences)
                + ". Pick another directory."
            )


class RunDirGuard(Callback):
    """Hydra callback: checks and locks the run dir before Hydra writes ``.hydra/`` there.

    A refusal is one line on stderr and exit status 2, as for any user error.
    """

    def __init__(self) -> None:
        self.run_dir: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            run_dir = Path(os.path.abspath(str(config.hydra.run.dir)))
        except Exception:  # an interpolation Hydra resolves only later: train() still locks
            return
        try:
            check_run_dir(run_dir, config)
            if not _in_cluster():
                acquire(run_dir)
                self.run_dir = run_dir
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        if self.run_dir is not None:
            release(self.run_dir)
