"""The training loop under a tf.distribute strategy (or Keras-JAX), XLA and mixed precision.

The devices and the plan come from ``pipeline.training.devices``; ``fit`` builds
the model under the strategy, runs a pre-flight step (falling back to XLA off,
then float32, when a combination fails), trains with the standard callbacks
and evaluates. Under the JAX backend (``backend=jax``) the devices are JAX's and
the strategy is a :class:`JaxStrategy` (``keras.distribution``); the rest is the same.
``fit``'s settings come in three groups: :class:`TrainSettings` (how to train),
:class:`CheckpointSettings` (what is kept, what is resumed) and
:class:`ReportSettings` (console, TensorBoard, test-time augmentation).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from pipeline.errors import PipelineError
from pipeline.training import backups, distributed
from pipeline.training.callbacks import (
    ConfusionMatrixLogger,
    EpochStats,
    RunState,
    StepProfiler,
    TrainingCurves,
    kill_point,
)
from pipeline.training.devices import Plan

log = logging.getLogger(__name__)
PREVIEW_TAG = "images/train_batch_augmented"  # TensorBoard: after the confusion matrices


@dataclass
class FitResult:
    """What training produced: final metrics, per-epoch history, the model."""

    metrics: dict
    history: dict
    attempts: list[dict]
    model: keras.Model


@dataclass(frozen=True)
class TrainSettings:
    """How the model is trained: epochs, loss, seed and training techniques.

    Attributes:
        epochs: epochs to train, >= 1.
        seed: seeds the model's initial weights.
        label_smoothing: of the cross-entropy loss.
        steps_per_execution: training steps per compiled call.
        preflight: run one step first and fall back when it fails.
        class_weight: per-class loss weights, or None.
        early_stopping: ``{"monitor", "patience"}``, or None.
        sync_batchnorm: every BatchNormalization layer normalizes with the
            statistics of the global batch, all-reduced over the replicas
            (Keras's ``synchronized=True``) while training.
        extra_callbacks: training techniques (``pipeline.training.callbacks``), called
            before TensorBoard, the checkpoints and backups see each batch and epoch.
    """

    epochs: int
    seed: int = 0
    label_smoothing: float = 0.0
    steps_per_execution: int = 1
    preflight: bool = True
    class_weight: dict | None = None
    early_stopping: dict | None = None
    extra_callbacks: Sequence[keras.callbacks.Callback] = ()
    sync_batchnorm: bool = False

    def compile_kwargs(self, num_classes: int) -> dict:
        """The ``compile_kwargs`` of :func:`build_compiled` for ``num_classes`` classes."""
        return {
            "label_smoothing": float(self.label_smoothing),
            "steps_per_execution": int(self.steps_per_execution),
            "num_classes": num_classes,
        }


@dataclass(frozen=True)
class CheckpointSettings:
    """What training keeps under the run dir, and the backup it resumes from.

    Attributes:
        monitor: val metric that picks ``checkpoints/best.weights.h5``.
        backup: keep backups under ``run_dir/backup`` (``pipeline.training.backups``);
            when ``restore_dir`` already holds one, training resumes from it.
        backup_every_steps: also back up every this many batches (long epochs).
        restore_dir: where the backup to resume from is; None: ``run_dir/backup``.
            Under multi-worker training every worker reads the chief's (a
            shared filesystem), whatever it writes itself.
        signature: what the run trains on (model, batch size, data); a backup
            made with a different one is refused.
        finished: the run finished before (its ``metrics.json`` exists): a backup
            with every epoch done is then nothing to resume; without it, the run
            was killed after training and only evaluates and returns.
    """

    monitor: str = "val_accuracy"
    backup: bool = True
    backup_every_steps: int | None = None
    restore_dir: str | os.PathLike | None = None
    signature: dict | None = None
    finished: bool = False

    def restore_from(self, run_dir: Path) -> Path:
        """The folder holding the backup to resume from, for a run in ``run_dir``."""
        return Path(self.restore_dir) if self.restore_dir else run_dir / backups.BACKUP_DIR


@dataclass(frozen=True)
class ReportSettings:
    """What training shows besides its metrics, and how the test metrics are taken.

    Attributes:
        verbose: ``auto`` (progress bar on a terminal, a line per epoch
            otherwise), 0, 1 or 2.
        profile_batches: ``[first, last]`` batches (1-based) to trace into
            TensorBoard's Profile tab, each a step (:class:`StepProfiler`), or None.
        confusion_matrix_every: epochs between validation confusion-matrix
            images in TensorBoard; 0 turns them off.
        log_every_steps: optimizer steps between two points of TensorBoard's
            ``batch/loss`` and ``batch/lr`` (learning rate); None or 0: per epoch only.
        tta: test-time augmentation of the final test metrics
            (``pipeline.evaluation.tta``): ``none``, ``flip`` or ``flip_translate``;
            the plain test metrics are kept beside them as ``test_plain_*``.
        tensorboard: write TensorBoard logs (curves, images, profile) under
            ``<run_dir>/tensorboard``; False: none (another logger reports).
    """

    verbose: int | str = "auto"
    profile_batches: Sequence[int] | None = None
    confusion_matrix_every: int = 0
    tta: str = "none"
    tensorboard: bool = True
    log_every_steps: int | None = None


def _fallbacks(precision: str, jit_compile: bool) -> list[tuple[str, bool]]:
    """The combinations to try, in order: as planned, XLA off, then float32."""
    tries = [(precision, jit_compile)]
    if jit_compile:
        tries.append((precision, False))
    if precision != "float32":
        tries.append(("float32", False))
    return tries


NOISE_PREFIXES = ("Graph execution error", "Detected at node", "<stack traces", "File ")


def _short(err: BaseException) -> str:
    """The informative line of an error: TensorFlow's first lines are boilerplate."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(NOISE_PREFIXES)]
    text = (useful or lines or [""])[0]
    return f"{type(err).__name__}: {text[:300]}"


def _compile(model, optimizer, *, jit_compile, label_smoothing, steps_per_execution, num_classes):
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=label_smoothing
        ),
        metrics=metrics,
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


def _preflight_step(model, batch_ds) -> None:
    """Runs one training step, then puts weights and optimizer state back."""
    model.optimizer.build(model.trainable_variables)
    weights = model.get_weights()
    opt_state = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    history = model.fit(batch_ds, epochs=1, verbose=0, shuffle=False)
    loss = history.history["loss"][-1]
    if not math.isfinite(loss):
        log.warning("Pre-flight step gave a non-finite loss (%s)", loss)
    model.set_weights(weights)
    for var, value in zip(model.optimizer.variables, opt_state, strict=True):
        var.assign(value)


def synchronize_batchnorm(model: keras.Model, on: bool = True) -> int:
    """Sets ``synchronized`` on every BatchNormalization layer of ``model``; returns how many.

    Synchronized, a layer normalizes each replica's slice with the mean and
    variance of the whole global batch (a sum all-reduced over the replicas,
    Keras's ``synchronized=True``), and updates its moving statistics from
    them, so several replicas do one device's math. Set before the training
    function is traced; turned off again after training, so a saved model
    loads on any backend (inference uses the moving statistics either way).
    ``pipeline.models.layers.BatchNorm`` then leaves its fused kernel for
    Keras's normalization.
    """
    layers = [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in layers:
        layer.synchronized = on
    return len(layers)


def worker_input(data, strategy, *, first: bool = False, class_weight=None):
    """For a worker that decodes only its share: ``input(skip)``, its batches distributed.

    Every ``input(skip)`` reads one per-worker pipeline (one shuffle state, as
    ``data.train.skip`` reads ``data.train``'s), through
    ``distribute_datasets_from_function``, with the class weights as sample
    weights (Keras cannot map a distributed dataset).
    """
    import tensorflow as tf

    made = {}

    def pipeline():
        if "ds" not in made:
            ds = data.worker_batches(first=first)
            if class_weight:
                weights = tf.constant([class_weight[i] for i in range(len(class_weight))])
                ds = ds.map(lambda x, y: (x, y, tf.gather(weights, tf.argmax(y, axis=-1))))
            made["ds"] = ds
        return made["ds"]

    def make(skip: int = 0):
        replicas = data.shard.replicas
        distributed_ds = strategy.distribute_datasets_from_function(
            lambda context: pipeline().skip(skip * replicas) if skip else pipeline()
        )
        # A worker yields one batch per local replica and step; Keras counts steps from this.
        distributed_ds._cardinality = int(distributed_ds.cardinality) // replicas
        return distributed_ds

    return make


def _preflight_data(data, strategy):
    if data.worker_batches is None:
        return data.first_batch
    return worker_input(data, strategy, first=True)()


def build_compiled(
    *,
    strategy: tf.distribute.Strategy,
    plan: Plan,
    build_model: Callable[[], keras.Model],
    build_optimizer: Callable[[], keras.optimizers.Optimizer],
    preflight_data: tf.data.Dataset | None,
    seed: int,
    compile_kwargs: dict,
    sync_batchnorm: bool = False,
) -> tuple[keras.Model, list[dict]]:
    """Builds and compiles the model, trying fallbacks when a step fails.

    Returns:
        The compiled model and the attempts made (each with precision,
        jit_compile, ok and error); ``plan`` is updated to what worked.

    Raises:
        PipelineError: every combination failed.
    """
    attempts = []
    for precision, jit in _fallbacks(plan.precision, plan.jit_compile):
        keras.backend.clear_session()
        keras.mixed_precision.set_global_policy(precision)
        keras.utils.set_random_seed(seed)
        with strategy.scope():
            model = build_model()  # a bad model argument is the user's to fix: no fallback
            optimizer = build_optimizer()
        synchronize_batchnorm(model, sync_batchnorm)
        try:
            with strategy.scope():
                _compile(model, optimizer, jit_compile=jit, **compile_kwargs)
                if preflight_data is not None:
                    _preflight_step(model, preflight_data)
        except Exception as err:  # any failure of this combination: try the next
            attempts.append(
                {"precision": precision, "jit_compile": jit, "ok": False, "error": _short(err)}
            )
            log.warning(
                "Pre-flight failed with strategy=%s precision=%s jit_compile=%s: %s",
                plan.strategy,
                precision,
                jit,
                _short(err),
            )
            continue
        attempts.append({"precision": precision, "jit_compile": jit, "ok": True, "error": None})
        _adopt(plan, precision, jit)
        return model, attempts
    keras.mixed_precision.set_global_policy("float32")
    tried = "; ".join(f"{a['precision']}/jit={a['jit_compile']}: {a['error']}" for a in attempts)
    raise PipelineError(
        f"training cannot run with strategy={plan.strategy}: every combination failed "
        f"the pre-flight step ({tried})."
    )


def _adopt(plan: Plan, precision: str, jit_compile: bool) -> None:
    """Updates ``plan`` to the combination that worked, noting the fallback in its reasons."""
    changes = []
    if precision != plan.precision:
        changes.append(f"precision {plan.precision} -> {precision}")
    if jit_compile != plan.jit_compile:
        changes.append(f"jit_compile {plan.jit_compile} -> {jit_compile}")
    if changes:
        note = "pre-flight fallback: " + ", ".join(changes)
        log.warning("%s (recorded in metrics.json and manifest.json)", note)
        plan.reasons.append(note)
        plan.precision, plan.jit_compile = precision, jit_compile


def _callbacks(
    run_dir: Path,
    data,
    training: TrainSettings,
    checkpoints: CheckpointSettings,
    reports: ReportSettings,
) -> tuple[list[keras.callbacks.Callback], EpochStats, keras.callbacks.ModelCheckpoint | None]:
    """The standard callbacks, the images/s counter, and the best checkpoint (None: no val)."""
    stats = EpochStats(data.source.train.count)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [stats, *_tensorboard(run_dir / "tensorboard", data, reports)]
    best = None
    if data.val is not None:  # no validation split: the final weights are the result
        best = keras.callbacks.ModelCheckpoint(
            str(ckpt_dir / "best.weights.h5"),
            monitor=checkpoints.monitor,
            save_best_only=True,
            save_weights_only=True,
        )
        callbacks.append(best)
    callbacks.append(
        keras.callbacks.ModelCheckpoint(str(ckpt_dir / "last.weights.h5"), save_weights_only=True)
    )
    early = training.early_stopping
    if early:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=early["monitor"],
                patience=int(early["patience"]),
                restore_best_weights=False,
            )
        )
    # After EpochStats (its images/s leaves them out), before TensorBoard, checkpoints, backups.
    callbacks[1:1] = list(training.extra_callbacks)
    return callbacks, stats, best


def _tensorboard(log_dir: Path, data, reports: ReportSettings) -> list[keras.callbacks.Callback]:
    """TensorBoard's curves, validation confusion matrices and profiler (none without TensorBoard).

    Raises:
        PipelineError: ``log_every_steps`` < 0 or ``profile_batches`` not ``[first, last]``
            with ``1 <= first <= last``.
    """
    if not reports.tensorboard:
        return []
    every = reports.log_every_steps
    if every is not None and int(every) < 0:
        raise PipelineError(
            f"trainer.log_every_steps must be >= 0 (0: per epoch only), got {every}"
        )
    callbacks = [TrainingCurves(log_dir, every_steps=every)]
    if reports.confusion_matrix_every and data.val is not None:
        callbacks.append(
            ConfusionMatrixLogger(
                data.val, data.class_names, log_dir, every_n_epochs=reports.confusion_matrix_every
            )
        )
    if reports.profile_batches:
        first, last = _profile_range(reports.profile_batches)
        callbacks.append(StepProfiler(log_dir / "train", first, last))
    return callbacks


def _profile_range(batches) -> tuple[int, int]:
    """``[first, last]`` (or one batch) as two ints.

    Raises:
        PipelineError: not one or two whole numbers with ``1 <= first <= last``.
    """
    shown = (
        list(batches) if isinstance(batches, Sequence) and not isinstance(batches, str) else batches
    )
    try:
        numbers = [int(b) for b in (shown if isinstance(shown, list) else [shown])]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) not in (1, 2) or not 1 <= numbers[0] <= numbers[-1]:
        raise PipelineError(
            "trainer.profile_batches must be [first, last] batches with 1 <= first <= last "
            f"(e.g. [10, 20]), got {shown}"
        )
    return numbers[0], numbers[-1]


def _run_state(
    model, strategy, plan: Plan, run_dir: Path, checkpoints: CheckpointSettings, best
) -> tuple[RunState, backups.Restored | None]:
    """The backup callback, and the backup training resumes from (None: from the start).

    Raises:
        PipelineError: a backup of another run, or workers that found different backups.
    """
    restore_dir = checkpoints.restore_from(run_dir)
    restored, sync = None, None
    if checkpoints.backup:
        if not model.optimizer.built:
            with strategy.scope():
                model.optimizer.build(model.trainable_variables)
        restored = backups.restore(restore_dir, model, checkpoints.signature or {})
    if plan.strategy == "multi_worker":
        sync = functools.partial(distributed.sum_over_workers, strategy)
        _check_workers_agree(strategy, restored, restore_dir)
    state = RunState(
        run_dir / backups.BACKUP_DIR if checkpoints.backup else None,
        signature=checkpoints.signature or {},
        every_steps=checkpoints.backup_every_steps,
        best_checkpoint=best,
        restored=restored,
        sync=sync,
    )
    return state, restored


def _resume_point(restored, epochs: int, train, finished: bool = False, replay: int = 1) -> int:
    """The epoch training continues at; replays the shuffle order of the epochs done.

    A backup with every epoch done is of a run killed after training (before
    ``metrics.json``): its epoch is returned, and no epoch is trained.
    """
    if restored is None:
        return 0
    if restored.epoch >= epochs and not finished:
        print(
            f"training ended before the run was stopped ({restored.path}, {restored.epoch} "
            "epochs): finishing the run (evaluation, model.keras, records, exports)",
            flush=True,
        )
        return restored.epoch
    if restored.epoch >= epochs:
        raise PipelineError(
            f"the backup {restored.path} has {restored.epoch} of trainer.epochs={epochs} epochs "
            "done: nothing to resume. Raise trainer.epochs to train longer."
        )
    where = f"epoch {restored.epoch + 1}" + (f", step {restored.step}" if restored.step else "")
    print(f"resuming from {restored.path} at {where}", flush=True)
    for _ in range(restored.epoch * replay):
        iter(train)  # each iterator draws the next shuffle order: replay the epochs done
    return restored.epoch


def _check_workers_agree(strategy, restored, restore_dir: Path) -> None:
    """Every worker must resume from the same step, or the collectives would hang."""
    step = -1.0 if restored is None else float(restored.epoch * 1_000_000 + restored.step)
    if not distributed.all_equal(strategy, step):
        mine = "none" if restored is None else restored.path.name
        raise PipelineError(
            f"the workers found different backups to resume from (this one: {mine} in "
            f"{restore_dir}). Give every worker the same hydra.run.dir on a filesystem they "
            "share, so all resume from the chief's backups."
        )


def _iterators_per_epoch(train) -> int:
    """How many iterators Keras's fit makes per epoch over ``train``.

    Keras 3.15's ``EpochIterator`` makes one when an epoch starts and, when the
    dataset's length is known, one more when it ends (for a next epoch that
    then makes its own). Each draws the next reshuffle, so a resumed run skips
    as many to see the shuffle order the killed run would have seen.
    """
    return 2 if int(train.cardinality()) > 0 else 1


@contextlib.contextmanager
def _stop_on_sigterm(state: RunState):
    """While training, SIGTERM asks ``state`` to back up at the next batch and stop."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, state.request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_if_stopped(state: RunState, run_dir: Path) -> None:
    kept = (
        f"The last good backup, {state.last_backup}, is kept: resume with "
        f"`python -m pipeline.train resume={run_dir}`"
        if state.last_backup
        else "No backup was made before it"
    )
    if state.non_finite:
        bad = state.non_finite
        what = (
            f"the loss became {bad['loss']} at epoch {bad['epoch']}, step {bad['step']}"
            if bad["loss"] != "weights"
            else f"weights became NaN or Inf in epoch {bad['epoch']} (found at its end)"
        )
        raise PipelineError(
            f"training stopped: {what}. {kept} and a lower optimizer.lr, or check the data."
        )
    if state.preempted:
        stop = state.preempted
        raise backups.Preempted(
            f"training stopped by SIGTERM at epoch {stop['epoch']}, step {stop['step']}. {kept}."
        )


def _tta_test_metrics(model, test, mode: str, label_smoothing: float) -> dict:
    """``test_*`` metrics of ``model`` with test-time augmentation ``mode``.

    Computed from the wrapped model's logits: compiling the wrapper would mix
    the inner model's own (compiled) metrics into its results.
    """
    import numpy as np

    from pipeline.evaluation import tta

    wrapped = tta.with_tta(model, mode)
    logits = wrapped.predict(test.map(lambda images, labels: images), verbose=0)
    labels = np.concatenate([keras.ops.convert_to_numpy(y) for _, y in test])
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)
    ranks = np.argsort(-logits, axis=1)
    truth = labels.argmax(axis=1)
    metrics = {
        "test_loss": float(loss(labels, logits)),
        "test_accuracy": float(np.mean(ranks[:, 0] == truth)),
    }
    if labels.shape[1] > 5:
        metrics["test_top5_accuracy"] = float(np.mean((ranks[:, :5] == truth[:, None]).any(1)))
    return metrics


def image_grid(images, columns: int = 8) -> tf.Tensor:
    """Tiles ``[N, H, W, 3]`` 0..255 images into one ``[1, rows*H, columns*W, 3]`` uint8 image."""
    images = tf.cast(tf.clip_by_value(images, 0, 255), tf.uint8)
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    rows = -(-n // columns)
    pad = rows * columns - n
    images = tf.concat([images, tf.zeros([pad, h, w, 3], tf.uint8)], 0)
    grid = tf.reshape(images, [rows, columns, h, w, 3])
    grid = tf.reshape(tf.transpose(grid, [0, 2, 1, 3, 4]), [1, rows * h, columns * w, 3])
    return grid


def write_preview(preview: tf.data.Dataset, log_dir: Path) -> None:
    """Logs a grid of augmented training images to TensorBoard (``images/`` group)."""
    images, _ = next(iter(preview))
    writer = tf.summary.create_file_writer(str(log_dir / "train"))
    with writer.as_default():
        tf.summary.image(
            PREVIEW_TAG,
            image_grid(images),
            step=0,
            description="A batch of training images as augmentation leaves them.",
        )
    writer.close()


def fit(
    *,
    strategy: tf.distribute.Strategy,
    plan: Plan,
    build_model: Callable[[], keras.Model],
    build_optimizer: Callable[[], keras.optimizers.Optimizer],
    data,
    run_dir: str | os.PathLike,
    training: TrainSettings,
    checkpoints: CheckpointSettings | None = None,
    reports: ReportSettings | None = None,
) -> FitResult:
    """Trains ``build_model()`` on ``data`` and evaluates it on val and test.

    Long: the whole run in order (build, resume, train, evaluate, the facts).

    Args:
        strategy: from ``make_strategy``.
        plan: from ``plan``; updated when the pre-flight step falls back.
        build_model: builds the Keras model (called under the strategy's scope,
            after the precision policy is set).
        build_optimizer: builds the optimizer, likewise.
        data: a ``pipeline.data.DataBundle``.
        run_dir: where checkpoints, backups and TensorBoard logs go.
        training: epochs, loss, seed and training techniques.
        checkpoints: checkpoints, backups, resuming; None: ``CheckpointSettings()``.
        reports: console, TensorBoard, test-time augmentation; None: ``ReportSettings()``.

    Returns:
        A ``FitResult``.

    Raises:
        PipelineError: ``training.epochs`` < 1, every pre-flight combination failed,
            a backup that cannot be resumed, or a non-finite loss stopped training.
        backups.Preempted: SIGTERM stopped training (after a backup).
    """
    if training.epochs < 1:
        raise PipelineError(f"trainer.epochs must be >= 1, got {training.epochs}")
    run_dir = Path(run_dir)
    checkpoints, reports = checkpoints or CheckpointSettings(), reports or ReportSettings()
    model, attempts = build_compiled(
        strategy=strategy,
        plan=plan,
        build_model=build_model,
        build_optimizer=build_optimizer,
        preflight_data=_preflight_data(data, strategy) if training.preflight else None,
        seed=training.seed,
        compile_kwargs=training.compile_kwargs(data.num_classes),
        sync_batchnorm=training.sync_batchnorm,
    )
    callbacks, stats, best = _callbacks(run_dir, data, training, checkpoints, reports)
    state, restored = _run_state(model, strategy, plan, run_dir, checkpoints, best)
    callbacks.append(state)  # last: it backs up after the checkpoints have updated
    try:
        train_time = _train(
            model,
            data,
            callbacks,
            state,
            restored,
            run_dir,
            training,
            reports,
            checkpoints.finished,
        )
    finally:
        synchronize_batchnorm(model, False)
    _raise_if_stopped(state, checkpoints.restore_from(run_dir).parent)
    metrics = _train_metrics(state.history)
    metrics.update(_evaluate(model, data, reports.tta, training.label_smoothing))
    metrics.update(_best_of(state.history, checkpoints.monitor))
    metrics.update(_run_facts(state.history, stats, train_time, plan, strategy, attempts, restored))
    metrics["sync_batchnorm"] = training.sync_batchnorm
    if data.shard is not None:
        metrics["data_shard"] = {"worker": data.shard.index, "workers": data.shard.count}
    plain = getattr(model, "inner", model)  # an adversarial-training wrapper saves its inner model
    return FitResult(metrics=metrics, history=state.history, attempts=attempts, model=plain)


def _train(
    model: keras.Model,
    data,
    callbacks: list[keras.callbacks.Callback],
    state: RunState,
    restored: backups.Restored | None,
    run_dir: Path,
    training: TrainSettings,
    reports: ReportSettings,
    finished: bool = False,
) -> float:
    """Runs ``model.fit`` from where ``restored`` stopped (or the start); returns the seconds."""
    if restored is not None and 0 < int(data.train.cardinality()) <= restored.step:
        restored.epoch, restored.step = restored.epoch + 1, 0  # stopped after its last batch
    verbose = reports.verbose
    if data.service_batches is not None:  # batches numbered over the run: nothing to replay
        initial_epoch = _resume_point(restored, training.epochs, None, finished, replay=0)
        if restored is None and reports.tensorboard:
            write_preview(data.preview, run_dir / "tensorboard")
        args = (model, data, callbacks, state, restored, initial_epoch, training, verbose)
        return _train_on_service(*args)
    sharded = data.worker_batches is not None  # class weights go into the worker's batches
    if sharded:
        make = worker_input(data, model.distribute_strategy, class_weight=training.class_weight)
    else:
        make = lambda skip=0: data.train.skip(skip) if skip else data.train  # noqa: E731
    replay = _iterators_per_epoch(data.train)
    initial_epoch = _resume_point(restored, training.epochs, make(), finished, replay)
    if restored is None and reports.tensorboard:
        write_preview(data.preview, run_dir / "tensorboard")
    fit_args = _fit_args(data, callbacks, verbose, None if sharded else training.class_weight)
    start = time.perf_counter()
    with _stop_on_sigterm(state):
        if restored is not None and restored.step:  # finish the interrupted epoch first
            model.fit(
                make(restored.step),
                epochs=initial_epoch + 1,
                initial_epoch=initial_epoch,
                **fit_args,
            )
            initial_epoch += 1
        if initial_epoch < training.epochs and not model.stop_training:
            model.fit(make(), epochs=training.epochs, initial_epoch=initial_epoch, **fit_args)
    return time.perf_counter() - start


def _fit_args(data, callbacks, verbose, class_weight) -> dict:
    """What every ``model.fit`` call of a run shares."""
    return {
        "validation_data": data.val,
        "callbacks": callbacks,
        "verbose": (1 if sys.stdout.isatty() else 2) if verbose == "auto" else verbose,
        "class_weight": class_weight,
        "shuffle": False,  # the tf.data pipeline shuffles; Keras would only warn
    }


def _train_on_service(
    model, data, callbacks, state, restored, initial_epoch, training, verbose
) -> float:
    """``model.fit`` on batches a tf.data service makes (``data.service``), from where it stopped.

    The run's batches are numbered over its epochs; one service job serves
    them all, and Keras takes ``steps`` of them per epoch. The job offers one
    epoch more than the run needs: a service worker that dies loses the
    batches it was making (each batch is made at most once), and the next ones
    take their place.
    """
    steps = data.steps_per_epoch()
    skip = restored.step if restored is not None and initial_epoch < training.epochs else 0
    fit_args = _fit_args(data, callbacks, verbose, training.class_weight)
    start = time.perf_counter()
    with _stop_on_sigterm(state):
        if skip:  # finish the interrupted epoch first
            first = initial_epoch * steps + skip
            model.fit(
                data.service_batches(start=first, stop=(initial_epoch + 2) * steps),
                epochs=initial_epoch + 1,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps - skip,
                **fit_args,
            )
            initial_epoch += 1
        if initial_epoch < training.epochs and not model.stop_training:
            model.fit(
                data.service_batches(
                    start=initial_epoch * steps, stop=(training.epochs + 1) * steps
                ),
                epochs=training.epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps,
                **fit_args,
            )
    return time.perf_counter() - start


def _train_metrics(history: dict) -> dict:
    """``train_*``: the last epoch's training metrics (not its images/s or learning rate)."""
    metrics = {
        "train_" + k: v[-1] for k, v in history.items() if not k.startswith(("val_", "test_"))
    }
    metrics.pop("train_images_per_sec", None)
    metrics.pop("train_learning_rate", None)
    return metrics


def _evaluate(model, data, tta: str, label_smoothing: float) -> dict:
    """``val_*`` and ``test_*`` of the trained model; with ``tta``, also ``test_plain_*``."""
    kill_point("evaluate")
    metrics = {}
    for split, ds in (("val", data.val), ("test", data.test)):
        if ds is not None:
            result = model.evaluate(ds, verbose=0, return_dict=True)
            metrics.update({f"{split}_{k}": float(v) for k, v in result.items()})
    if tta != "none":  # test_* with TTA; the plain ones stay as test_plain_*
        plain = {k: v for k, v in metrics.items() if k.startswith("test_")}
        metrics.update({k.replace("test_", "test_plain_", 1): v for k, v in plain.items()})
        metrics.update(_tta_test_metrics(model, data.test, tta, float(label_smoothing)), tta=tta)
    return metrics


def _best_of(history: dict, monitor: str) -> dict:
    """``best_<monitor>`` and ``best_epoch`` (1-based), or nothing without that metric."""
    values = history.get(monitor)
    if not values:
        return {}
    best = max(values) if "acc" in monitor else min(values)
    return {f"best_{monitor}": best, "best_epoch": values.index(best) + 1}


def _run_facts(
    history: dict,
    stats: EpochStats,
    train_time: float,
    plan: Plan,
    strategy,
    attempts: list[dict],
    restored: backups.Restored | None,
) -> dict:
    """Epochs, time, median images/s, the plan that ran, its fallbacks and the resume point."""
    rates = stats.rates[1:] or stats.rates  # the first epoch pays for tracing
    return {
        "epochs": len(history["loss"]),
        "train_time_s": train_time,
        "images_per_sec": sorted(rates)[len(rates) // 2] if rates else 0.0,
        "strategy": plan.strategy,
        "num_replicas": int(strategy.num_replicas_in_sync),
        "precision": plan.precision,
        "jit_compile": plan.jit_compile,
        "fallbacks": [a for a in attempts if not a["ok"]],
        "resumed_from": None
        if restored is None
        else {"backup": restored.path.name, "epoch": restored.epoch, "step": restored.step},
    }
