"""Training callbacks of our own (Keras's come from config or ``pipeline.trainer``)."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.evaluate import confusion_matrix, render_confusion_matrix

SUMMARY_TAG = "val_confusion_matrix"


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
