"""Safe loading and configs: Keras models without their code, a ``_target_`` allowlist.

- Keras models are loaded with ``safe_mode=True`` after a look at the
  archive's ``config.json``: a ``Lambda`` layer (arbitrary Python bytecode) is
  refused by name. Legacy full-model HDF5 files are refused unless the caller
  says it trusts them (``allow_unsafe=True``).
- Every ``_target_`` in a job's config must name a class of an allowlisted
  module (``ALLOWED_TARGET_PREFIXES``) before anything is instantiated.

The artifacts' SHA-256 in a run's manifest, checked before loading, are
``pipeline.runs.hashes``. Nothing here imports TensorFlow or Keras until a
model is actually loaded.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

from pipeline.errors import PipelineError

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
    ``pipeline.runs.manifest.subprocess.run`` is refused). Interpolations are
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
