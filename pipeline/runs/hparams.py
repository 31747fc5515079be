"""A run's hyperparameters and final metrics for TensorBoard's HParams dashboard.

``tensorboard --logdir <sweep dir>`` then lists every job of a sweep in the
HParams table and parallel-coordinates views.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

HPARAMS_DIR = ("tensorboard", "hparams")


def clean(params: dict) -> dict[str, str | float | int | bool]:
    """Keeps the values the HParams plugin takes (str, float, int, bool); others become str."""
    cleaned = {}
    for key, value in params.items():
        if value is None:
            value = "null"
        elif not isinstance(value, (str, float, int, bool)):
            value = str(value)
        cleaned[str(key)] = value
    return cleaned


def final_metrics(metrics: dict) -> dict[str, float]:
    """The finite numeric metrics (bools, strings, lists and NaNs dropped)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    }


def log_run(run_dir: str | os.PathLike, params: dict, metrics: dict) -> Path:
    """Writes the run's hyperparameters and final metrics to ``<run_dir>/tensorboard/hparams``.

    Args:
        run_dir: the run directory.
        params: flat ``{key: value}`` hyperparameters (``optimizer.lr``: 0.1, ...).
        metrics: the run's final metrics; numeric ones are logged as scalars
            at step ``metrics["epochs"]``.

    Returns:
        The directory written.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    logdir = Path(run_dir).joinpath(*HPARAMS_DIR)
    step = int(metrics.get("epochs", 0) or 0)
    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        hp.hparams(clean(params))
        for key, value in final_metrics(metrics).items():
            tf.summary.scalar(key, value, step=step)
    writer.close()
    return logdir
