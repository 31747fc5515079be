"""A run's hyperparameters and final metrics for TensorBoard's HParams dashboard.

Each run writes its hyperparameters and a few final metrics (the objective,
validation and test accuracy and loss) to ``<run_dir>/tensorboard/hparams``;
every other final value stays in ``metrics.json``. The HParams dashboard reads
its metric columns from scalars, which the Scalars and Time Series dashboards
show too, as one-point charts: they are tagged ``result/<metric>`` so that they
come after the curves and images, in a group Time Series shows collapsed (it
opens the first two groups only). ``tensorboard --logdir <sweep dir>`` then lists
every job of a sweep; :func:`log_sweep`, at the end of a sweep, writes the
table's layout: the hyperparameters that vary, the objective's column first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

HPARAMS_DIR = ("tensorboard", "hparams")
SWEEP_HPARAMS_DIR = "sweep_hparams"  # under the sweep dir: the sweep's HParams layout
RESULT_GROUP = "result"  # the final metrics' tags: result/val_accuracy, ...
KEY_METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss")  # after the objective
SESSION_TAG = "_hparams_/session_start_info"  # the HParams plugin's tag for a run's hparams
MAX_DISCRETE = 10  # more distinct numbers than this (a search's floats): an interval


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


def result_metrics(metrics: dict, objective: str | None = None) -> dict[str, float]:
    """The few final metrics the HParams table shows: ``objective``, then :data:`KEY_METRICS`."""
    numeric = final_metrics(metrics)
    keys = dict.fromkeys([objective, *KEY_METRICS] if objective else KEY_METRICS)
    return {key: numeric[key] for key in keys if key in numeric}


def log_run(
    run_dir: str | os.PathLike, params: dict, metrics: dict, objective: str | None = None
) -> Path:
    """Writes the run's hyperparameters and final metrics to ``<run_dir>/tensorboard/hparams``.

    The HParams table names the run ``<run dir> (<its parent>)`` (its trial
    id), e.g. ``10-00-00-3fa2c1 (2026-11-27)``; in a sweep ``<job> (<time>)``.

    Args:
        run_dir: the run directory.
        params: flat ``{key: value}`` hyperparameters (``optimizer.lr``: 0.1, ...).
        metrics: the run's final metrics; :func:`result_metrics` of them are
            logged as ``result/<metric>`` scalars at step ``metrics["epochs"]``.
        objective: the metric a sweep optimizes, logged first.

    Returns:
        The directory written.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    run_dir = Path(run_dir).absolute()
    logdir = run_dir.joinpath(*HPARAMS_DIR)
    step = int(metrics.get("epochs", 0) or 0)
    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        hp.hparams(clean(params), trial_id=f"{run_dir.name} ({run_dir.parent.name})")
        for key, value in result_metrics(metrics, objective).items():
            tf.summary.scalar(f"{RESULT_GROUP}/{key}", value, step=step)
    writer.close()
    return logdir


def read_session(logdir: str | os.PathLike) -> tuple[dict, list[str]]:
    """The hyperparameters and the scalar tags :func:`log_run` wrote into ``logdir``.

    Returns:
        ``({name: value}, [tag, ...])``; both empty when ``logdir`` holds none.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    params, tags = {}, []
    for events in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for record in RawEventFileLoader(str(events)).Load():
            for value in event_pb2.Event.FromString(record).summary.value:
                plugin = value.metadata.plugin_data
                if value.tag == SESSION_TAG:
                    data = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
                    for name, v in data.session_start_info.hparams.items():
                        params[name] = getattr(v, v.WhichOneof("kind"))
                elif plugin.plugin_name == "scalars" and value.tag not in tags:
                    tags.append(value.tag)
    return params, tags


def log_sweep(sweep_dir: str | os.PathLike, objective: str) -> Path | None:
    """Writes the HParams layout of a sweep's jobs to ``<sweep_dir>/sweep_hparams``.

    The table's columns are the hyperparameters whose value differs between
    jobs (or that some job lacks), each with the domain of its values, then the
    metrics: ``objective`` first (shown as ``<objective> (objective)``), then
    the other ``result/`` metrics the jobs logged. The hyperparameters every job
    shares are left out (they are in ``summary.md``), unless none differs.

    Args:
        sweep_dir: the sweep directory, holding one directory per job.
        objective: the sweep's objective metric (``objective.metric``).

    Returns:
        The directory written, or None when no job logged its hyperparameters.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = sorted(Path(sweep_dir).glob("**/" + "/".join(HPARAMS_DIR)))
    sessions = [(params, tags) for params, tags in map(read_session, found) if params]
    if not sessions:
        return None
    names = sorted({name for params, _ in sessions for name in params})
    values = {name: [p[name] for p, _ in sessions if name in p] for name in names}
    varied = [n for n in names if len(values[n]) < len(sessions) or len(set(values[n])) > 1]
    first = f"{RESULT_GROUP}/{objective}"
    tags = dict.fromkeys([first, *(t for _, logged in sessions for t in logged)])
    metrics = [
        hp.Metric(tag, display_name=tag.split("/", 1)[1] + (" (objective)" if tag == first else ""))
        for tag in tags
        if tag.startswith(f"{RESULT_GROUP}/")
    ]
    params = [hp.HParam(name, _domain(values[name])) for name in varied or names]
    summary = hp.hparams_config_pb(hparams=params, metrics=metrics)
    plugin = summary.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in varied  # TensorBoard lists these first
    plugin.content = data.SerializeToString()
    logdir = Path(sweep_dir) / SWEEP_HPARAMS_DIR
    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=0)
    writer.close()
    return logdir


def _domain(values: list):
    """The HParams domain of ``values``: the values themselves, or an interval of many numbers."""
    from tensorboard.plugins.hparams import api as hp

    kinds = {type(v) for v in values}
    distinct = sorted(set(values)) if len(kinds) == 1 else []
    if kinds <= {int, float} and len(set(values)) > MAX_DISCRETE:
        return hp.RealInterval(float(min(values)), float(max(values)))
    return hp.Discrete(distinct) if distinct else None  # mixed kinds: TensorBoard infers one
