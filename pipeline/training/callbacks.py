"""Training callbacks of our own (Keras's are created in ``pipeline.training.loop``).

``EpochStats`` (images/s), ``RunState`` (backups, a clean stop on SIGTERM or a
non-finite loss), TensorBoard's ``TrainingCurves``, ``ConfusionMatrixLogger`` and
``StepProfiler``, and the techniques the config turns on: ``Lookahead``,
``FreezeLayers``, ``AlternatingFlipEpochs`` and ``EvaluateEachEpoch``.

TensorBoard sorts its cards by tag and groups them by the tag's first part, so
the tags are chosen for the order a look at a run wants: ``batch/`` (loss and
learning rate every few steps), ``epoch/`` (loss, accuracy, learning rate; the
train, validation and test runs on one chart each), ``images/`` (confusion
matrix, an augmented batch), and last the final values the HParams dashboard
needs (``pipeline.runs.hparams``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.evaluation.metrics import confusion_matrix
from pipeline.evaluation.plots import CONFUSION_MATRIX_TAG, render_confusion_matrix
from pipeline.training import backups

log = logging.getLogger(__name__)

STEP_GROUP = "batch"  # tags of the curves every few optimizer steps: batch/loss, batch/lr
EPOCH_GROUP = "epoch"  # tags of the curves per epoch: epoch/loss, epoch/accuracy, ...
SUMMARY_TAG = CONFUSION_MATRIX_TAG  # images/confusion_matrix, in the run validation
RUNS = {"val_": "validation", "test_": "test"}  # a log's prefix -> its TensorBoard run
# "lr" sorts after "loss", so a group's first row shows the loss; images/s: of training only
RENAMED = {"learning_rate": "lr", "images_per_sec": "train_images_per_sec"}
KILL_HOOK = "PIPELINE_TEST_KILL_AT"  # test hook: "epoch:step[:TERM]" (1-based) SIGKILLs (or
# SIGTERMs) this process there
NAN_HOOK = "PIPELINE_TEST_NAN_AT"  # test hook: "epoch:step" puts a NaN into the weights there
KILL_AFTER_TRAINING_HOOK = "PIPELINE_TEST_KILL_AFTER_TRAINING"  # test hook: SIGKILLs this
# process as it starts that step after training: evaluate | save | records | export


def kill_point(step: str) -> None:
    """Test hook: SIGKILLs this process when ``PIPELINE_TEST_KILL_AFTER_TRAINING`` is ``step``."""
    if os.environ.get(KILL_AFTER_TRAINING_HOOK) == step:
        os.kill(os.getpid(), signal.SIGKILL)


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


class RunState(keras.callbacks.Callback):
    """Backs the run up, and stops it cleanly on a non-finite loss or on SIGTERM.

    Backups are written at every epoch end and, with ``every_steps``, every
    that many batches. A non-finite loss stops training without a backup of
    the bad state, so the last good one stays; SIGTERM saves a backup at the
    next batch end and stops (:attr:`preempted`).

    Args:
        directory: the backup folder, or None for no backups.
        signature: what the run trains on, stored with each backup.
        every_steps: also back up every this many batches (None: epochs only).
        best_checkpoint: the ``ModelCheckpoint`` whose ``best`` value is kept.
        restored: the backup training resumes from, or None.
        save: whether this process writes backups.
        sync: under multi-worker training, sums a number over all workers (a
            collective, called after every batch), so that a SIGTERM to any
            worker stops them all at the same step.
    """

    def __init__(
        self,
        directory: Path | None,
        *,
        signature: dict,
        every_steps: int | None = None,
        best_checkpoint=None,
        restored: backups.Restored | None = None,
        save: bool = True,
        sync=None,
    ):
        super().__init__()
        self.directory = directory
        self.signature = signature
        self.every_steps = int(every_steps) if every_steps else 0
        self.best_checkpoint = best_checkpoint
        self.history: dict = {k: list(v) for k, v in (restored.history if restored else {}).items()}
        self.resume_epoch = restored.epoch if restored else 0
        self.resume_step = restored.step if restored else 0
        self.write = save and directory is not None
        self.sync = sync
        self.non_finite: dict | None = None  # {"epoch", "step", "loss"} once training went bad
        self.preempted: dict | None = None  # {"epoch", "step", "backup"} after SIGTERM
        self.last_backup: Path | None = restored.path if restored else None
        self._stop_requested = threading.Event()
        self._epoch = 0
        self._offset = 0
        self._step = 0
        self._kill_at = _hook(KILL_HOOK)
        self._nan_at = _hook(NAN_HOOK)
        if restored and best_checkpoint is not None and restored.best is not None:
            best_checkpoint.best = restored.best

    def request_stop(self, *_args) -> None:
        """Signal handler: save at the next batch end and stop."""
        self._stop_requested.set()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        first_resumed = epoch == self.resume_epoch and self.resume_step
        self._offset = self.resume_step if first_resumed else 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._nan_at and self._nan_at[:2] == (self._epoch + 1, self._offset + batch + 1):
            for weight in self.model.trainable_variables:  # as a diverged update leaves them
                weight.assign(keras.ops.full(weight.shape, float("nan"), weight.dtype))

    def on_train_batch_end(self, batch, logs=None):
        self._step = self._offset + batch + 1
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.non_finite = {"epoch": self._epoch + 1, "step": self._step, "loss": float(loss)}
            self.model.stop_training = True
            return
        stop = self._stop_requested.is_set()
        if self.sync is not None:
            stop = self.sync(float(stop)) > 0
        if stop:
            path = self._save(self._epoch, self._step)
            self.preempted = {"epoch": self._epoch + 1, "step": self._step, "backup": path}
            self.model.stop_training = True
            return
        if self.every_steps and self._step % self.every_steps == 0:
            self._save(self._epoch, self._step)
        if self._kill_at and self._kill_at[:2] == (self._epoch + 1, self._step):
            os.kill(os.getpid(), signal.SIGTERM if self._kill_at[2] == "TERM" else signal.SIGKILL)

    def on_epoch_end(self, epoch, logs=None):
        if self.non_finite or self.preempted:
            return
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.non_finite = {"epoch": epoch + 1, "step": self._step, "loss": float(loss)}
            return
        if not _all_finite(self.model.trainable_variables):  # a NaN a ReLU hid from the loss
            self.non_finite = {"epoch": epoch + 1, "step": self._step, "loss": "weights"}
            self.model.stop_training = True
            return
        self._save(epoch + 1, 0)

    def _save(self, epoch: int, step: int) -> Path | None:
        if not self.write:
            return None
        best = getattr(self.best_checkpoint, "best", None)
        self.last_backup = backups.save(
            self.directory,
            self.model,
            epoch=epoch,
            step=step,
            history=self.history,
            best=None if best is None else float(best),
            signature=self.signature,
        )
        return self.last_backup


def _all_finite(variables) -> bool:
    return all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in variables)


def _hook(name: str) -> tuple | None:
    value = os.environ.get(name)
    if not value:
        return None
    epoch, step, *how = value.split(":")
    return int(epoch), int(step), *(how or ["KILL"])


class TrainingCurves(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback, its curves named and spaced for a first look at a run.

    Per epoch, ``epoch/<metric>`` into the runs ``train``, ``validation`` and
    ``test`` (``EvaluateEachEpoch``'s), so that one chart holds a metric of every
    split, and ``epoch/lr`` (the learning rate) and ``epoch/train_images_per_sec``
    into ``train``. Every ``every_steps`` optimizer steps, ``batch/loss`` (the
    mean training loss of the batches since the previous point of that epoch)
    and ``batch/lr`` at the optimizer's step, so warm-up and one-cycle shapes
    show. Keras's ``evaluation_<metric>_vs_iterations`` (the validation curves
    again, against steps) are left out; its model graph is kept.

    Args:
        log_dir: the run's TensorBoard directory.
        every_steps: optimizer steps between two ``batch/`` points; None or 0: none.

    Raises:
        ValueError: ``every_steps`` < 0.
    """

    def __init__(self, log_dir: str | os.PathLike, every_steps: int | None = None):
        super().__init__(log_dir=str(log_dir), update_freq="epoch", profile_batch=0)
        if every_steps is not None and int(every_steps) < 0:
            raise ValueError(f"every_steps must be >= 0, got {every_steps}")
        self.every_steps = int(every_steps or 0)
        self._first_step = 0  # the optimizer's step when the epoch began
        self._last_point = (0, 0.0)  # (batches of this epoch, their mean loss) at the last point
        self._test_writer = None

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._first_step = _step(self.model.optimizer) if self.every_steps else 0
        self._last_point = (0, 0.0)

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch)  # the model's graph, once (logs: ours, below)
        loss = (logs or {}).get("loss")
        if not self.every_steps or loss is None:
            return
        seen, (last_seen, last_mean) = batch + 1, self._last_point
        step = self._first_step + seen
        if step // self.every_steps == (self._first_step + last_seen) // self.every_steps:
            return
        # Keras's loss is the mean over the epoch so far; this is the mean since the last point
        window = (seen * float(loss) - last_seen * last_mean) / (seen - last_seen)
        self._last_point = (seen, float(loss))
        with self._train_writer.as_default():
            tf.summary.scalar(f"{STEP_GROUP}/loss", window, step=step)
            lr = _learning_rate(self.model.optimizer)
            tf.summary.scalar(f"{STEP_GROUP}/lr", lr, step=step)

    def on_test_end(self, logs=None):
        """Keras writes ``evaluation_<metric>_vs_iterations`` here: the validation curves again."""

    def on_epoch_end(self, epoch, logs=None):
        runs: dict[str, dict] = {"train": {"lr": _learning_rate(self.model.optimizer)}}
        for key, value in (logs or {}).items():
            prefix = next((p for p in RUNS if key.startswith(p)), None)
            name = key[len(prefix) :] if prefix else key
            name = RENAMED.get(name, name)
            runs.setdefault(RUNS.get(prefix, "train"), {})[name] = value
        for run, values in runs.items():
            with self._writer(run).as_default():
                for name, value in values.items():
                    tf.summary.scalar(f"{EPOCH_GROUP}/{name}", value, step=epoch)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if self._test_writer is not None:
            self._test_writer.close()
            self._test_writer = None

    def _writer(self, run: str):
        if run == "train":
            return self._train_writer
        if run == "validation":
            return self._val_writer
        if self._test_writer is None:
            self._test_writer = tf.summary.create_file_writer(os.path.join(self.log_dir, run))
        return self._test_writer


def _step(optimizer) -> int:
    """The optimizer's step count (steps taken)."""
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


def _learning_rate(optimizer) -> float:
    """The learning rate of the optimizer's next step (a loss-scaling wrapper's inner one's)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class StepProfiler(keras.callbacks.Callback):
    """Traces training batches ``first`` to ``last`` with TensorFlow's profiler, each a step.

    Batches count from 1 at the start of each ``fit``. Each traced batch runs
    inside ``tf.profiler.experimental.Trace("train", step_num=<step>, _r=1)``:
    the step marker TensorBoard's Profile tab (``pip install tensorboard-plugin-profile``)
    needs for its step-time overview and trace viewer, where Keras's own markers
    show "No step marker observed". ``<step>`` is the optimizer's step after the
    batch, as on the ``batch/`` charts. The trace lands in
    ``<log_dir>/plugins/profile/<time>/``.

    Args:
        log_dir: the TensorBoard run to write the trace into.
        first: the first batch traced, >= 1.
        last: the last batch traced, >= ``first``.

    Raises:
        ValueError: not ``1 <= first <= last``.
    """

    def __init__(self, log_dir: str | os.PathLike, first: int, last: int):
        super().__init__()
        if not 1 <= int(first) <= int(last):
            raise ValueError(f"need 1 <= first <= last, got [{first}, {last}]")
        self.log_dir = Path(log_dir)
        self.first, self.last = int(first), int(last)
        self._batch = 0
        self._tracing = False
        self._step = None

    def on_train_begin(self, logs=None):
        self._batch = 0

    def on_train_batch_begin(self, batch, logs=None):
        self._batch += 1
        if self._batch == self.first:
            try:
                tf.profiler.experimental.start(str(self.log_dir))
                self._tracing = True
            except Exception as err:  # another profiler running: train on without a trace
                log.warning("trainer.profile_batches: the profiler did not start (%s)", err)
        if self._tracing:
            step = _step(self.model.optimizer) + 1
            self._step = tf.profiler.experimental.Trace("train", step_num=step, _r=1)
            self._step.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        if self._step is not None:
            self._step.__exit__(None, None, None)
            self._step = None
        if self._tracing and self._batch >= self.last:
            self._stop()

    def on_train_end(self, logs=None):  # a fit that ended inside the range
        if self._step is not None:
            self._step.__exit__(None, None, None)
            self._step = None
        if self._tracing:
            self._stop()

    def _stop(self) -> None:
        self._tracing = False
        try:
            tf.profiler.experimental.stop()
            log.info(
                "Profile of batches %d-%d written under %s", self.first, self.last, self.log_dir
            )
        except Exception as err:
            log.warning("trainer.profile_batches: the profiler did not stop cleanly (%s)", err)


class ConfusionMatrixLogger(keras.callbacks.Callback):
    """Logs the validation confusion matrix to TensorBoard as an image.

    Runs every ``every_n_epochs`` epochs and after the last one, at the same
    step as Keras's ``TensorBoard`` callback (the 0-based epoch), so the image
    sits beside the validation curves.

    Args:
        val_data: batched ``(images, labels)``, labels one-hot or class indices,
            in a fixed order (the validation set as ``make_datasets`` builds it).
        class_names: the model's classes, in output order.
        log_dir: the run's TensorBoard directory.
        every_n_epochs: epochs between two images, >= 1.
        subdir: the TensorBoard run under ``log_dir`` to write into.

    Raises:
        ValueError: ``every_n_epochs`` < 1 or no class names.
    """

    def __init__(
        self,
        val_data: tf.data.Dataset,
        class_names: list[str],
        log_dir: str | os.PathLike,
        every_n_epochs: int = 5,
        subdir: str = "validation",
    ):
        super().__init__()
        if int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if not class_names:
            raise ValueError("class_names must name at least one class")
        self.val_data = val_data
        self.class_names = list(class_names)
        self.log_dir = Path(log_dir) / subdir
        self.every_n_epochs = int(every_n_epochs)
        self.matrix: np.ndarray | None = None  # the last one logged
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 == self.params.get("epochs")
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        self.matrix = self._confusion_matrix()
        image = render_confusion_matrix(self.matrix, self.class_names)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        with self._writer.as_default():
            tf.summary.image(SUMMARY_TAG, image[None], step=epoch)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _confusion_matrix(self) -> np.ndarray:
        images = self.val_data.map(lambda x, *_: x)
        logits = self.model.predict(images, verbose=0)
        labels = np.concatenate([np.asarray(y) for _, y, *_ in self.val_data.as_numpy_iterator()])
        if labels.ndim == 2:  # one-hot
            labels = labels.argmax(1)
        return confusion_matrix(labels, np.asarray(logits).argmax(1), len(self.class_names))


def all_layers(model) -> list:
    """Every layer of ``model``, nested models' layers included, depth first."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found += all_layers(layer)
    return found


class Lookahead(keras.callbacks.Callback):
    """Lookahead on the weights (Zhang et al. 2019), with the speed records' schedule.

    Every ``every`` optimizer steps, slow copies of the weights and BatchNorm
    statistics move toward the fast ones, ``slow += (1 - decay) * (fast - slow)``,
    and the fast weights restart from them. ``decay`` grows with training,
    ``base ** every * (step / total_steps) ** power`` (airbench94: 0.95, 5
    steps, cube), so early steps follow the fast weights and late ones
    average over many; at ``total_steps`` the model takes the slow weights.

    The slow weights are host memory, not part of backups: a resumed run
    starts them from the restored weights (within ``every`` steps of the same).

    Args:
        total_steps: optimizer steps of the whole run.
        every: steps between updates, >= 1.
        base: per-step decay at the end of training, in (0, 1].
        power: of the training fraction in the decay's schedule, >= 0.

    Raises:
        ValueError: an argument out of range.
    """

    def __init__(self, total_steps: int, every: int = 5, base: float = 0.95, power: float = 3.0):
        super().__init__()
        if total_steps < 1 or every < 1 or not 0 < base <= 1 or power < 0:
            raise ValueError(
                f"lookahead needs total_steps >= 1, every >= 1, 0 < base <= 1, power >= 0; got "
                f"{total_steps}, {every}, {base}, {power}"
            )
        self.total_steps, self.every, self.base, self.power = total_steps, every, base, power
        self._pairs = []

    def decay(self, step: int) -> float:
        """The decay of the update at optimizer step ``step`` (a multiple of ``every``)."""
        return self.base**self.every * (step / self.total_steps) ** self.power

    def on_train_begin(self, logs=None):
        tracked = list(self.model.trainable_variables)
        for layer in all_layers(self.model):
            if isinstance(layer, keras.layers.BatchNormalization):
                tracked += [layer.moving_mean, layer.moving_variance]
        self._pairs = [(v, np.array(v.numpy())) for v in tracked]

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every == 0:
            self._update(self.decay(step))
        if step == self.total_steps:  # the end: the model keeps the slow weights
            self._update(1.0)

    def _update(self, decay: float) -> None:
        for variable, slow in self._pairs:
            slow += (1.0 - decay) * (variable.numpy() - slow)
            variable.assign(slow)


class FreezeLayers(keras.callbacks.Callback):
    """Stops training the named layers once ``epochs`` epochs are done.

    The speed records train the whitening layer's bias for the first 3 epochs
    only (airbench94's ``whiten_bias_epochs``). Frozen weights get no
    gradient, no momentum and no weight decay from then on.

    Training over, the layers are trainable again, so the model is saved as built.

    Args:
        layers: ``{layer name: epochs to train it}``; names are searched in
            nested models too.
    """

    def __init__(self, layers: dict[str, int]):
        super().__init__()
        self.layers = {str(k): int(v) for k, v in layers.items()}

    def on_epoch_begin(self, epoch, logs=None):
        by_name = {layer.name: layer for layer in all_layers(self.model)}
        missing = sorted(set(self.layers) - set(by_name))
        if missing:
            raise ValueError(
                f"trainer.freeze_after names layers {missing} that model {self.model.name!r} "
                f"lacks; its layers: {', '.join(sorted(by_name))}"
            )
        changed = False
        for name, epochs in self.layers.items():
            if epoch >= epochs and by_name[name].trainable:
                by_name[name].trainable = False
                changed = True
        if changed:  # the training step was traced with the old trainable weights
            self.model.make_train_function(force=True)

    def on_train_end(self, logs=None):
        # The model is saved as built: a frozen layer would leave its optimizer one
        # variable short of the saved one, which Keras warns about on every load.
        by_name = {layer.name: layer for layer in all_layers(self.model)}
        for name in self.layers:
            if name in by_name:
                by_name[name].trainable = True


class AlternatingFlipEpochs(keras.callbacks.Callback):
    """Tells the model's ``AlternatingFlip`` layers the parity of the epoch beginning."""

    def on_epoch_begin(self, epoch, logs=None):
        from pipeline.models.layers import AlternatingFlip

        for layer in all_layers(self.model):
            if isinstance(layer, AlternatingFlip):
                layer.mirror.assign(float(epoch % 2))


class EvaluateEachEpoch(keras.callbacks.Callback):
    """Adds ``<prefix>_<metric>`` of a dataset to every epoch's logs (history, TensorBoard).

    For a learning curve on the test split when there is no validation split
    (the speed records report test accuracy after each epoch); nothing is
    chosen by it.

    Args:
        data: batched ``(images, labels)``.
        prefix: of the logged names, e.g. ``test``.
    """

    def __init__(self, data, prefix: str = "test"):
        super().__init__()
        self.data, self.prefix = data, prefix

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        result = self.model.evaluate(self.data, verbose=0, return_dict=True)
        logs.update({f"{self.prefix}_{k}": float(v) for k, v in result.items()})
