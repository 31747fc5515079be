"""Multirun sweeps: per-job failure records, one GPU per parallel job, the sweep summary.

A job of a sweep that fails leaves ``failed.json`` (its reason) in its directory
and returns the worst objective, so the sweep goes on. A job whose process is
killed outright (SIGKILL, as the out-of-memory killer does) cannot: with
``launcher=joblib``, :func:`relaunch_unfinished` runs the jobs left unfinished
again, one process each, and records those that die again. :class:`SweepSummary`
(a Hydra callback) names each job's directory by the overrides that vary between
jobs (``<number>_<key>=<value>,...``, :func:`job_dirname`), which TensorBoard
shows as the run names; after the sweep it reads every job directory, writes
``summary.md`` and ``summary.csv`` in the sweep directory, sorted by the
objective, and the sweep's HParams layout (``pipeline.runs.hparams.log_sweep``).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import math
import os
import re
import signal
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import yaml
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf, open_dict, read_write

log = logging.getLogger("pipeline.runs.sweep")

DIRECTIONS = ("maximize", "minimize")
FAILED_FILE = "failed.json"
METRICS_FILE = "metrics.json"
SUMMARY_METRICS = ("val_accuracy", "test_accuracy", "val_loss", "wall_time_s")
CRASH_REASON = "crashed: worker process killed (SIGKILL? out of memory?)"
KILL_JOB_ENV = "PIPELINE_TEST_KILL_JOB"  # test hook only: the number of the job to SIGKILL
JOB_DIR_RESOLVER = (
    "sweep_job_dir"  # ${sweep_job_dir:${hydra.job.num},${hydra.job.override_dirname}}
)
MAX_JOB_DIR = 96  # characters of a job directory's name, at most
UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")  # in a job directory's name: replaced by "_"
LONG_NUMBER = re.compile(r"\d+\.\d{5,}(?:[eE][-+]?\d+)?|\d+(?:\.\d+)?[eE][-+]?\d+")  # 0.0123456
_GPU_LOCK = None  # the open lock file of the GPU this process holds, for its whole life


def job_dirname(num, overrides: str = "") -> str:
    """A job's directory name: its number, then its overrides, safe and short.

    ``3`` and ``model=resnet20,optimizer.lr=0.1`` give
    ``3_model=resnet20,optimizer.lr=0.1``; numbers are cut to 4 significant
    digits (``optimizer.lr=0.0123456789`` -> ``0.01235``), characters other than
    letters, digits and ``._,=+-`` become ``_`` and the name stops at
    :data:`MAX_JOB_DIR` characters. The number keeps names unique and in order.

    Args:
        num: the job's number (``hydra.job.num``).
        overrides: ``hydra.job.override_dirname``.
    """
    short = LONG_NUMBER.sub(lambda m: f"{float(m[0]):.4g}", str(overrides or ""))
    name = f"{num}_{UNSAFE.sub('_', short)}" if short else str(num)
    return name[:MAX_JOB_DIR]


def register_resolvers() -> None:
    """Registers ``${sweep_job_dir:num,overrides}`` (:func:`job_dirname`) with OmegaConf."""
    OmegaConf.register_new_resolver(JOB_DIR_RESOLVER, job_dirname, replace=True)


def constant_overrides(task_overrides: Sequence[str]) -> list[str]:
    """The keys a multirun's command line sets to one value (``trainer.epochs=1``), not swept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    last = {}  # a key given twice: the last one counts, as in Hydra's sweepers
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        last[override.key_or_group] = override
    return [key for key, override in last.items() if not override.is_sweep_override()]


def worst_value(direction: str) -> float:
    """The objective that sorts last: -inf when maximizing, +inf when minimizing.

    Optuna accepts infinities as the value of a complete trial (NaN would fail it).

    Raises:
        ValueError: ``direction`` is not maximize or minimize.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"objective.direction must be maximize or minimize, got {direction!r}")
    return -math.inf if direction == "maximize" else math.inf


def record_failure(
    job_dir: str | os.PathLike, error: BaseException, reason: str | None = None
) -> None:
    """Writes ``<job_dir>/failed.json`` with the error's type and ``reason`` (its message)."""
    path = Path(job_dir)
    path.mkdir(parents=True, exist_ok=True)
    reason = reason or str(error) or type(error).__name__
    payload = {"status": "failed", "error": type(error).__name__, "reason": reason}
    (path / FAILED_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    log.error("Job in %s failed (%s): %s; the sweep goes on", path, type(error).__name__, reason)


def kill_job_for_tests(job_num: int) -> None:
    """Test hook: SIGKILLs this job's process, as the OOM killer would, when the
    ``PIPELINE_TEST_KILL_JOB`` environment variable holds ``job_num``; else does nothing."""
    if os.environ.get(KILL_JOB_ENV) == str(job_num):
        log.warning("%s=%d: killing this job's process (SIGKILL), for tests", KILL_JOB_ENV, job_num)
        os.kill(os.getpid(), signal.SIGKILL)


def finished_objective(job_dir: str | os.PathLike, metric: str, direction: str) -> float | None:
    """The objective a job that ran to its end returned, read back from its directory.

    Returns:
        The worst value for a job that left ``failed.json``; ``metric`` from its
        ``metrics.json`` (the worst value if missing or not finite); None for a
        job that left neither (killed, or never started).
    """
    path = Path(job_dir)
    if (path / FAILED_FILE).is_file():
        return worst_value(direction)
    if not (path / METRICS_FILE).is_file():
        return None
    value = json.loads((path / METRICS_FILE).read_text()).get(metric)
    finite = isinstance(value, (int, float)) and math.isfinite(value)
    return float(value) if finite else worst_value(direction)


def relaunch_unfinished(
    launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, error: BaseException
) -> list[JobReturn]:
    """Finishes a joblib batch that a killed worker process broke.

    Jobs that left ``metrics.json`` or ``failed.json`` keep their result; the
    others run again one at a time, each in a fresh one-process loky pool
    (``joblib.Parallel(n_jobs=1)`` would run them in this process, which a kill
    would take down), through the joblib launcher's own ``execute_job``. A job
    killed again gets ``failed.json`` (:data:`CRASH_REASON`) and the worst objective.

    Args:
        launcher: the ``JoblibLauncher`` whose ``launch`` raised ``error``.
        job_overrides: the batch's overrides, one list per job.
        initial_job_idx: the number of the batch's first job.
        error: the ``BrokenProcessPool`` (loky's ``TerminatedWorkerError``) raised.

    Returns:
        One ``JobReturn`` per job, in order, all COMPLETED so the sweep goes on.

    Raises:
        BrokenProcessPool: ``error`` again, with ``sweep.fail_fast=true``.
    """
    from hydra_plugins.hydra_joblib_launcher._core import execute_job
    from joblib.externals.loky import get_reusable_executor

    config, context = launcher.config, launcher.hydra_context
    if config.sweep.fail_fast:
        raise error
    metric, direction = config.objective.metric, config.objective.direction
    jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
    dirs = {num: _job_dir(context, config, overrides, num) for num, overrides in jobs}
    values = {num: finished_objective(dirs[num], metric, direction) for num, _ in jobs}
    unfinished = [num for num, _ in jobs if values[num] is None]
    log.warning(
        "A job process was killed (%s); re-running job(s) %s one at a time",
        type(error).__name__,
        ", ".join(f"#{num}" for num in unfinished),
    )
    singleton_state = Singleton.get_state()
    returns = []
    for num, overrides in jobs:
        ret = None
        if values[num] is None:
            args = (num, overrides, context, config, launcher.task_function, singleton_state)
            try:
                ret = get_reusable_executor(max_workers=1).submit(execute_job, *args).result()
            except BrokenProcessPool as crash:
                record_failure(dirs[num], crash, reason=CRASH_REASON)
                values[num] = worst_value(direction)
        if ret is None:  # finished before, or killed again: its value read back
            ret = JobReturn(overrides=overrides, working_dir=str(dirs[num]))
            ret.status, ret.return_value = JobStatus.COMPLETED, values[num]
        returns.append(ret)
    return returns


def _job_dir(context, config, overrides: list[str], num: int) -> Path:
    """The directory job ``num`` runs in, as the joblib launcher's ``execute_job`` sets it up."""
    sweep_config = context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
        sweep_config.hydra.job.num = num
    return Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)


def gpu_count() -> int:
    """NVIDIA GPUs the driver lists, counted without importing TensorFlow."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def claim_gpu(lock_dir: str | os.PathLike, num_gpus: int | None = None) -> int | None:
    """Pins this process to one free GPU through ``CUDA_VISIBLE_DEVICES``.

    Parallel jobs (joblib workers) each take the first GPU nobody holds a lock
    on; the lock lasts as long as the process, which keeps its GPU for all the
    jobs it runs (TensorFlow cannot change devices once started). Does nothing
    when ``CUDA_VISIBLE_DEVICES`` is already set or there are fewer than 2 GPUs.

    Args:
        lock_dir: a directory shared by the jobs of one sweep.
        num_gpus: GPUs to share (default: :func:`gpu_count`).

    Returns:
        The GPU index taken, or None.
    """
    global _GPU_LOCK
    if _GPU_LOCK is not None or "CUDA_VISIBLE_DEVICES" in os.environ:
        return None
    num_gpus = gpu_count() if num_gpus is None else num_gpus
    if num_gpus < 2:
        return None
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    for index in range(num_gpus):
        handle = open(Path(lock_dir) / f"gpu{index}.lock", "w")  # noqa: SIM115 (held for life)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _GPU_LOCK = handle
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        log.info("This job process uses GPU %d (CUDA_VISIBLE_DEVICES=%d)", index, index)
        return index
    log.warning("All %d GPUs are taken by other jobs: this one shares them", num_gpus)
    return None


def collect(sweep_dir: str | os.PathLike, metric: str) -> list[dict]:
    """One row per job directory under ``sweep_dir`` (those holding ``.hydra/overrides.yaml``).

    Returns:
        Rows with ``job``, ``status`` (ok | failed | crashed), ``objective``,
        ``overrides`` (a list), the :data:`SUMMARY_METRICS` found and ``reason``.
    """
    root = Path(sweep_dir)
    rows = []
    for overrides_file in root.glob("**/.hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        row = {
            "job": job_dir.relative_to(root).as_posix(),
            "status": "ok",
            "objective": None,
            "overrides": [o for o in overrides if not o.startswith("hydra.")],
            "reason": "",
        }
        if (job_dir / FAILED_FILE).is_file():
            failure = json.loads((job_dir / FAILED_FILE).read_text())
            row.update(status="failed", reason=f"{failure['error']}: {failure['reason']}")
        elif (job_dir / METRICS_FILE).is_file():
            metrics = json.loads((job_dir / METRICS_FILE).read_text())
            row.update({k: metrics[k] for k in SUMMARY_METRICS if k in metrics})
            row["objective"] = metrics.get(metric)
        else:
            row.update(
                status="crashed", reason="crashed (no metrics.json): killed, or still running"
            )
        rows.append(row)
    return rows


def rank(rows: list[dict], direction: str) -> list[dict]:
    """Sorts rows best first by objective (jobs without a finite one last, by job number)."""
    sign = -1.0 if direction == "maximize" else 1.0

    def key(row):
        value = row["objective"]
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        return (not finite, sign * value if finite else 0.0, _natural(row["job"]))

    return sorted(rows, key=key)


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def write_summary(sweep_dir: str | os.PathLike, *, metric: str, direction: str) -> str:
    """Writes ``summary.md`` and ``summary.csv`` in the sweep dir, best job first.

    Args:
        sweep_dir: Hydra's ``hydra.sweep.dir``.
        metric: the objective, a key of each job's metrics.json.
        direction: maximize or minimize.

    Returns:
        The markdown table.
    """
    worst_value(direction)  # checks the direction
    rows = rank(collect(sweep_dir, metric), direction)
    metrics = [k for k in SUMMARY_METRICS if k != metric and any(k in r for r in rows)]
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    columns = ["rank", "best", "job", "status", metric, *metrics, "overrides", "reason"]
    records = []  # full-precision values, for the CSV
    for i, row in enumerate(rows, start=1):
        best = i == 1 and row["status"] == "ok" and row["objective"] is not None
        record = {
            "rank": i,
            "best": best,
            "job": row["job"],
            "status": row["status"],
            metric: row["objective"],
            **{k: row.get(k) for k in metrics},
            "overrides": " ".join(o for o in row["overrides"] if o not in shared),
            "reason": row["reason"],
        }
        records.append([record[c] for c in columns])
    root = Path(sweep_dir)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([columns, *records])
    (root / "summary.csv").write_text(buffer.getvalue())
    table = [[_fmt(v) for v in record] for record in records]
    for line in table:
        line[0] += " (best)" if line[1] == "True" else ""
    columns, table = [columns[0], *columns[2:]], [[line[0], *line[2:]] for line in table]
    escape = [[cell.replace("|", "\\|") for cell in line] for line in table]
    markdown = "\n".join(
        "| " + " | ".join(line) + " |" for line in [columns, ["---"] * len(columns), *escape]
    )
    title = f"Sweep {root} ({len(rows)} jobs, {direction} {metric})"
    if shared:
        kept = [o for o in rows[0]["overrides"] if o in shared]
        title += "\nEvery job: " + " ".join(kept)
    (root / "summary.md").write_text(f"# {title}\n\n{markdown}\n")
    return f"{title}\n{markdown}"


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


class SweepSummary(Callback):
    """Hydra callback: names the jobs' directories, then writes and prints the sweep summary.

    As the multirun starts, the keys the command line sets to one value join
    ``hydra.job.config.override_dirname.exclude_keys`` (through the overrides
    every job's config is composed with), so ``hydra.job.override_dirname``,
    and the job directories named from it, hold only what varies between jobs.
    After it, ``summary.md``, ``summary.csv`` and the HParams layout.

    Args:
        sweep_dir: the sweep directory (``${hydra.sweep.dir}``).
        metric: the objective metric (``${objective.metric}``).
        direction: maximize or minimize (``${objective.direction}``).
    """

    def __init__(self, sweep_dir: str, metric: str, direction: str) -> None:
        self.sweep_dir = sweep_dir
        self.metric = metric
        self.direction = direction

    def on_multirun_start(self, config, **kwargs) -> None:
        constant = constant_overrides(config.hydra.overrides.task)
        if not constant:
            return
        excluded = [*config.hydra.job.config.override_dirname.exclude_keys, *constant]
        keys = ",".join(repr(key) for key in dict.fromkeys(excluded))
        with read_write(config.hydra.overrides), open_dict(config.hydra.overrides):
            config.hydra.overrides.hydra.append(
                f"hydra.job.config.override_dirname.exclude_keys=[{keys}]"
            )

    def on_multirun_end(self, config, **kwargs) -> None:
        if not Path(self.sweep_dir).is_dir():
            return
        print("\n" + write_summary(self.sweep_dir, metric=self.metric, direction=self.direction))
        print(f"\nWritten: {Path(self.sweep_dir) / 'summary.md'} and summary.csv", flush=True)
        from pipeline.runs import hparams

        try:
            logdir = hparams.log_sweep(self.sweep_dir, objective=self.metric)
        except (
            Exception
        ) as err:  # the summary is written: a TensorBoard layout is not worth a crash
            log.warning("The sweep's HParams layout was not written: %s", err)
            return
        if logdir is not None:
            print(f"TensorBoard: tensorboard --logdir {self.sweep_dir}", flush=True)
