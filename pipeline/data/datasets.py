"""tf.data input pipelines: load a source, measure it, and batch it for training.

    source (uint8, final size) -> cache -> shuffle -> augment -> batch
        -> float32 0..255 + one-hot labels -> prefetch

Normalization to [0, 1] and standardization with the training split's
per-channel mean and std happen inside the model (see ``pipeline.models``), so
the model takes raw pixel values and an exported model takes uint8 images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.data import augment
from pipeline.data.sources import Source
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 20_000  # examples at least; the whole split below this size
SHUFFLE_BUFFER_BYTES = 1 << 30  # larger buffers while their images fit in 1 GiB
STATS_BATCH = 512  # images per step of the statistics pass
PREVIEW_IMAGES = 32  # augmented training images shown in TensorBoard


@dataclass
class DataBundle:
    """Batched datasets and what the model and the run records need to know.

    ``first_batch`` is one global batch of training images, unshuffled: a
    pre-flight step uses it without advancing the training set's reshuffling.
    ``preview`` is one batch of up to 32 augmented training images, for a look.
    ``val`` is None when the source has no validation split (``val_fraction=0``).
    """

    train: tf.data.Dataset
    val: tf.data.Dataset
    test: tf.data.Dataset
    first_batch: tf.data.Dataset
    preview: tf.data.Dataset
    source: Source
    image_shape: tuple[int, int, int]
    batch_size: int
    mean: list[float]
    std: list[float]
    stats: dict = field(default_factory=dict)
    train_images: tf.data.Dataset | None = None  # decoded, cached, unbatched, in order
    limit_batches: int | None = None  # batches per epoch and per evaluation; None: all

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
        steps = -(-self.source.train.count // self.batch_size)
        return min(steps, self.limit_batches) if self.limit_batches else steps

    def sample_images(self, n: int) -> np.ndarray:
        """Up to ``n`` training images spread evenly over the split, unaugmented.

        Returns:
            float32 ``[n, H, W, C]`` pixels, 0..255 (what data-dependent layers
            such as the fastnet's patch whitening are set from).
        """
        every = max(1, self.source.train.count // max(n, 1))
        images = self.source.train.images if self.train_images is None else self.train_images
        picked = images.shard(every, 0).take(n).batch(STATS_BATCH)
        return np.concatenate([images.numpy() for images, _ in picked]).astype("float32")


def channel_stats(
    images: tf.data.Dataset, count: int, num_classes: int = 0
) -> tuple[list[float], list[float], list[int]]:
    """Per-channel mean and std on the [0, 1] scale and class counts, in one pass.

    Args:
        images: unbatched ``(uint8 image, label)`` pairs.
        count: number of examples, for the progress bar.
        num_classes: length of the class-count list.

    Returns:
        ``(mean, std, class_counts)``: three floats each, and one int per class.
    """
    import keras

    total = np.zeros(3, np.float64)
    total_sq = np.zeros(3, np.float64)
    counts = np.zeros(num_classes, np.int64)
    pixels = 0
    bar = None
    if count >= 20_000:  # a bar on a terminal, one closing line in a log
        bar = keras.utils.Progbar(count, unit_name="image", verbose=1 if sys.stdout.isatty() else 2)
    for batch, labels in images.batch(STATS_BATCH).prefetch(tf.data.AUTOTUNE):
        x = batch.numpy().reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
        pixels += x.shape[0]
        found = np.bincount(labels.numpy(), minlength=len(counts))
        counts = np.pad(counts, (0, len(found) - len(counts))) + found
        if bar is not None:
            bar.add(batch.shape[0])
    if pixels == 0:
        raise PipelineError("the training split is empty: no statistics to compute.")
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
    std = np.maximum(std, 1e-3)  # a constant channel would divide by zero
    return mean.tolist(), std.tolist(), counts.tolist()


def training_stats(source: Source, images: tf.data.Dataset, cache_dir: str | None) -> dict:
    """Mean, std and class counts of the training split, cached by the source's fingerprint.

    Args:
        source: the loaded source.
        images: its training images (pass the ``.cache()``d dataset: the pass fills it).
        cache_dir: statistics are kept in ``<cache_dir>/stats/<key>.json``; None
            recomputes every time.

    Returns:
        ``{"fingerprint", "mean", "std", "class_counts", "imbalance", "cached"}``.
    """
    path = None
    if cache_dir:
        key = hashlib.sha256(source.fingerprint.encode()).hexdigest()[:24]
        path = Path(cache_dir) / "stats" / f"{key}.json"
        try:
            stats = json.loads(path.read_text())
            if stats.get("fingerprint") == source.fingerprint:
                return {**stats, "cached": True}
        except (OSError, ValueError):
            pass
    log.info("Computing channel statistics over %d training images", source.train.count)
    mean, std, counts = channel_stats(images, source.train.count, len(source.class_names))
    present = [c for c in counts if c > 0]
    stats = {
        "fingerprint": source.fingerprint,
        "mean": mean,
        "std": std,
        "class_counts": dict(zip(source.class_names, counts, strict=False)),
        "imbalance": max(present) / min(present) if present else 1.0,
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=2))
        os.replace(tmp, path)
    return {**stats, "cached": False}


def class_weights(class_counts: dict[str, int], class_names: list[str]) -> dict[int, float]:
    """Loss weights ``total / (classes * count)``: every class weighs the same overall.

    Raises:
        PipelineError: a class has no training image.
    """
    counts = np.array([class_counts.get(name, 0) for name in class_names], np.float64)
    if (counts == 0).any():
        missing = [n for n, c in zip(class_names, counts, strict=True) if c == 0]
        raise PipelineError(f"data.class_weights=auto: classes {missing} have no training images")
    weights = counts.sum() / (len(counts) * counts)
    return {i: float(w) for i, w in enumerate(weights)}


def _finish(num_classes: int):
    def finish(images, labels):
        return tf.cast(images, tf.float32), tf.one_hot(labels, num_classes)

    return finish


def shard_by_batch(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Under MultiWorkerMirroredStrategy, each worker takes its slice of every global batch.

    tf.data's default (AUTO) shards by input file where it finds one (TFDS
    records), so a worker would see other images than on one machine, and
    fails over with a warning on in-memory data. DATA sharding splits each
    global batch into per-replica batches and gives each worker its own: every
    worker runs the whole pipeline and keeps its slice, and the global batch is
    ``data.batch_size`` as on one machine. Other strategies ignore the option.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def shuffle_buffer(count: int, image_shape: tuple[int, ...]) -> int:
    """Examples in the training shuffle buffer: the whole split while it fits in 1 GiB.

    Sources list their files class by class, so a buffer smaller than the split
    gives batches of a few classes at each end of every epoch (CIFAR-10's
    45,000 images through a 20,000 buffer: the first batches hold five classes
    at most), which BatchNorm and SGD both suffer from.
    """
    fits = SHUFFLE_BUFFER_BYTES // max(int(np.prod(image_shape)), 1)  # uint8 images
    return max(1, min(count, max(SHUFFLE_BUFFER, fits)))


def make_datasets(
    source: Source,
    *,
    batch_size: int,
    seed: int,
    crop_padding: int = 0,
    pad_mode: str = "zeros",
    flip: bool | str = False,
    randaugment: dict | None = None,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    stats_cache_dir: str | None = None,
    limit_batches: int | None = None,
) -> DataBundle:
    """Returns the batched train/val/test pipelines of a source, decoding each image once.

    Args:
        source: what ``load_source`` returned.
        batch_size: global batch size (split across replicas by Keras).
        seed: shuffling and augmentation seed.
        crop_padding: padding in pixels at 32x32 (scaled with the image size)
            before a random crop back to size; 0: no cropping.
        pad_mode: ``zeros`` or ``reflect`` (the speed records') padding.
        flip: True: a random horizontal flip per image and epoch; ``alternating``:
            one fixed random flip per image, which the model's ``AlternatingFlip``
            layer reverses on odd epochs (``alternating_flip=True``); False: none.
        randaugment: ``{"num_ops", "factor"}`` for Keras's RandAugment, or None.
        mixup_alpha, cutmix_alpha: MixUp's alpha and CutMix's factor; 0: off.
        stats_cache_dir: where training statistics are cached (None: no cache).
        limit_batches: only the first N batches of each epoch (freshly shuffled)
            and of val and test (Lightning's ``limit_*_batches``); None: all.

    Raises:
        PipelineError: a bad batch size, flip or limit, or images of no fixed shape.
    """
    _check_batching(batch_size, flip, limit_batches)
    train_images, stats, image_shape = _training_images(source, stats_cache_dir)
    finish = _finish(len(source.class_names))
    per_batch = augment.batch_fn(
        randaugment=randaugment, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, seed=seed
    )
    crop_flip = augment.crop_flip_fn(image_shape[0], crop_padding, flip is True, pad_mode=pad_mode)
    batches = functools.partial(_batches, crop_flip=crop_flip, finish=finish, per_batch=per_batch)
    shuffled = _shuffled(train_images, source.train.count, image_shape, seed, flip)
    limit = (lambda ds: ds.take(limit_batches)) if limit_batches else (lambda ds: ds)
    return DataBundle(
        train=shard_by_batch(limit(batches(shuffled, batch_size)).prefetch(tf.data.AUTOTUNE)),
        first_batch=shard_by_batch(train_images.take(batch_size).batch(batch_size).map(finish)),
        preview=batches(train_images.take(PREVIEW_IMAGES), PREVIEW_IMAGES),
        val=limit(_evaluation(source.val, batch_size, finish)) if source.val.count else None,
        test=limit(_evaluation(source.test, batch_size, finish)),
        source=source,
        image_shape=image_shape,
        batch_size=batch_size,
        mean=[float(m) for m in stats["mean"]],
        std=[float(s) for s in stats["std"]],
        stats=stats,
        train_images=train_images,
        limit_batches=limit_batches,
    )


def _check_batching(batch_size: int, flip, limit_batches: int | None) -> None:
    if batch_size < 1:
        raise PipelineError(f"data.batch_size must be >= 1, got {batch_size}")
    if limit_batches is not None and (isinstance(limit_batches, bool) or limit_batches < 1):
        raise PipelineError(
            f"trainer.limit_batches must be a whole number >= 1 or null, got {limit_batches!r}"
        )
    if flip not in (True, False, "alternating"):
        raise PipelineError(f"augment.flip must be true, false or alternating, got {flip!r}")


def _training_images(source: Source, stats_cache_dir: str | None) -> tuple:
    """The training split cached in memory, its statistics and its image shape.

    The statistics pass fills the cache, so decoding happens once.

    Raises:
        PipelineError: the images have no fixed shape.
    """
    train_images = source.train.images.cache()
    stats = training_stats(source, train_images, stats_cache_dir)
    image_shape = tuple(int(d) for d in train_images.element_spec[0].shape)
    if None in image_shape:
        raise PipelineError(f"images must have a fixed shape, got {image_shape}")
    return train_images, stats, image_shape


def _shuffled(images: tf.data.Dataset, count: int, image_shape: tuple, seed: int, flip):
    """The training images, reshuffled each epoch (mirrored by a fixed coin each if alternating)."""
    pool = augment.fixed_flip(images, seed) if flip == "alternating" else images
    return pool.shuffle(shuffle_buffer(count, image_shape), seed=seed)


def _batches(images: tf.data.Dataset, size: int, *, crop_flip, finish, per_batch):
    """Augmented batches of ``size``: crop and flip on uint8, float32 and one-hot, per-batch."""
    ds = images.batch(size)
    if crop_flip is not None:
        ds = ds.map(crop_flip, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    return ds if per_batch is None else ds.map(per_batch, num_parallel_calls=tf.data.AUTOTUNE)


def _evaluation(split, batch_size: int, finish) -> tf.data.Dataset:
    """A val or test split cached, batched to float32 pixels and one-hot labels, sharded."""
    return shard_by_batch(
        split.images.cache()
        .batch(batch_size)
        .map(finish, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
