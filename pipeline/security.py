"""Safe artifacts and configs: hashes in the manifest, safe loading, a ``_target_`` allowlist.

- Every artifact a run saves (``model.keras``, ``checkpoints/*.weights.h5``,
  ``export/saved_model/``, ``export/model.tflite``, ...) has its SHA-256 in
  ``manifest.json`` under ``artifacts``; evaluate, predict and export check it
  before loading and refuse a file that changed since.
- Keras models are loaded with ``safe_mode=True`` after a look at the
  archive's ``config.json``: a ``Lambda`` layer (arbitrary Python bytecode) is
  refused by name. Legacy full-model HDF5 files are refused unless the caller
  says it trusts them (``allow_unsafe=True``).
- Every ``_target_`` in a job's config must name a class of an allowlisted
  module (``ALLOWED_TARGET_PREFIXES``) before anything is instantiated.

Nothing here imports TensorFlow or Keras until a model is actually loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.security")

MANIFEST = "manifest.json"
ARTIFACTS_KEY = "artifacts"
CHUNK_BYTES = 1 << 20  # read files 1 MiB at a time
LEGACY_MODEL_SUFFIXES = (".h5", ".hdf5")
WEIGHTS_SUFFIX = ".weights.h5"  # Keras weight files: tensors only, no code
UNSAFE_LAYERS = ("Lambda",)  # layers whose config carries Python bytecode
ALLOWED_TARGET_PREFIXES = (
    "keras.optimizers.",
    "keras.losses.",
    "keras.callbacks.",
    "keras.metrics.",
    "keras.optimizers.schedules.",
    "pipeline.",
)
TARGET_KEY = "_target_"


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
            "recorded in its manifest.json."
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
    from pipeline import runinfo

    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    recorded = {}
    for path in paths:
        rel = _relative(run_dir, path)
        if not (run_dir / rel).exists():
            raise PipelineError(f"cannot record {run_dir / rel}: no such file or folder")
        recorded[rel] = sha256_artifact(run_dir / rel)
    manifest[ARTIFACTS_KEY] = {**manifest.get(ARTIFACTS_KEY, {}), **recorded}
    runinfo.write_json(run_dir / MANIFEST, manifest)
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
    """
    path = Path(path).expanduser()
    for candidate in [path, *path.parents][: levels + 1]:
        if candidate.is_dir() and (candidate / MANIFEST).is_file():
            return candidate
    return None


def verify_in_run(path) -> None:
    """Verifies a model file against the manifest of the run holding it, if there is one."""
    run_dir = find_run_dir(Path(path).parent)
    if run_dir is not None:
        verify_artifact(run_dir, path)


def unsafe_layers(config) -> list[str]:
    """Names of the layers in a Keras model config whose class is in ``UNSAFE_LAYERS``.

    Walks nested models (Sequential, Functional, wrappers) recursively.
    """
    found = []
    if isinstance(config, dict):
        if config.get("class_name") in UNSAFE_LAYERS:
            inner = config.get("config")
            name = inner.get("name", "?") if isinstance(inner, dict) else "?"
            found.append(f"{name} ({config['class_name']})")
        for value in config.values():
            found.extend(unsafe_layers(value))
    elif isinstance(config, list):
        for value in config:
            found.extend(unsafe_layers(value))
    return found


def safe_load_keras(path, *, allow_unsafe: bool = False):
    """Loads a Keras model without running code from the file.

    Args:
        path: a ``.keras`` archive; a legacy ``.h5``/``.hdf5`` full model only
            with ``allow_unsafe``.
        allow_unsafe: load a legacy HDF5 model (trust its author: it is not
            inspected for code).

    Returns:
        The ``keras.Model``, uncompiled.

    Raises:
        PipelineError: a legacy HDF5 model without ``allow_unsafe``, a weights
            file, an archive that is not a Keras model, a ``Lambda`` layer, or a
            file Keras cannot load.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(WEIGHTS_SUFFIX):
        raise PipelineError(
            f"{path} is a weights file (no architecture): load a run directory or its "
            "model.keras instead."
        )
    legacy = name.endswith(LEGACY_MODEL_SUFFIXES)
    if legacy and not allow_unsafe:
        raise PipelineError(
            f"{path} is a legacy HDF5 full model, which can carry code that runs when it is "
            "loaded. Re-save it as .keras, or pass the unsafe flag (predict: --allow-unsafe-h5) "
            "if you trust where it came from."
        )
    if not legacy:
        _check_keras_archive(path)
    import keras

    import pipeline.models  # noqa: F401  (registers our layers and schedule for loading)

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises many types for a file it cannot read
        raise PipelineError(f"cannot load the Keras model {str(path)!r}: {err}") from err


def _check_keras_archive(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as err:
        raise PipelineError(
            f"{path} is not a Keras .keras archive (a zip holding config.json): {err}"
        ) from err
    bad = unsafe_layers(config)
    if bad:
        raise PipelineError(
            f"{path} holds layer(s) {', '.join(bad)} with Python code inside; refusing to load "
            "it. Pipeline models have no Lambda layers: rebuild the model without them (a "
            "registered custom layer instead) or use a model trained by pipeline.train."
        )


def check_targets(cfg, *, skip: tuple[str, ...] = ("hydra",)) -> None:
    """Refuses any ``_target_`` outside ``ALLOWED_TARGET_PREFIXES``, before anything runs.

    A target must be ``<allowed module>.<Name>``: one public attribute of an
    allowlisted Keras module, or of a real ``pipeline`` module (so
    ``pipeline.runinfo.subprocess.run`` is refused). Interpolations are
    resolved first; one that cannot be resolved is refused.

    Args:
        cfg: a ``DictConfig`` or plain dict/list tree (a job's composed config).
        skip: top-level keys that are Hydra's own business (sweepers, launchers).

    Raises:
        PipelineError: naming the key, the target and what is allowed.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    is_omegaconf = isinstance(cfg, DictConfig | ListConfig)
    tree = OmegaConf.to_container(cfg, resolve=False) if is_omegaconf else cfg
    for key_path, raw in _targets(tree, (), skip):
        value = raw
        if is_omegaconf:
            try:
                value = OmegaConf.select(cfg, ".".join(map(str, key_path)), throw_on_missing=True)
            except Exception:  # an interpolation that does not resolve: judged as written
                value = raw
        where = ".".join(map(str, key_path))
        if not isinstance(value, str) or not _allowed_target(value):
            raise PipelineError(
                f"{where}={value!r} is not allowed: the pipeline instantiates only classes of "
                f"{', '.join(p.rstrip('.') for p in ALLOWED_TARGET_PREFIXES)} (e.g. "
                "keras.optimizers.SGD). Fix the config; nothing was run."
            )


def _targets(node, key_path: tuple, skip: tuple[str, ...]):
    if isinstance(node, dict):
        for key, value in node.items():
            if not key_path and key in skip:
                continue
            if key == TARGET_KEY:
                yield (*key_path, key), value
            else:
                yield from _targets(value, (*key_path, key), skip)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, (*key_path, i), skip)


def _allowed_target(target: str) -> bool:
    for prefix in sorted(ALLOWED_TARGET_PREFIXES, key=len, reverse=True):
        if not target.startswith(prefix):
            continue
        rest = target[len(prefix) :]
        if prefix != "pipeline.":
            return _public_name(rest)
        module, _, attribute = target.rpartition(".")
        return (
            _public_name(attribute)
            and all(map(_public_name, module.split(".")))
            and (_is_pipeline_module(module))
        )
    return False


def _public_name(name: str) -> bool:
    return name.isidentifier() and not name.startswith("_")


def _is_pipeline_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
