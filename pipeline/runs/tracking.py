"""Experiment tracking with MLflow: one MLflow run per run directory.

With ``logger=mlflow`` (alone or beside ``tensorboard`` and ``csv``) training opens
an MLflow run (:func:`start`) that holds the run's config as params, each epoch's
metrics (:class:`EpochMetrics`, at step = the 0-based epoch, as TensorBoard and
``metrics.csv`` count), and at the end the final metrics (at step = the number of
epochs, as the HParams log), ``model.keras``, the records and a confusion matrix
as artifacts (:meth:`MlflowRun.log_final`). The MLflow run's id is kept in
``<run_dir>/mlflow.json``: ``resume=`` continues the same MLflow run.

A server that cannot be reached, or that refuses the run, stops training before
it starts with one line; once training runs, a failed upload is a warning (the run
directory holds everything that would have been logged). :class:`LearningRateLog`
serves ``logger=csv`` too. This module is imported only when one of those loggers
is on, and ``mlflow`` only when an MLflow run starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluation.metrics import confusion_matrix
from pipeline.evaluation.plots import render_confusion_matrix
from pipeline.runs import manifest
from pipeline.training.backups import Preempted

log = logging.getLogger(__name__)

RUN_FILE = "mlflow.json"  # in the run dir: the MLflow run that resume= continues
RECORDS = ("manifest.json", "history.json")  # uploaded beside metrics.json (and model.keras)
MODEL_FILE = "model.keras"
IMAGES_DIR = "images"  # artifact folder of the pictures
HEALTH_TIMEOUT_S = 5.0  # seconds to wait for a tracking server's /health answer
BATCH_LIMIT = 100  # params (and tags) per log_batch request: MLflow's limit
MAX_PARAM_CHARS = 500  # param values are cut to MLflow's smallest limit (1.x: 500, 2.x: 6000)
MAX_KEY_CHARS = 250
RESUMED_TAG = "pipeline.resumed_with."  # + param key: a value a resume= changed (params are fixed)


@dataclass(frozen=True)
class MlflowSettings:
    """Where and under which names a run is tracked.

    Attributes:
        tracking_uri: the server or store (``http://host:5000``, ``sqlite:////abs/mlflow.db``).
        uri_from: where ``tracking_uri`` came from, for messages
            (``logger.mlflow.tracking_uri``, ``MLFLOW_TRACKING_URI``, ``the local default``).
        experiment: the MLflow experiment the run joins (created when missing).
        run_name: the new run's name (its command-line overrides).
        tags: the new run's tags (run dir; sweep dir and job number in a sweep).
        log_model: upload ``model.keras`` at the end.
        artifact_location: where a new experiment keeps its artifacts; None: the store's default.
    """

    tracking_uri: str
    uri_from: str
    experiment: str = "pipeline"
    run_name: str | None = None
    tags: dict = field(default_factory=dict)
    log_model: bool = True
    artifact_location: str | None = None


class MlflowRun:
    """An open MLflow run: log metrics and artifacts to it, then end it.

    Made by :func:`start`. Logging goes through ``MlflowClient`` with the run's id,
    never MLflow's process-wide active run, so the jobs of a sweep run in one
    process do not mix.
    """

    def __init__(self, client, run_id: str, settings: MlflowSettings):
        self.client = client
        self.run_id = run_id
        self.settings = settings
        self._epochs_broken = False  # an epoch's upload failed: warned once, the others skipped
        self._last_ms = 0

    def log_metrics(self, values: dict, step: int) -> None:
        """Logs the numeric, finite ``values`` at ``step``; a failure is warned about once."""
        if self._epochs_broken:
            return
        try:
            self._log_metrics(values, step)
        except _mlflow_errors() as err:
            self._epochs_broken = True
            log.warning(
                "MLflow: logging epoch %d to %s failed (%s); the epochs' metrics stay in "
                "history.json, the final ones are tried at the end",
                step,
                shown_uri(self.settings.tracking_uri),
                _first_line(err),
            )

    def log_final(self, metrics: dict, run_dir: Path, images: dict[str, np.ndarray]) -> None:
        """The final metrics (at step = epochs) and the run's files as artifacts.

        Uploads ``metrics.json`` (written from ``metrics``, as the run dir will hold it),
        ``manifest.json``, ``history.json``, ``model.keras`` (``log_model``) and
        ``images`` (name -> ``[H, W, 3]`` uint8) as PNGs under ``images/``. Safe to redo:
        a second upload replaces the files. A failure is a warning.
        """
        from PIL import Image

        try:
            self._log_metrics(metrics, int(metrics.get("epochs") or 0))
            with tempfile.TemporaryDirectory() as tmp:
                manifest.write_json(Path(tmp) / "metrics.json", metrics)
                self.client.log_artifact(self.run_id, str(Path(tmp) / "metrics.json"))
                names = [*RECORDS, *([MODEL_FILE] if self.settings.log_model else [])]
                for name in names:
                    if (run_dir / name).is_file():
                        self.client.log_artifact(self.run_id, str(run_dir / name))
                for name, image in images.items():
                    Image.fromarray(image).save(Path(tmp) / name)
                    self.client.log_artifact(self.run_id, str(Path(tmp) / name), IMAGES_DIR)
        except _mlflow_errors() as err:
            log.warning(
                "MLflow: uploading the final results of %s to %s failed (%s); they are in the "
                "run dir",
                run_dir,
                shown_uri(self.settings.tracking_uri),
                _first_line(err),
            )

    @contextlib.contextmanager
    def ended(self):
        """Ends the run as what happens inside: FINISHED, KILLED (SIGTERM, Ctrl-C) or FAILED."""
        try:
            yield self
        except BaseException as err:
            self.end("KILLED" if isinstance(err, Preempted | KeyboardInterrupt) else "FAILED")
            raise
        self.end("FINISHED")

    def end(self, status: str) -> None:
        """Marks the run ended with ``status``; a failure is a warning."""
        try:
            self.client.set_terminated(self.run_id, status)
        except _mlflow_errors() as err:
            log.warning("MLflow: ending run %s failed (%s)", self.run_id, _first_line(err))

    def _log_metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        stamp = max(int(time.time() * 1000), self._last_ms + 1)  # the final ones are the latest
        self._last_ms = stamp
        metrics = [Metric(key, value, stamp, step) for key, value in numbers(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)


class LearningRateLog(keras.callbacks.Callback):
    """Puts the optimizer's learning rate into each epoch's logs, for the loggers after it.

    Keras's TensorBoard callback does the same for itself, after the other loggers
    have seen the logs (and not at all without TensorBoard).
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class EpochMetrics(keras.callbacks.Callback):
    """Logs every epoch's metrics (loss, accuracy, ``val_*``, learning rate, images/s).

    At step = the 0-based epoch, like TensorBoard's curves.
    """

    def __init__(self, run: MlflowRun):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        self.run.log_metrics(logs or {}, step=epoch)


def start(run_dir: Path, settings: MlflowSettings, params: dict) -> MlflowRun:
    """Opens the run dir's MLflow run: the one ``mlflow.json`` names (resume=), else a new one.

    A new run is named and tagged from ``settings`` and gets ``params``; a continued
    one gets the params it lacks, and those whose value changed as
    ``pipeline.resumed_with.<key>`` tags (MLflow keeps a param's first value).

    Args:
        run_dir: the run directory (``mlflow.json`` is read and written there).
        settings: where and under which names to track.
        params: flat ``{key: value}``, e.g. ``{"optimizer.lr": 0.1}``.

    Returns:
        The open run (status RUNNING).

    Raises:
        PipelineError: mlflow is not installed, the server cannot be reached, it
            refuses, or the experiment was deleted.
    """
    client = _client(settings)
    try:
        run_id = _continued_run(client, run_dir, settings)
        if run_id is None:
            run_id = _new_run(client, settings)
            manifest.write_json(
                run_dir / RUN_FILE,
                {
                    "run_id": run_id,
                    "experiment": settings.experiment,
                    "tracking_uri": settings.tracking_uri,
                },
            )
        else:
            client.update_run(run_id, status="RUNNING")
            log.info("MLflow: continuing run %s", run_id)
        _log_params(client, run_id, params)
    except _mlflow_errors() as err:
        raise PipelineError(
            f"logger.mlflow: the tracking store {shown_uri(settings.tracking_uri)} (from "
            f"{settings.uri_from}) refused the run: {_first_line(err)}"
        ) from err
    log.info(
        "MLflow: run %s in experiment %r at %s",
        run_id,
        settings.experiment,
        shown_uri(settings.tracking_uri),
    )
    return MlflowRun(client, run_id, settings)


def confusion_matrix_image(model, data, class_names: list[str]) -> np.ndarray:
    """The confusion matrix of ``model`` on ``data`` (batched images and labels), drawn.

    Returns:
        ``[H, W, 3]`` uint8 (``pipeline.evaluation.plots.render_confusion_matrix``).
    """
    logits = model.predict(data.map(lambda images, *_: images), verbose=0)
    labels = np.concatenate([np.asarray(y) for _, y, *_ in data.as_numpy_iterator()])
    if labels.ndim == 2:  # one-hot
        labels = labels.argmax(1)
    matrix = confusion_matrix(labels, np.asarray(logits).argmax(1), len(class_names))
    return render_confusion_matrix(matrix, class_names)


def numbers(values: dict) -> dict[str, float]:
    """The finite numbers of ``values`` as floats (bools, strings, lists, NaN dropped)."""
    found = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            continue
        if math.isfinite(float(value)):
            found[str(key)] = float(value)
    return found


def check_reachable(uri: str, uri_from: str) -> None:
    """Refuses an ``http(s)`` tracking server that does not answer within a few seconds.

    MLflow's own client retries for minutes before it gives up; this asks the
    server's ``/health`` once. Any HTTP answer (even an error status) counts as
    reachable; stores that are not servers are not checked.

    Raises:
        PipelineError: naming the server, where its address came from and what to do.
    """
    if not uri.lower().startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if "ssl" in type(reason).__name__.lower():
            return  # it answered, in TLS that MLflow's settings may accept
        raise PipelineError(
            f"logger.mlflow: cannot reach the MLflow server at {shown_uri(uri)} (from {uri_from}): "
            f"{reason}. Start it (mlflow server --host 127.0.0.1 --port 5000), point "
            f"{uri_from} at a running one, or train without it (logger=tensorboard)."
        ) from err


def _client(settings: MlflowSettings):
    """An ``MlflowClient`` for the settings' store, once the store is known to be there."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise PipelineError(
            "logger=mlflow needs the mlflow package: pip install 'pipeline-cnn-trainer[mlflow]' "
            f"(or pip install mlflow), or train without it (logger=tensorboard). ({err})"
        ) from err
    check_reachable(settings.tracking_uri, settings.uri_from)
    if settings.tracking_uri.startswith("sqlite:///"):  # SQLite does not make the folder
        Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    for name in ("alembic", "mlflow.store.db.utils"):  # a new SQLite store's set-up chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=settings.tracking_uri)


def _continued_run(client, run_dir: Path, settings: MlflowSettings) -> str | None:
    """The id of the MLflow run ``<run_dir>/mlflow.json`` names, if it can be continued."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        run_id, uri = str(record["run_id"]), record.get("tracking_uri")
    except (ValueError, KeyError, TypeError) as err:
        log.warning("MLflow: %s is unreadable (%s): starting a new MLflow run", path, err)
        return None
    if uri != settings.tracking_uri:
        log.warning(
            "MLflow: this run was tracked at %s, now %s: its epochs so far stay there; a new "
            "MLflow run starts here",
            shown_uri(str(uri)),
            shown_uri(settings.tracking_uri),
        )
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        log.warning("MLflow: run %s is gone from %s: starting a new one", run_id, shown_uri(uri))
        return None
    return run_id


def _new_run(client, settings: MlflowSettings) -> str:
    """Creates the run in its experiment (the experiment too, when missing)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        try:
            client.create_experiment(
                settings.experiment, artifact_location=settings.artifact_location
            )
        except MlflowException:
            if client.get_experiment_by_name(settings.experiment) is None:
                raise  # not made meanwhile by a parallel job of the sweep: a refusal
        experiment = client.get_experiment_by_name(settings.experiment)
    if experiment.lifecycle_stage == "deleted":
        raise PipelineError(
            f"logger.mlflow.experiment={settings.experiment!r} is deleted in "
            f"{shown_uri(settings.tracking_uri)}: restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or name another experiment"
        )
    tags = {key: str(value) for key, value in settings.tags.items()}
    run = client.create_run(experiment.experiment_id, tags=tags, run_name=settings.run_name)
    return run.info.run_id


def _log_params(client, run_id: str, params: dict) -> None:
    """Logs the params the run lacks; values that changed since become tags."""
    from mlflow.entities import Param, RunTag

    logged = client.get_run(run_id).data.params
    new, changed = [], []
    for key, value in params.items():
        key, text = _param_key(key), _param_text(value)[:MAX_PARAM_CHARS]
        if key not in logged:
            new.append(Param(key, text))
        elif logged[key] != text:
            changed.append(RunTag(RESUMED_TAG + key, text))
    for i in range(0, len(new), BATCH_LIMIT):
        client.log_batch(run_id, params=new[i : i + BATCH_LIMIT])
    for i in range(0, len(changed), BATCH_LIMIT):
        client.log_batch(run_id, tags=changed[i : i + BATCH_LIMIT])


def _param_key(key) -> str:
    """``key`` in the characters MLflow takes (letters, digits, ``_-./`` and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", str(key))[:MAX_KEY_CHARS]


def _param_text(value) -> str:
    """A param value as it would be written on the command line (``null``, ``true``, ``[a, b]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_param_text(v) for v in value) + "]"
    return str(value)


def _mlflow_errors() -> tuple[type[BaseException], ...]:
    """What MLflow raises when the store refuses or the network fails (requests' are OSErrors)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def shown_uri(uri: str) -> str:
    """A tracking URI as logs and messages show it: without a password (``//user:***@host``)."""
    return re.sub(r"//([^/:@]+):[^/@]*@", r"//\1:***@", uri)
