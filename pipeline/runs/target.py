"""Which run ``resume=`` continues, and whether it may: config-level, no TensorFlow.

``resume=<run_dir>`` continues that run with its own saved config, plus any
other key set on the command line (``trainer.epochs=30`` trains it longer);
``resume=auto`` reruns the command given now in the newest unfinished run
under ``outputs/`` that was started with the same model, batch size and data.
Either way the model, batch size and dataset cannot change: what differs is
named and the resume refused. The backups themselves are ``pipeline.training.backups``'s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import security
from pipeline.data.sources import identity_keys
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

BACKUP_DIR = "backup"  # = pipeline.training.backups.BACKUP_DIR (kept here: no Keras import)
FINISHED = "metrics.json"  # written when a run ends
SAME_KEYS = ("model", "data.source", "data.batch_size", "data.image_size", "data.resize")


def signature(cfg: DictConfig, bundle, source) -> dict:
    """What a backup must have been trained on to be resumed: model, batch size, data."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "batch_size": int(cfg.data.batch_size),
        "image_shape": [int(d) for d in bundle.image_shape],
        "class_names": list(bundle.class_names),
        "data_source": str(cfg.data.source),
        "data_fingerprint": source.fingerprint,
    }


def _select(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def config_differences(saved: DictConfig, now: DictConfig) -> list[str]:
    """``key (run: a, now: b)`` for the model, batch size and data keys that differ.

    The data keys are ``SAME_KEYS``' and those the data sources register as naming
    their dataset (``identity_keys()``: ``data.path``, ``data.name``, ...).
    """
    keys = [*SAME_KEYS, *(f"data.{k}" for k in identity_keys())]
    return [
        f"{key} (run: {_select(saved, key)!r}, now: {_select(now, key)!r})"
        for key in keys
        if _select(saved, key) != _select(now, key)
    ]


def saved_config(run_dir: Path) -> DictConfig:
    """The config a run was started with (``<run_dir>/.hydra/config.yaml``).

    Raises:
        PipelineError: ``run_dir`` is not a run directory with a backup, or its
            config names a ``_target_`` that is not allowed.
    """
    if not run_dir.is_dir():
        raise PipelineError(f"resume={str(run_dir)!r} is not a folder. Pass a run directory.")
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise PipelineError(
            f"resume={str(run_dir)!r} has no .hydra/config.yaml: not a run directory "
            "written by python -m pipeline.train."
        )
    saved = _load_checked(config_file)
    if not any((run_dir / BACKUP_DIR).glob("ckpt-*.npz")):
        raise PipelineError(
            f"resume={str(run_dir)!r} has no backup under {BACKUP_DIR}/ to resume from "
            "(was it run with trainer.backup=false, or killed before its first backup?)."
        )
    return saved


def _load_checked(config_file: Path) -> DictConfig:
    """A run's saved config, its ``_target_``s checked before anything can instantiate one.

    A run directory may come from someone else: its config is judged like a config
    file given on the command line (``pipeline.security.check_targets``).

    Raises:
        PipelineError: the file is not a YAML mapping, or names a target not allowed.
    """
    try:
        saved = OmegaConf.load(config_file)
    except Exception as err:  # OmegaConf raises YAML and its own errors alike
        raise PipelineError(f"cannot read {config_file}: {err}") from err
    if not isinstance(saved, DictConfig):
        raise PipelineError(f"{config_file} is not a config (a YAML mapping)")
    try:
        security.check_targets(saved)
    except PipelineError as err:
        raise PipelineError(f"resume: {config_file}: {err}") from err
    return saved


def unfinished_runs(outputs: Path) -> list[Path]:
    """Run directories under ``outputs`` with a backup and no final metrics, newest first."""
    if not outputs.is_dir():
        return []
    found = []
    for backup in outputs.rglob(f"{BACKUP_DIR}/ckpt-*.npz"):
        run = backup.parent.parent
        if (run / ".hydra" / "config.yaml").is_file() and not (run / FINISHED).exists():
            found.append((backup.stat().st_mtime, run))
    newest = {}
    for mtime, run in found:
        newest[run] = max(mtime, newest.get(run, 0.0))
    return sorted(newest, key=newest.get, reverse=True)


def resolve(cfg: DictConfig, overrides: list[str], outputs: Path) -> tuple[Path, DictConfig]:
    """The run directory and config that ``resume=...`` continues with.

    Args:
        cfg: the config composed from the command line (with ``resume``).
        overrides: the command line's ``key=value`` overrides.
        outputs: where ``resume=auto`` looks (``outputs/`` of the launch dir).

    Returns:
        ``(run_dir, config)``.

    Raises:
        PipelineError: no run to resume, or it differs in model, batch size or data.
    """
    target = str(cfg.resume)
    if target == "auto":
        candidates = unfinished_runs(outputs)
        for run_dir in candidates:
            if not config_differences(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), cfg):
                log.info("resume=auto: continuing %s", run_dir)
                return run_dir, cfg
        raise PipelineError(
            f"resume=auto found no unfinished run under {outputs} started with this model, "
            f"batch size and data ({len(candidates)} unfinished run(s) with other settings). "
            "Pass resume=<run dir>, or drop resume to start a new run."
        )
    run_dir = Path(target).expanduser()
    saved = saved_config(run_dir)
    choices = _group_choices(run_dir)
    merged = saved.copy()
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "resume" or key.startswith("hydra"):
            continue
        if "." not in key and key in choices:  # a group (model=inception): must be the run's
            if choices[key] != value:
                raise PipelineError(
                    f"cannot resume {run_dir}: {key}={value} differs from the run's {key}. "
                    "The model, batch size and data of a run cannot change; start a new run."
                )
            continue
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
    differences = config_differences(saved, merged)
    if differences:
        raise PipelineError(
            f"cannot resume {run_dir}: " + "; ".join(differences) + ". The model, batch size "
            "and data of a run cannot change; start a new run instead."
        )
    OmegaConf.update(merged, "resume", None, force_add=True)
    return run_dir, merged


def _group_choices(run_dir: Path) -> dict:
    """The config groups a run chose (``model: resnet20``), from Hydra's record of it."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices", default=None)
    return {str(k): str(v) for k, v in (choices or {}).items() if "/" not in str(k)}


def outputs_dir() -> Path:
    """``outputs/`` under the directory the command was launched from."""
    try:
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd()) / "outputs"
    except ValueError:  # outside a Hydra app
        return Path(os.getcwd()) / "outputs"
