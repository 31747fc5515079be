"""Safe loading and configs: Keras models without their code, a ``_target_`` allowlist.

- Keras models are loaded with ``safe_mode=True`` after a look at the
  archive's ``config.json``: a ``Lambda`` layer (arbitrary Python bytecode) is
  refused by name. Legacy full-model HDF5 files are refused unless the caller
  says it trusts them (``allow_unsafe=True``).
- Every ``_target_`` in a config, wherever it sits, must name one of the
  classes listed in ``ALLOWED_TARGETS`` (``HYDRA_TARGETS`` too under ``hydra:``)
  before anything is instantiated: a list of classes, not of modules, so no
  function of ours (or anyone's) can be called from a config.

The artifacts' SHA-256 in a run's manifest, checked before loading, are
``pipeline.runs.hashes``. Nothing here imports TensorFlow or Keras until a
model is actually loaded.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from pathlib import Path

from pipeline.errors import PipelineError, user_errors

LEGACY_MODEL_SUFFIXES = (".h5", ".hdf5")
WEIGHTS_SUFFIX = ".weights.h5"  # Keras weight files: tensors only, no code
UNSAFE_LAYERS = ("Lambda",)  # layers whose config carries Python bytecode
ALLOWED_TARGETS = frozenset(  # what a job's config may instantiate: classes, named in full
    {
        # optimizers (conf/optimizer/*.yaml; pipeline.config.optimizer_factory)
        "keras.optimizers.SGD",
        "keras.optimizers.Adam",
        "keras.optimizers.AdamW",
        "keras.optimizers.Nadam",
        "keras.optimizers.RMSprop",
        "keras.optimizers.Lion",
        "pipeline.training.optimizers.SGD",
        # learning-rate schedules
        "pipeline.training.schedules.WarmupSchedule",
        "keras.optimizers.schedules.CosineDecay",
        "keras.optimizers.schedules.ExponentialDecay",
        "keras.optimizers.schedules.PiecewiseConstantDecay",
        # losses and metrics
        "keras.losses.CategoricalCrossentropy",
        "keras.losses.SparseCategoricalCrossentropy",
        "keras.metrics.CategoricalAccuracy",
        "keras.metrics.SparseCategoricalAccuracy",
        "keras.metrics.SparseTopKCategoricalAccuracy",
        # callbacks (trainer.callbacks) that act on the training in memory only. Not listed:
        # those that write where the config says (ModelCheckpoint, BackupAndRestore,
        # CSVLogger, TensorBoard: the run dir has its own), run code (LambdaCallback) or
        # send the metrics away (RemoteMonitor). ReduceLROnPlateau is safe, but
        # pipeline.config refuses it: it cannot change our scheduled learning rate.
        "keras.callbacks.EarlyStopping",
        "keras.callbacks.ReduceLROnPlateau",
        "keras.callbacks.TerminateOnNaN",
    }
)
HYDRA_TARGETS = frozenset(  # what Hydra itself instantiates from ``hydra:`` (conf/launcher, ...)
    {
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
        "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
        "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        "hydra_plugins.pipeline_sweep_launcher.SurvivingJoblibLauncher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
        "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        "optuna.samplers.TPESampler",
        "optuna.samplers.RandomSampler",
        "optuna.samplers.CmaEsSampler",
        "optuna.samplers.NSGAIISampler",
        "optuna.samplers.MOTPESampler",
        "optuna.samplers.GridSampler",
        "pipeline.runs.sweep.SweepSummary",
        "pipeline.runs.rundir.RunDirGuard",
    }
)
TARGET_KEY = "_target_"
MAX_CONFIG_DEPTH = 100  # levels of nesting: deeper is an interpolation loop, not a config


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


def check_targets(cfg) -> None:
    """Refuses any ``_target_`` not in ``ALLOWED_TARGETS``, before anything runs.

    Every mapping in the tree that holds a ``_target_`` is checked, wherever it
    sits (``hydra.utils.instantiate`` builds nested ones too), with
    interpolations resolved first: a value that only becomes a mapping when
    resolved (``${oc.create:...}``) is checked as that mapping. A target that
    cannot be resolved is judged as written. Under the top-level ``hydra`` key
    Hydra's own launchers, sweepers and callbacks (``HYDRA_TARGETS``) are allowed
    as well.

    Args:
        cfg: a ``DictConfig`` or plain dict/list tree (a job's composed config, or a
            run's saved ``.hydra/config.yaml``).

    Raises:
        PipelineError: naming the key, the target and what is allowed.
    """
    for key_path, value in _targets(cfg, ()):
        allowed = ALLOWED_TARGETS | HYDRA_TARGETS if key_path[0] == "hydra" else ALLOWED_TARGETS
        if not isinstance(value, str) or value not in allowed:
            where = ".".join(map(str, key_path))
            raise PipelineError(
                f"{where}={value!r} is not allowed: a config may instantiate only the classes "
                "in pipeline.security.ALLOWED_TARGETS (Keras optimizers such as "
                "keras.optimizers.SGD, schedules, losses, metrics, callbacks). Fix the config; "
                "nothing was run."
            )


@contextlib.contextmanager
def targets_checked_before_hydra():
    """Within it, Hydra checks a composed config's ``_target_``s before it instantiates any.

    Hydra builds ``hydra.callbacks`` (and in a multirun the sweeper and the
    launcher) from the composed config before a command's own code runs, so a
    config file could otherwise run a function through them. Hydra makes its
    ``Callbacks`` from the whole composed config right after composing it, in
    ``run`` and ``multirun`` alike: ``check_targets`` runs there, ``hydra:``
    included. A refusal is one ``error:`` line and exit code 2.
    """
    from hydra._internal import hydra as hydra_app

    original = hydra_app.Callbacks

    def checked(config=None):
        if config is not None:
            with user_errors():
                check_targets(config)
        return original(config)  # Hydra's own class: it pickles for joblib's job processes

    hydra_app.Callbacks = checked
    try:
        yield
    finally:
        hydra_app.Callbacks = original


def _targets(node, key_path: tuple):
    """``(key path, target)`` of every ``_target_`` under ``node``, resolved where it can be."""
    from omegaconf import DictConfig, ListConfig

    if len(key_path) > MAX_CONFIG_DEPTH:
        raise PipelineError(
            f"{'.'.join(map(str, key_path[:8]))}... is nested over {MAX_CONFIG_DEPTH} levels "
            "deep (an interpolation that refers to itself?). Fix the config; nothing was run."
        )
    if isinstance(node, DictConfig | dict):
        for key in list(node.keys()):
            value = _resolved(node, key)
            if key == TARGET_KEY:
                yield (*key_path, key), value
            else:
                yield from _targets(value, (*key_path, key))
    elif isinstance(node, ListConfig | list):
        for i in range(len(node)):
            yield from _targets(_resolved(node, i), (*key_path, i))


def _resolved(node, key):
    """``node[key]`` with interpolations resolved; as written where they do not resolve."""
    from omegaconf import DictConfig, ListConfig

    if not isinstance(node, DictConfig | ListConfig):
        return node[key]
    try:
        return node[key]
    except Exception:  # a missing value or an interpolation that does not resolve here
        child = node._get_node(key)
        return child._value() if child is not None else None
