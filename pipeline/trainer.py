"""Training under a tf.distribute strategy (or Keras-JAX) with XLA and mixed precision.

``setup_devices`` must run before TensorFlow touches a device; ``plan`` turns
the ``auto`` choices into concrete ones for the devices found; ``fit`` builds
the model under the strategy, runs a pre-flight step (falling back to XLA off,
then float32, when a combination fails), trains with the standard callbacks
and evaluates. Under the JAX backend (``backend=jax``) the devices are JAX's and
the strategy is a :class:`JaxStrategy` (``keras.distribution``); the rest is the same.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import tensorflow as tf

from pipeline import compat, distributed, resume
from pipeline.callbacks import ConfusionMatrixLogger
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device", "default")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = ("auto", True, False)


@dataclass
class Devices:
    """What TensorFlow sees: GPUs with compute capability, and CPU devices."""

    gpus: list[dict]
    cpus: list[str]

    @property
    def min_compute_capability(self) -> tuple[int, int] | None:
        caps = [tuple(g["compute_capability"]) for g in self.gpus if g.get("compute_capability")]
        return min(caps) if caps else None


@dataclass
class Plan:
    """The resolved strategy, precision and XLA choice, and why."""

    strategy: str
    precision: str
    jit_compile: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class FitResult:
    """What training produced: final metrics, per-epoch history, the model."""

    metrics: dict
    history: dict
    attempts: list[dict]
    model: keras.Model


def setup_devices(
    *, logical_cpus: int | None, deterministic: bool, seed: int, backend: str = "tensorflow"
) -> Devices:
    """Configures devices, determinism and seeds; call before any TensorFlow op.

    Args:
        logical_cpus: split the CPU into this many logical devices (to run
            MirroredStrategy without GPUs), or None. TensorFlow backend only.
        deterministic: turn on TensorFlow's op determinism (the tf.data input
            pipeline too under the JAX backend).
        seed: seeds Python, NumPy, TensorFlow and Keras.
        backend: ``tensorflow``, or ``jax``: the devices are JAX's local ones.

    Returns:
        The devices found.
    """
    if backend == "jax":
        return _setup_jax_devices(deterministic=deterministic, seed=seed)
    if logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        configs = [tf.config.LogicalDeviceConfiguration() for _ in range(int(logical_cpus))]
        try:
            tf.config.set_logical_device_configuration(cpu, configs)
        except RuntimeError as err:
            current = len(tf.config.list_logical_devices("CPU"))
            if current != logical_cpus:
                raise PipelineError(
                    f"trainer.logical_cpus={logical_cpus} cannot be applied: TensorFlow "
                    f"already started with {current} CPU device(s) in this process ({err})."
                ) from err
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(
            {
                "name": gpu.name,
                "device_name": details.get("device_name", ""),
                "compute_capability": list(details.get("compute_capability", ()) or ()),
            }
        )
    # Named from the configuration, not listed: listing starts TensorFlow's runtime, and
    # MultiWorkerMirroredStrategy must configure its collective ops before that happens.
    cpu = tf.config.list_physical_devices("CPU")[0]
    n_cpus = len(tf.config.get_logical_device_configuration(cpu) or [cpu])
    cpus = [f"/device:CPU:{i}" for i in range(n_cpus)]
    return Devices(gpus=gpus, cpus=cpus)


def _setup_jax_devices(*, deterministic: bool, seed: int) -> Devices:
    import jax

    if deterministic:
        tf.config.experimental.enable_op_determinism()  # the tf.data pipeline feeding Keras
    keras.utils.set_random_seed(seed)
    local = jax.local_devices()
    gpus = [
        {
            "name": str(d),
            "device_name": getattr(d, "device_kind", ""),
            "compute_capability": [
                int(p) for p in str(getattr(d, "compute_capability", "") or "").split(".") if p
            ],
        }
        for d in local
        if d.platform == "gpu"
    ]
    cpus = [str(d) for d in local if d.platform == "cpu"]
    return Devices(gpus=gpus, cpus=cpus)


def plan(
    *,
    strategy: str,
    precision: str,
    jit_compile,
    devices: Devices,
    backend: str = "tensorflow",
    deterministic: bool = False,
) -> Plan:
    """Resolves ``auto`` choices for the devices found (XLA stays off when ``deterministic``).

    Raises:
        PipelineError: an unknown choice.
    """
    if strategy not in STRATEGIES:
        raise PipelineError(f"trainer.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if precision not in PRECISIONS:
        raise PipelineError(f"trainer.precision must be one of {PRECISIONS}, got {precision!r}")
    if jit_compile not in JIT_CHOICES:
        raise PipelineError(f"trainer.jit_compile must be auto, true or false, got {jit_compile!r}")
    reasons = []
    n_gpus = len(devices.gpus)
    if backend == "jax":
        if strategy == "multi_worker":
            raise PipelineError(
                "trainer.strategy=multi_worker needs backend=tensorflow; under JAX use "
                "trainer.strategy=auto (data parallel over this host's devices)"
            )
        n_local = len(devices.gpus) or len(devices.cpus)
        requested = strategy
        single = strategy in ("one_device", "default") or n_local < 2  # as one TF device
        strategy = "jax_single" if single else "jax_data_parallel"
        reasons.append(f"strategy {requested} -> {strategy} (JAX, {n_local} local device(s))")
    elif strategy == "auto":
        cluster = distributed.cluster_source()
        if cluster == "TF_CONFIG":
            strategy, why = "multi_worker", "TF_CONFIG is set"
        elif cluster == "SLURM":
            strategy, why = "multi_worker", f"a SLURM step of {distributed.slurm_tasks()} tasks"
        elif n_gpus > 1:
            strategy, why = "mirrored", f"{n_gpus} GPUs"
        else:
            strategy, why = "default", f"{n_gpus or 'no'} GPU{'s' if n_gpus != 1 else ''}"
        reasons.append(f"strategy auto -> {strategy} ({why})")
    if precision == "auto":
        cap = devices.min_compute_capability
        if cap is None:
            precision, why = "float32", "no GPU"
        elif cap >= (8, 0):
            precision, why = "mixed_bfloat16", f"compute capability {cap[0]}.{cap[1]}"
        elif cap >= (7, 0):
            precision, why = "mixed_float16", f"compute capability {cap[0]}.{cap[1]}"
        else:
            precision, why = "float32", f"compute capability {cap[0]}.{cap[1]} < 7.0"
        reasons.append(f"precision auto -> {precision} ({why})")
    if jit_compile == "auto" and backend == "jax":
        jit_compile = True  # un-jitted JAX runs op by op, far slower than XLA even on a CPU
        reasons.append("jit_compile auto -> True (JAX)")
    elif jit_compile == "auto" and deterministic and backend == "tensorflow":
        jit_compile = False  # XLA's GPU kernels are not all deterministic
        reasons.append("jit_compile auto -> False (trainer.deterministic)")
    elif jit_compile == "auto":
        jit_compile = n_gpus > 0
        reasons.append(f"jit_compile auto -> {jit_compile} ({'GPU' if n_gpus else 'CPU only'})")
    return Plan(
        strategy=strategy, precision=precision, jit_compile=bool(jit_compile), reasons=reasons
    )


class JaxStrategy:
    """What ``fit`` needs of a strategy under the JAX backend.

    Keras distributes through ``keras.distribution`` there: ``jax_data_parallel``
    sets a global ``DataParallel`` over the local devices, so the scope is a no-op.
    """

    def __init__(self, name: str):
        self.name = name
        self.num_replicas_in_sync = 1
        keras.distribution.set_distribution(None)
        if name == "jax_data_parallel":
            distribution = keras.distribution.DataParallel()
            keras.distribution.set_distribution(distribution)
            self.num_replicas_in_sync = len(distribution.device_mesh.devices.flatten())

    def scope(self):
        return contextlib.nullcontext()


def make_strategy(name: str, devices: Devices) -> tf.distribute.Strategy | JaxStrategy:
    """Creates the tf.distribute strategy ``name`` (already resolved from auto).

    ``jax_single`` and ``jax_data_parallel`` (the JAX backend) give a :class:`JaxStrategy`.
    """
    if name in ("jax_single", "jax_data_parallel"):
        return JaxStrategy(name)
    gpu_names = [g["name"].replace("physical_device:", "") for g in devices.gpus]
    if name in ("mirrored", "multi_worker"):
        compat.patch_symbolic_build()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=gpu_names or devices.cpus)
    if name == "multi_worker":
        compat.patch_multi_worker_reduce()
        resolver = distributed.cluster_resolver()  # None: one worker, this machine's devices
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpu_names[0] if gpu_names else devices.cpus[0])
    if name == "default":
        return tf.distribute.get_strategy()
    raise PipelineError(f"trainer.strategy must be one of {STRATEGIES}, got {name!r}")


class EpochStats(keras.callbacks.Callback):
    """Adds training images/s (validation excluded) to each epoch's logs.

    Placed before TensorBoard and the progress bar, so both show it.
    """

    def __init__(self, images_per_epoch: int):
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.rates: list[float] = []
        self._start = self._train_end = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._train_end = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        if self._start is not None and self._train_end is None:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = self._train_end or time.perf_counter()
        rate = self.images_per_epoch / max(end - self._start, 1e-9)
        self.rates.append(rate)
        if logs is not None:
            logs["images_per_sec"] = rate
        self._start = None


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


def build_compiled(
    *,
    strategy: tf.distribute.Strategy,
    plan: Plan,
    build_model: Callable[[], keras.Model],
    build_optimizer: Callable[[], keras.optimizers.Optimizer],
    preflight_data: tf.data.Dataset | None,
    seed: int,
    compile_kwargs: dict,
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
        changes = []
        if precision != plan.precision:
            changes.append(f"precision {plan.precision} -> {precision}")
        if jit != plan.jit_compile:
            changes.append(f"jit_compile {plan.jit_compile} -> {jit}")
        if changes:
            note = "pre-flight fallback: " + ", ".join(changes)
            log.warning("%s (recorded in metrics.json and manifest.json)", note)
            plan.reasons.append(note)
            plan.precision, plan.jit_compile = precision, jit
        return model, attempts
    keras.mixed_precision.set_global_policy("float32")
    tried = "; ".join(f"{a['precision']}/jit={a['jit_compile']}: {a['error']}" for a in attempts)
    raise PipelineError(
        f"training cannot run with strategy={plan.strategy}: every combination failed "
        f"the pre-flight step ({tried})."
    )


def _callbacks(
    *,
    run_dir: Path,
    images_per_epoch: int,
    checkpoint_monitor: str,
    profile_batches,
    early_stopping: dict | None,
    val_data=None,
    class_names: list[str] | None = None,
    confusion_matrix_every: int = 0,
) -> tuple[list[keras.callbacks.Callback], EpochStats, keras.callbacks.ModelCheckpoint | None]:
    stats = EpochStats(images_per_epoch)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [
        stats,
        keras.callbacks.TensorBoard(
            log_dir=str(run_dir / "tensorboard"),
            profile_batch=tuple(profile_batches) if profile_batches else 0,
        ),
    ]
    if confusion_matrix_every and val_data is not None:
        callbacks.append(
            ConfusionMatrixLogger(
                val_data,
                class_names,
                run_dir / "tensorboard",
                every_n_epochs=confusion_matrix_every,
            )
        )
    best = None
    if val_data is not None:  # no validation split: the final weights are the result
        best = keras.callbacks.ModelCheckpoint(
            str(ckpt_dir / "best.weights.h5"),
            monitor=checkpoint_monitor,
            save_best_only=True,
            save_weights_only=True,
        )
        callbacks.append(best)
    callbacks.append(
        keras.callbacks.ModelCheckpoint(str(ckpt_dir / "last.weights.h5"), save_weights_only=True)
    )
    if early_stopping:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=early_stopping["monitor"],
                patience=int(early_stopping["patience"]),
                restore_best_weights=False,
            )
        )
    return callbacks, stats, best


def _resume_point(restored, epochs: int, train) -> int:
    """The epoch training continues at; replays the shuffle order of the epochs done."""
    if restored is None:
        return 0
    if restored.epoch >= epochs:
        raise PipelineError(
            f"the backup {restored.path} has {restored.epoch} of trainer.epochs={epochs} epochs "
            "done: nothing to resume. Raise trainer.epochs to train longer."
        )
    where = f"epoch {restored.epoch + 1}" + (f", step {restored.step}" if restored.step else "")
    print(f"resuming from {restored.path} at {where}", flush=True)
    for _ in range(restored.epoch * _iterators_per_epoch(train)):
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
def _stop_on_sigterm(state: resume.RunState):
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


def _raise_if_stopped(state: resume.RunState, run_dir: Path) -> None:
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
        raise resume.Preempted(
            f"training stopped by SIGTERM at epoch {stop['epoch']}, step {stop['step']}. {kept}."
        )


def _tta_test_metrics(model, test, mode: str, label_smoothing: float) -> dict:
    """``test_*`` metrics of ``model`` with test-time augmentation ``mode``.

    Computed from the wrapped model's logits: compiling the wrapper would mix
    the inner model's own (compiled) metrics into its results.
    """
    import numpy as np

    from pipeline import tta

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
    """Logs a grid of augmented training images to TensorBoard (Images tab)."""
    images, _ = next(iter(preview))
    writer = tf.summary.create_file_writer(str(log_dir / "train"))
    with writer.as_default():
        tf.summary.image("augmented_training_images", image_grid(images), step=0)
    writer.flush()


def fit(
    *,
    strategy: tf.distribute.Strategy,
    plan: Plan,
    build_model: Callable[[], keras.Model],
    build_optimizer: Callable[[], keras.optimizers.Optimizer],
    data,
    run_dir: str | os.PathLike,
    epochs: int,
    seed: int = 0,
    label_smoothing: float = 0.0,
    steps_per_execution: int = 1,
    preflight: bool = True,
    verbose="auto",
    profile_batches=None,
    checkpoint_monitor: str = "val_accuracy",
    early_stopping: dict | None = None,
    backup: bool = True,
    backup_every_steps: int | None = None,
    restore_dir: str | os.PathLike | None = None,
    signature: dict | None = None,
    class_weight: dict | None = None,
    confusion_matrix_every: int = 0,
    extra_callbacks: list[keras.callbacks.Callback] = (),
    tta: str = "none",
) -> FitResult:
    """Trains ``build_model()`` on ``data`` and evaluates it on val and test.

    Args:
        strategy: from ``make_strategy``.
        plan: from ``plan``; updated when the pre-flight step falls back.
        build_model: builds the Keras model (called under the strategy's scope,
            after the precision policy is set).
        build_optimizer: builds the optimizer, likewise.
        data: a ``pipeline.data.DataBundle``.
        run_dir: where checkpoints, backups and TensorBoard logs go.
        epochs: epochs to train.
        seed: seeds the model's initial weights.
        label_smoothing: of the cross-entropy loss.
        steps_per_execution: training steps per compiled call.
        preflight: run one step first and fall back when it fails.
        verbose: ``auto`` (progress bar on a terminal, a line per epoch
            otherwise), 0, 1 or 2.
        profile_batches: ``[first, last]`` batches to trace into TensorBoard.
        checkpoint_monitor: val metric that picks ``checkpoints/best.weights.h5``.
        early_stopping: ``{"monitor", "patience"}`` or None.
        backup: keep backups under ``run_dir/backup`` (``pipeline.resume``);
            when that folder already holds one, training resumes from it.
        backup_every_steps: also back up every this many batches (long epochs).
        restore_dir: where the backup to resume from is; by default
            ``run_dir/backup``. Under multi-worker training every worker reads
            the chief's (a shared filesystem), whatever it writes itself.
        signature: what the run trains on (model, batch size, data); a
            backup made with a different one is refused.
        class_weight: per-class loss weights, or None.
        confusion_matrix_every: epochs between validation confusion-matrix
            images in TensorBoard; 0 turns them off.
        extra_callbacks: training techniques (``pipeline.callbacks``), called
            before TensorBoard, the checkpoints and backups see each batch and epoch.
        tta: test-time augmentation of the final test metrics
            (``pipeline.tta``): ``none``, ``flip`` or ``flip_translate``; the
            plain test metrics are kept beside them as ``test_plain_*``.

    Returns:
        A ``FitResult``.
    """
    if epochs < 1:
        raise PipelineError(f"trainer.epochs must be >= 1, got {epochs}")
    run_dir = Path(run_dir)
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    compile_kwargs = {
        "label_smoothing": float(label_smoothing),
        "steps_per_execution": int(steps_per_execution),
        "num_classes": data.num_classes,
    }
    model, attempts = build_compiled(
        strategy=strategy,
        plan=plan,
        build_model=build_model,
        build_optimizer=build_optimizer,
        preflight_data=data.first_batch if preflight else None,
        seed=seed,
        compile_kwargs=compile_kwargs,
    )
    callbacks, stats, best = _callbacks(
        run_dir=run_dir,
        images_per_epoch=data.source.train.count,
        checkpoint_monitor=checkpoint_monitor,
        profile_batches=profile_batches,
        early_stopping=early_stopping,
        val_data=data.val,
        class_names=data.class_names,
        confusion_matrix_every=confusion_matrix_every,
    )
    restore_dir = Path(restore_dir) if restore_dir else run_dir / resume.BACKUP_DIR
    restored, sync = None, None
    if backup:
        if not model.optimizer.built:
            with strategy.scope():
                model.optimizer.build(model.trainable_variables)
        restored = resume.restore(restore_dir, model, signature or {})
    if plan.strategy == "multi_worker":
        sync = functools.partial(distributed.sum_over_workers, strategy)
        _check_workers_agree(strategy, restored, restore_dir)
    state = resume.RunState(
        run_dir / resume.BACKUP_DIR if backup else None,
        signature=signature or {},
        every_steps=backup_every_steps,
        best_checkpoint=best,
        restored=restored,
        sync=sync,
    )
    callbacks.append(state)  # last: it backs up after the checkpoints have updated
    # After EpochStats (its images/s leaves out what they do at an epoch's end), before
    # TensorBoard, the checkpoints and backups (which log and save what they change).
    callbacks[1:1] = list(extra_callbacks)
    if restored is not None and 0 < int(data.train.cardinality()) <= restored.step:
        restored.epoch, restored.step = restored.epoch + 1, 0  # stopped after its last batch
    initial_epoch = _resume_point(restored, epochs, data.train)
    if restored is None:
        write_preview(data.preview, run_dir / "tensorboard")
    fit_args = {
        "validation_data": data.val,
        "callbacks": callbacks,
        "verbose": verbose,
        "class_weight": class_weight,
        "shuffle": False,  # the tf.data pipeline shuffles; Keras would only warn
    }
    start = time.perf_counter()
    with _stop_on_sigterm(state):
        if restored is not None and restored.step:  # finish the interrupted epoch first
            model.fit(
                data.train.skip(restored.step),
                epochs=initial_epoch + 1,
                initial_epoch=initial_epoch,
                **fit_args,
            )
            initial_epoch += 1
        if initial_epoch < epochs and not model.stop_training:
            model.fit(data.train, epochs=epochs, initial_epoch=initial_epoch, **fit_args)
    train_time = time.perf_counter() - start
    _raise_if_stopped(state, restore_dir.parent)
    hist = state.history
    metrics = {"train_" + k: v[-1] for k, v in hist.items() if not k.startswith(("val_", "test_"))}
    metrics.pop("train_images_per_sec", None)
    metrics.pop("train_learning_rate", None)
    for split, ds in (("val", data.val), ("test", data.test)):
        if ds is not None:
            result = model.evaluate(ds, verbose=0, return_dict=True)
            metrics.update({f"{split}_{k}": float(v) for k, v in result.items()})
    if tta != "none":  # test_* with TTA; the plain ones stay as test_plain_*
        plain = {k: v for k, v in metrics.items() if k.startswith("test_")}
        metrics.update({k.replace("test_", "test_plain_", 1): v for k, v in plain.items()})
        metrics.update(_tta_test_metrics(model, data.test, tta, float(label_smoothing)), tta=tta)
    monitor = hist.get(checkpoint_monitor)
    if monitor:
        best = max(monitor) if "acc" in checkpoint_monitor else min(monitor)
        metrics[f"best_{checkpoint_monitor}"] = best
        metrics["best_epoch"] = monitor.index(best) + 1
    rates = stats.rates[1:] or stats.rates  # the first epoch pays for tracing
    metrics.update(
        {
            "epochs": len(hist["loss"]),
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
    )
    plain = getattr(model, "inner", model)  # an adversarial-training wrapper saves its inner model
    return FitResult(metrics=metrics, history=hist, attempts=attempts, model=plain)
