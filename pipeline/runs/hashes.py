"""The SHA-256 of every artifact a run saves, kept in its ``manifest.json``.

Every artifact a run saves (``model.keras``, ``checkpoints/*.weights.h5``,
``export/saved_model/``, ``export/model.tflite``, ...) has its SHA-256 in
``manifest.json`` under ``artifacts``: training and export record them, and
evaluate, predict, export and resume check a file against its hash before
loading it, refusing one that changed since.

Plain ``hashlib`` and JSON: nothing here imports TensorFlow or Keras.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.runs.hashes")

MANIFEST = "manifest.json"
ARTIFACTS_KEY = "artifacts"
CHUNK_BYTES = 1 << 20  # read files 1 MiB at a time


def sha256_file(path) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path) -> str:
    """The SHA-256 of a directory: every file's relative path and bytes, in sorted order.

    Renaming, adding, removing or changing any file changes the digest; empty
    folders do not count.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        name = file.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(8, "big") + name)
        digest.update(bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


def sha256_artifact(path) -> str:
    """``sha256_tree`` for a directory (a SavedModel), else ``sha256_file``."""
    return sha256_tree(path) if Path(path).is_dir() else sha256_file(path)


def _relative(run_dir: Path, path) -> str:
    path = Path(path)
    full = path if path.is_absolute() else run_dir / path
    try:
        return full.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError as err:
        raise PipelineError(
            f"{full} is not inside the run directory {run_dir}: only a run's own files are "
            f"recorded in its {MANIFEST}."
        ) from err


def _read_manifest(run_dir: Path) -> dict:
    file = run_dir / MANIFEST
    if not file.is_file():
        raise PipelineError(f"{run_dir} has no {MANIFEST}: it is not a finished training run.")
    return json.loads(file.read_text())


def record_artifacts(run_dir, paths: Iterable) -> dict:
    """Hashes files or directories of a run and records them in its manifest.

    The entries join those already recorded (a path recorded again gets its new
    hash); ``manifest.json`` is rewritten atomically.

    Args:
        run_dir: the run directory holding ``manifest.json``.
        paths: files or directories inside ``run_dir`` (absolute or relative to it).

    Returns:
        ``{relative path: sha256}`` of what was recorded now.

    Raises:
        PipelineError: no manifest, a path outside the run, or a missing file.
    """
    from pipeline.runs.manifest import write_json

    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    recorded = {}
    for path in paths:
        rel = _relative(run_dir, path)
        if not (run_dir / rel).exists():
            raise PipelineError(f"cannot record {run_dir / rel}: no such file or folder")
        recorded[rel] = sha256_artifact(run_dir / rel)
    manifest[ARTIFACTS_KEY] = {**manifest.get(ARTIFACTS_KEY, {}), **recorded}
    write_json(run_dir / MANIFEST, manifest)
    return recorded


def verify_artifact(run_dir, path) -> bool:
    """Checks a run's file against the SHA-256 its manifest recorded, before it is loaded.

    Runs saved before hashes were recorded (no ``artifacts`` in the manifest),
    and files the manifest does not list, are loaded with a warning.

    Args:
        run_dir: the run directory holding ``manifest.json``.
        path: a file or directory inside ``run_dir``.

    Returns:
        True when the hash was checked and matches; False when there was none to check.

    Raises:
        PipelineError: the file's hash differs from the recorded one.
    """
    run_dir = Path(run_dir)
    rel = _relative(run_dir, path)
    recorded = _read_manifest(run_dir).get(ARTIFACTS_KEY)
    if recorded is None:
        log.warning(
            "%s records no artifact hashes (a run from before they were recorded): loading %s "
            "unchecked.",
            run_dir / MANIFEST,
            rel,
        )
        return False
    if rel not in recorded:
        log.warning("%s has no hash for %s: loading it unchecked.", run_dir / MANIFEST, rel)
        return False
    actual = sha256_artifact(run_dir / rel)
    if actual != recorded[rel]:
        raise PipelineError(
            f"{run_dir / rel} was modified after training (sha256 {actual} != {recorded[rel]} "
            f"recorded in {run_dir / MANIFEST}); refusing to load it. Re-export or retrain, "
            "or restore the original file."
        )
    return True


def find_run_dir(path, levels: int = 2) -> Path | None:
    """The training run a model file or folder belongs to: itself or a parent with a manifest.

    ``run/model.keras`` and ``run/export/saved_model`` both give ``run``.

    Args:
        path: a file or folder.
        levels: how many parents up to look.

    Returns:
        The run directory, or None when no folder that close holds a manifest.
    """
    path = Path(path).expanduser()
    for candidate in [path, *path.parents][: levels + 1]:
        if candidate.is_dir() and (candidate / MANIFEST).is_file():
            return candidate
    return None


def verify_in_run(path) -> None:
    """Verifies a model file against the manifest of the run holding it, if there is one.

    Raises:
        PipelineError: the file's hash differs from the recorded one.
    """
    run_dir = find_run_dir(Path(path).parent)
    if run_dir is not None:
        verify_artifact(run_dir, path)
