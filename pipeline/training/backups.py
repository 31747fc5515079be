"""Backups a killed run resumes from, and the callback that writes them.

Keras 3's ``BackupAndRestore`` restores only the epoch counter, rewrites its
file in place and deletes it when training ends (after ``TerminateOnNaN``
too), so we keep our own. A backup is one ``.npz`` file under
``<run_dir>/backup/``: every model variable (weights, BatchNorm statistics,
seed states), every optimizer variable (slots and the step counter, which is
also the learning-rate schedule's position) and a JSON state (epochs and steps
done, the history so far, the best checkpoint's value, what the run trained
on). Each is written to a temporary file, flushed and renamed, so a crash
mid-write leaves the previous backup whole; the newest :data:`KEEP` are kept
and a corrupt newest one falls back to the one before. Backups are never
deleted at the end of training: a finished run keeps its last state.

Resuming from an epoch boundary is bit-exact in deterministic mode (the
trainer also replays the shuffle order); resuming from a mid-epoch backup
(``trainer.backup_every_steps``) skips the batches already done.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

BACKUP_DIR = "backup"
KEEP = 2
NAME = re.compile(r"^ckpt-(\d{9})\.npz$")
STATE_KEY = "__state__"
SIGNATURE_KEYS = {
    "model": "model",
    "batch_size": "data.batch_size",
    "image_shape": "image shape",
    "class_names": "class names",
    "data_source": "data.source",
    "data_fingerprint": "dataset files (fingerprint)",
}


class Preempted(PipelineError):
    """Training was asked to stop (SIGTERM) and left a backup to resume from."""

    exit_code = 143  # 128 + SIGTERM, what schedulers expect from a terminated job


@dataclass
class Restored:
    """What a backup put back, and where training continues."""

    path: Path
    epoch: int  # epochs completed
    step: int  # batches completed in the next epoch (0 at an epoch boundary)
    history: dict = field(default_factory=dict)
    best: float | None = None


def backups(directory: str | os.PathLike) -> list[Path]:
    """The backups in ``directory``, newest (highest optimizer step) first."""
    path = Path(directory)
    if not path.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in path.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_state(path: str | os.PathLike) -> dict:
    """The JSON state of one backup (no arrays read).

    Raises:
        PipelineError: the file is not a readable backup.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            return json.loads(bytes(archive[STATE_KEY]).decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise PipelineError(f"backup {path} is unreadable ({type(err).__name__}: {err})") from err


def _variables(model) -> tuple[list, list]:
    optimizer = getattr(model, "optimizer", None)
    return list(model.variables), list(optimizer.variables) if optimizer is not None else []


def save(
    directory: str | os.PathLike,
    model,
    *,
    epoch: int,
    step: int,
    history: dict,
    best: float | None,
    signature: dict,
) -> Path:
    """Writes one backup atomically and prunes all but the newest :data:`KEEP`.

    Args:
        directory: the run's backup folder (created if missing).
        model: a compiled Keras model whose optimizer is built.
        epoch: epochs completed.
        step: batches completed in epoch ``epoch + 1`` (0 at an epoch boundary).
        history: per-epoch metrics so far (lists of floats).
        best: the best checkpoint's monitored value so far, or None.
        signature: what the run trains on (see :data:`SIGNATURE_KEYS`).

    Returns:
        The backup's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_vars, opt_vars = _variables(model)
    iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    state = {
        "epoch": int(epoch),
        "step": int(step),
        "iterations": iterations,
        "history": history,
        "best": best if best is None or math.isfinite(best) else None,
        "signature": signature,
        "model_variables": [[v.path, list(v.shape)] for v in model_vars],
        "optimizer_variables": [[v.path, list(v.shape)] for v in opt_vars],
    }
    arrays = {f"m{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model_vars)}
    arrays.update({f"o{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(opt_vars)})
    arrays[STATE_KEY] = np.frombuffer(json.dumps(state, default=float).encode(), np.uint8)
    path = directory / f"ckpt-{iterations:09d}.npz"
    tmp = directory / f".{path.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # a full disk: the previous backups stay whole
        tmp.unlink(missing_ok=True)
        err.filename = err.filename or str(path)
        raise
    os.replace(tmp, path)
    for old in backups(directory)[KEEP:]:
        old.unlink()
    return path


def signature_differences(saved: dict, now: dict) -> list[str]:
    """``key (run: a, now: b)`` for each signature entry that differs."""
    return [
        f"{SIGNATURE_KEYS.get(key, key)} (run: {saved.get(key)!r}, now: {now.get(key)!r})"
        for key in SIGNATURE_KEYS
        if key in saved and key in now and saved[key] != now[key]
    ]


def restore(directory: str | os.PathLike, model, signature: dict) -> Restored | None:
    """Loads the newest readable backup into ``model`` and its optimizer.

    A corrupt or incomplete newest backup is reported and the one before it is
    tried. The optimizer must be built (``optimizer.build``) beforehand.

    Returns:
        What was restored, or None when ``directory`` holds no backup.

    Raises:
        PipelineError: every backup is unreadable (never a silent fresh
            start), or the backup is of a different model, batch size or
            dataset.
    """
    found = backups(directory)
    if not found:
        return None
    model_vars, opt_vars = _variables(model)
    errors = []
    for path in found:
        try:
            state, values = _read(path)
        except PipelineError as err:
            errors.append(str(err))
            log.warning("%s; trying the backup before it", err)
            continue
        differences = signature_differences(state.get("signature", {}), signature)
        if differences:
            raise PipelineError(
                f"cannot resume from {path}: the backup and this run differ in "
                + "; ".join(differences)
                + ". Resume with the run's settings, or start a new run in a new directory."
            )
        _check_shapes(path, state, model_vars, opt_vars)
        for i, var in enumerate(model_vars):
            var.assign(values[f"m{i}"])
        for i, var in enumerate(opt_vars):
            var.assign(values[f"o{i}"])
        return Restored(
            path=path,
            epoch=state["epoch"],
            step=state["step"],
            history=state.get("history", {}),
            best=state.get("best"),
        )
    raise PipelineError(
        f"every backup in {directory} is unreadable ({'; '.join(errors)}). Refusing to start "
        "over on top of them: move that folder away to train from scratch."
    )


def _read(path: Path) -> tuple[dict, dict]:
    """The state and arrays of one backup, opened once and checked against each other.

    Raises:
        PipelineError: not a backup (junk, another archive), or an incomplete one.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            values = {key: archive[key] for key in archive.files}
        state = json.loads(bytes(values.pop(STATE_KEY)).decode())
        shapes = [tuple(s) for _, s in state["model_variables"] + state["optimizer_variables"]]
        names = [f"m{i}" for i in range(len(state["model_variables"]))]
        names += [f"o{i}" for i in range(len(state["optimizer_variables"]))]
        int(state["epoch"]), int(state["step"]), dict(state.get("history", {}))
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise PipelineError(
            f"backup {path} is unreadable, not a backup written by pipeline.train "
            f"({type(err).__name__}: {str(err)[:200]})"
        ) from err
    found = [values[n].shape if n in values else None for n in names]
    if len(values) != len(names) or found != shapes:
        raise PipelineError(f"backup {path} is incomplete ({len(values)} of {len(names)} arrays)")
    return state, values


def _check_shapes(path: Path, state: dict, model_vars: list, opt_vars: list) -> None:
    for kind, variables, key in (
        ("model", model_vars, "model_variables"),
        ("optimizer", opt_vars, "optimizer_variables"),
    ):
        saved = [tuple(shape) for _, shape in state[key]]
        now = [tuple(v.shape) for v in variables]
        if saved != now:
            raise PipelineError(
                f"cannot resume from {path}: its {kind} variables do not match this "
                f"{kind}'s ({len(saved)} saved, {len(now)} now). Was the model or optimizer "
                "changed? Resume with the run's settings, or start a new run."
            )
