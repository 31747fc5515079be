"""tf.data input pipelines: load a source, measure it, and batch it for training.

    source (uint8, final size) -> cache -> shuffle -> augment -> batch
        -> float32 0..255 + one-hot labels -> prefetch

Normalization to [0, 1] and standardization with the training split's
per-channel mean and std happen inside the model (see ``pipeline.models``), so
the model takes raw pixel values and an exported model takes uint8 images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pipeline.data.sources import SOURCES, Source, load_digits, load_folder, load_tfds
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 20_000  # examples; whole split below this size
STATS_BATCH = 512  # images per step of the statistics pass


@dataclass
class DataBundle:
    """Batched datasets and what the model and the run records need to know.

    ``first_batch`` is one global batch of training images, unshuffled: a
    pre-flight step uses it without advancing the training set's reshuffling.
    """

    train: tf.data.Dataset
    val: tf.data.Dataset
    test: tf.data.Dataset
    first_batch: tf.data.Dataset
    source: Source
    image_shape: tuple[int, int, int]
    batch_size: int
    mean: list[float]
    std: list[float]

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names

    @property
    def num_classes(self) -> int:
        return len(self.source.class_names)

    @property
    def counts(self) -> dict[str, int]:
        return {s: getattr(self.source, s).count for s in ("train", "val", "test")}

    def steps_per_epoch(self) -> int:
        return -(-self.source.train.count // self.batch_size)


def load_source(source: str, *, image_size: int, seed: int, **options) -> Source:
    """Loads one of ``SOURCES`` with its own options (see ``conf/data/*.yaml``)."""
    if image_size < 8:
        raise PipelineError(f"data.image_size must be >= 8, got {image_size}")
    if source == "digits":
        return load_digits(image_size=image_size, seed=seed, **options)
    if source == "folder":
        return load_folder(image_size=image_size, seed=seed, **options)
    if source == "tfds":
        return load_tfds(image_size=image_size, **options)
    raise PipelineError(f"data.source must be one of {SOURCES}, got {source!r}")


def channel_stats(images: tf.data.Dataset, count: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the [0, 1] scale, in one streaming pass.

    Args:
        images: unbatched ``(uint8 image, label)`` pairs.
        count: number of examples, for the progress bar.

    Returns:
        ``(mean, std)``, three floats each.
    """
    import keras

    total = np.zeros(3, np.float64)
    total_sq = np.zeros(3, np.float64)
    pixels = 0
    bar = keras.utils.Progbar(count, unit_name="image") if count >= 20_000 else None
    for batch, _ in images.batch(STATS_BATCH).prefetch(tf.data.AUTOTUNE):
        x = batch.numpy().astype(np.float64).reshape(-1, 3) / 255.0
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
        pixels += x.shape[0]
        if bar is not None:
            bar.add(batch.shape[0])
    if pixels == 0:
        raise PipelineError("the training split is empty: no statistics to compute.")
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
    std = np.maximum(std, 1e-3)  # a constant channel would divide by zero
    return mean.tolist(), std.tolist()


def _augment_fn(image_size: int, crop_padding: int, flip: bool):
    pad = int(round(crop_padding * image_size / 32))

    def augment(image, label):
        if pad > 0:
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.random_crop(image, [image_size, image_size, 3])
        if flip:
            image = tf.image.random_flip_left_right(image)
        return image, label

    return augment


def _finish(num_classes: int):
    def finish(images, labels):
        return tf.cast(images, tf.float32), tf.one_hot(labels, num_classes)

    return finish


def make_datasets(
    source: Source,
    *,
    batch_size: int,
    seed: int,
    crop_padding: int = 0,
    flip: bool = False,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> DataBundle:
    """Builds the batched train/val/test pipelines of a source.

    Args:
        source: what ``load_source`` returned.
        batch_size: global batch size (split across replicas by Keras).
        seed: shuffling and augmentation seed.
        crop_padding: zero padding, in pixels at 32x32 (scaled with the image
            size), before a random crop back to size; 0 turns cropping off.
        flip: random horizontal flips.
        mean: per-channel mean on [0, 1]; computed from the training split if None.
        std: per-channel std on [0, 1]; computed with the mean if None.

    Returns:
        A ``DataBundle``.
    """
    if batch_size < 1:
        raise PipelineError(f"data.batch_size must be >= 1, got {batch_size}")
    train_images = source.train.images.cache()
    if mean is None or std is None:
        log.info("Computing channel statistics over %d training images", source.train.count)
        mean, std = channel_stats(train_images, source.train.count)
    image_shape = tuple(int(d) for d in train_images.element_spec[0].shape)
    if None in image_shape:
        raise PipelineError(f"images must have a fixed shape, got {image_shape}")
    finish = _finish(len(source.class_names))

    train = (
        train_images.shuffle(min(source.train.count, SHUFFLE_BUFFER), seed=seed)
        .map(_augment_fn(image_shape[0], crop_padding, flip), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .map(finish, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )

    def evaluation(split):
        return (
            split.images.cache()
            .batch(batch_size)
            .map(finish, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
        )

    return DataBundle(
        train=train,
        first_batch=train_images.take(batch_size).batch(batch_size).map(finish),
        val=evaluation(source.val),
        test=evaluation(source.test),
        source=source,
        image_shape=image_shape,
        batch_size=batch_size,
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
    )
