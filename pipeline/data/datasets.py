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
from collections.abc import Callable
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
class WorkerShard:
    """This process's place among the workers of a cluster (MultiWorkerMirroredStrategy).

    With it, ``make_datasets`` chooses each worker's images before decoding:
    every worker computes the same seeded shuffle order of the training split,
    cuts each global batch into one slice per replica, and decodes and
    augments only its own replicas' slices.

    Attributes:
        index: this worker's input pipeline (0 for the chief).
        count: workers in the cluster.
        replicas: replicas (devices) of each worker.
        all_reduce: sums a float64 array over the workers (a collective: every
            worker calls it), so the statistics pass can be shared; None: each
            worker measures the whole split.
    """

    index: int
    count: int
    replicas: int = 1
    all_reduce: Callable[[np.ndarray], np.ndarray] | None = None


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
    shard: WorkerShard | None = None  # set: train and first_batch come from worker_batches
    worker_batches: Callable[..., tf.data.Dataset] | None = None  # (skip=, first=) -> this worker's
    service_batches: Callable[..., tf.data.Dataset] | None = None  # (start=, stop=) batch numbers

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
    return _stats_from_sums(channel_sums(images, count, num_classes))


def channel_sums(images: tf.data.Dataset, count: int, num_classes: int = 0) -> np.ndarray:
    """``[pixels, sum x3, sum of squares x3, count per class...]`` of ``images``, float64.

    Sums, so that workers that each measured their share can add theirs up.
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
    return np.concatenate([[pixels], total, total_sq, counts]).astype(np.float64)


def _stats_from_sums(sums: np.ndarray) -> tuple[list[float], list[float], list[int]]:
    pixels, total, total_sq, counts = sums[0], sums[1:4], sums[4:7], sums[7:]
    if pixels == 0:
        raise PipelineError("the training split is empty: no statistics to compute.")
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
    std = np.maximum(std, 1e-3)  # a constant channel would divide by zero
    return mean.tolist(), std.tolist(), [int(round(c)) for c in counts]


def training_stats(
    source: Source,
    images: tf.data.Dataset,
    cache_dir: str | None,
    shard: WorkerShard | None = None,
    service: str | None = None,
) -> dict:
    """Mean, std and class counts of the training split, cached by the source's fingerprint.

    Args:
        source: the loaded source.
        images: its training images (pass the ``.cache()``d dataset: the pass fills it).
        cache_dir: statistics are kept in ``<cache_dir>/stats/<key>.json``; None
            recomputes every time.
        shard: with ``all_reduce``, each worker measures every ``count``-th image
            from its index (``images`` unused) and the workers add up their sums.
        service: a tf.data service's address: its workers decode and sum.

    Returns:
        ``{"fingerprint", "mean", "std", "class_counts", "imbalance", "cached"}``.
    """
    cached = _cached_stats(source, cache_dir)
    shared = shard is not None and shard.all_reduce is not None and source.train.random_access
    if shared:  # the workers measure together only if none has the statistics cached
        found = shard.all_reduce(np.array([1.0 if cached else 0.0]))[0]
        cached = cached if found == shard.count else None
    if cached:
        return cached
    log.info("Computing channel statistics over %d training images", source.train.count)
    mean, std, counts = _measure(source, images, shard if shared else None, service)
    present = [c for c in counts if c > 0]
    stats = {
        "fingerprint": source.fingerprint,
        "mean": mean,
        "std": std,
        "class_counts": dict(zip(source.class_names, counts, strict=False)),
        "imbalance": max(present) / min(present) if present else 1.0,
    }
    path = _stats_path(source, cache_dir)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=2))
        os.replace(tmp, path)
    return {**stats, "cached": False}


def _stats_path(source: Source, cache_dir: str | None) -> Path | None:
    if not cache_dir:
        return None
    key = hashlib.sha256(source.fingerprint.encode()).hexdigest()[:24]
    return Path(cache_dir) / "stats" / f"{key}.json"


def _cached_stats(source: Source, cache_dir: str | None) -> dict | None:
    path = _stats_path(source, cache_dir)
    try:
        stats = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return None
    return {**stats, "cached": True} if stats.get("fingerprint") == source.fingerprint else None


def _measure(source: Source, images, shard: WorkerShard | None, service: str | None) -> tuple:
    """``(mean, std, class counts)``: on a tf.data service, shared by the workers, or here."""
    classes = len(source.class_names)
    if service:
        from pipeline.data import remote

        return _stats_from_sums(
            remote.statistics_sums(source.train, service=service, num_classes=classes)
        )
    if shard is not None:  # every count-th image from this worker's index; sums all-reduced
        share = tf.data.Dataset.range(shard.index, source.train.count, shard.count).map(
            lambda i: source.train.lookup(i, "stats"), num_parallel_calls=tf.data.AUTOTUNE
        )
        sums = channel_sums(share, source.train.count // shard.count, classes)
        return _stats_from_sums(shard.all_reduce(sums))
    return channel_stats(images, source.train.count, classes)


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
    shard: WorkerShard | None = None,
    service: str | None = None,
) -> DataBundle:
    """Returns the batched train/val/test pipelines of a source, decoding each image once.

    Long: it wires the one-process, per-worker and tf.data-service pipelines.

    Args:
        source: what ``load_source`` returned.
        batch_size: global batch size (split across replicas by Keras).
        seed: shuffling and augmentation seed.
        crop_padding: pixels at 32x32 (scaled with the size) to pad and crop back; 0: none.
        pad_mode: ``zeros`` or ``reflect`` (the speed records') padding.
        flip: True: a random horizontal flip per image and epoch; ``alternating``:
            one fixed random flip per image, which the model's ``AlternatingFlip``
            layer reverses on odd epochs (``alternating_flip=True``); False: none.
        randaugment: ``{"num_ops", "factor"}`` for Keras's RandAugment, or None.
        mixup_alpha, cutmix_alpha: MixUp's alpha and CutMix's factor; 0: off.
        stats_cache_dir: where training statistics are cached (None: no cache).
        limit_batches: only the first N batches of each epoch, of val and of test.
        shard: this worker's place in a cluster: it decodes only its share of
            each batch (``worker_batches``); None: the whole pipeline, sharded by batch.
        service: a tf.data service dispatcher, ``grpc://host:port``: its workers
            make the statistics and training batches (``service_batches``).

    Raises:
        PipelineError: a bad batch size, flip or limit, or images of no fixed shape.
    """
    _check_batching(batch_size, flip, limit_batches)
    shard, service = _placement(source, shard, service)
    train_images, stats, image_shape = _training_images(source, stats_cache_dir, shard, service)
    finish = _finish(len(source.class_names))
    per_batch = augment.batch_fn(
        randaugment=randaugment, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, seed=seed
    )
    crop_flip = augment.crop_flip_fn(image_shape[0], crop_padding, flip is True, pad_mode=pad_mode)
    batches = functools.partial(_batches, crop_flip=crop_flip, finish=finish, per_batch=per_batch)
    shuffled = _shuffled(train_images, source.train.count, image_shape, seed, flip)
    limit = (lambda ds: ds.take(limit_batches)) if limit_batches else (lambda ds: ds)
    first = shard_by_batch(train_images.take(batch_size).batch(batch_size).map(finish))
    preview = batches(train_images.take(PREVIEW_IMAGES), PREVIEW_IMAGES)
    opts = {"batch_size": batch_size, "seed": seed, "flip": flip, "image_shape": image_shape}
    worker_batches = service_batches = None
    if shard is not None:
        worker_batches = _sharded(source.train, shard, batches, finish, limit_batches, **opts)
    if service:
        service_batches, first, preview = _served(
            source.train, service, (crop_flip, finish, per_batch), limit_batches, **opts
        )
    return DataBundle(
        train=shard_by_batch(limit(batches(shuffled, batch_size)).prefetch(tf.data.AUTOTUNE)),
        first_batch=first,
        preview=preview,
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
        shard=shard,
        worker_batches=worker_batches,
        service_batches=service_batches,
    )


def _sharded(split, shard, batches, finish, limit_batches, *, batch_size, **decoding):
    """``worker_batches``: this worker's share of each batch (see ``_worker_batches``)."""
    return functools.partial(
        _worker_batches,
        split,
        shard=shard,
        batch_size=batch_size,
        buffer=shuffle_buffer(split.count, decoding["image_shape"]),
        augment_batch=lambda ds: batches(ds, None),
        finish=finish,
        limit_batches=limit_batches,
        **decoding,
    )


def _served(split, service: str, augmentation, limit_batches, *, batch_size, **decoding):
    """``(service_batches, first_batch, preview)`` made by a tf.data service's workers.

    ``augmentation``: ``(crop_flip, finish, per_batch)``. The workers decode,
    flip and crop; Keras's RandAugment, MixUp and CutMix (``per_batch``) hold
    state a service cannot, so the trainer runs them. ``decoding``: ``flip``,
    ``seed`` and ``image_shape`` for ``decode_indices``.
    """
    from pipeline.data import remote

    crop_flip, finish, per_batch = augmentation
    on_service = functools.partial(_batches, crop_flip=crop_flip, finish=finish, per_batch=None)
    decode = functools.partial(decode_indices, split, **decoding)
    steps = -(-split.count // batch_size)
    service_batches = functools.partial(
        remote.training_batches,
        split,
        service=service,
        decode_indices=decode,
        augment_batch=lambda ds: on_service(ds, None),
        after=per_batch,
        steps=min(steps, limit_batches) if limit_batches else steps,
        batch_size=batch_size,
        seed=decoding["seed"],
    )
    plain = functools.partial(decode, flip=None)
    fixed = functools.partial(remote.fixed_batch, split, service=service, decode_indices=plain)
    first = fixed(transform=lambda ds: ds.map(finish), size=batch_size, tag="first")
    preview = fixed(transform=lambda ds: on_service(ds, None), size=PREVIEW_IMAGES, tag="preview")
    return service_batches, first, preview if per_batch is None else preview.map(per_batch)


def _placement(source: Source, shard, service: str | None) -> tuple:
    """``(shard, service)`` as this source allows: in-order sources keep the whole pipeline."""
    if shard is not None and not source.train.random_access:
        log.info("data=%s is read in order: every worker decodes the whole split", source.name)
        shard = None
    return shard, _check_service(service, source, shard) if service else None


def _check_batching(batch_size: int, flip, limit_batches: int | None) -> None:
    if batch_size < 1:
        raise PipelineError(f"data.batch_size must be >= 1, got {batch_size}")
    if limit_batches is not None and (isinstance(limit_batches, bool) or limit_batches < 1):
        raise PipelineError(
            f"trainer.limit_batches must be a whole number >= 1 or null, got {limit_batches!r}"
        )
    if flip not in (True, False, "alternating"):
        raise PipelineError(f"augment.flip must be true, false or alternating, got {flip!r}")


def _check_service(service: str, source: Source, shard) -> str:
    """The dispatcher's address once it answers; refuses what the service cannot run.

    Raises:
        PipelineError: a source read in order, a cluster of trainers, or no dispatcher.
    """
    from pipeline.data import remote as data_service

    if not source.train.random_access:
        raise PipelineError(
            f"data.service needs a source whose images can be decoded by index (folder, digits); "
            f"data={source.name} is read in order. Drop data.service for it."
        )
    if source.train.pillow_files:
        files = source.train.pillow_files
        raise PipelineError(
            f"data.service: {len(files)} training file(s) need Pillow to decode (not 8-bit RGB "
            f"JPEG or PNG, e.g. {files[0]!r}), which runs only in the training process; a tf.data "
            "service worker decodes with TensorFlow's ops. Convert them to RGB JPEG or PNG, or "
            "train without data.service."
        )
    if shard is not None and shard.count > 1:
        raise PipelineError(
            "data.service feeds one training process (one machine, any number of GPUs); with "
            "several training workers drop data.service: each worker decodes its own share "
            "(data.shard=auto)."
        )
    return data_service.check_reachable(service)


def _training_images(
    source: Source, stats_cache_dir: str | None, shard=None, service: str | None = None
) -> tuple:
    """The training split cached in memory, its statistics and its image shape.

    The statistics pass fills the cache, so decoding happens once. A worker
    with a ``shard`` keeps no cache: it decodes its share of each batch as
    training asks for it, and the workers share the statistics pass.

    Raises:
        PipelineError: the images have no fixed shape.
    """
    lazy = shard is not None or service
    train_images = source.train.images if lazy else source.train.images.cache()
    stats = training_stats(source, train_images, stats_cache_dir, shard, service)
    image_shape = tuple(int(d) for d in train_images.element_spec[0].shape)
    if None in image_shape:
        raise PipelineError(f"images must have a fixed shape, got {image_shape}")
    return train_images, stats, image_shape


def _shuffled(images: tf.data.Dataset, count: int, image_shape: tuple, seed: int, flip):
    """The training images, reshuffled each epoch (mirrored by a fixed coin each if alternating)."""
    pool = augment.fixed_flip(images, seed) if flip == "alternating" else images
    return pool.shuffle(shuffle_buffer(count, image_shape), seed=seed)


def _batches(images: tf.data.Dataset, size: int | None, *, crop_flip, finish, per_batch):
    """Augmented batches of ``size``: crop and flip on uint8, float32 and one-hot, per-batch.

    ``size`` None: ``images`` is already batched.
    """
    ds = images if size is None else images.batch(size)
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


def _worker_batches(
    split,
    *,
    shard: WorkerShard,
    batch_size: int,
    seed: int,
    buffer: int,
    flip,
    image_shape: tuple,
    augment_batch,
    finish,
    limit_batches: int | None,
    first: bool = False,
) -> tf.data.Dataset:
    """This worker's batches, one per local replica and step, decoding only its share.

    The order is the one-process pipeline's (``_shuffled``: the same shuffle of
    the same count with the same seed and buffer gives the same permutation),
    batched as one process batches; each global batch of indices is cut into
    ``count * replicas`` slices, of which this worker takes its replicas', and
    only those images are decoded, flipped (by index, as ``fixed_flip``) and
    augmented. So a cluster trains on the batches one process would, while each
    worker decodes about 1/``count`` of them.

    Args:
        split: the training split (random access).
        first: the pre-flight batch instead: the first ``batch_size`` images, unshuffled.
    """
    if first:
        order = tf.data.Dataset.range(min(batch_size, split.count)).batch(batch_size)
    else:
        order = tf.data.Dataset.range(split.count).shuffle(buffer, seed=seed).batch(batch_size)
        if limit_batches:
            order = order.take(limit_batches)
    steps = int(order.cardinality())
    pieces = shard.count * shard.replicas

    def piece(indices, replica):
        n = tf.shape(indices, out_type=tf.int64)[0]
        at = tf.cast(shard.index * shard.replicas + replica, tf.int64)
        return indices[n * at // pieces : n * (at + 1) // pieces]

    if shard.replicas == 1:
        slices = order.map(lambda indices: piece(indices, 0))
    else:
        slices = order.flat_map(
            lambda indices: tf.data.Dataset.range(shard.replicas).map(lambda r: piece(indices, r))
        )

    decode = functools.partial(
        decode_indices, split, flip=None if first else flip, seed=seed, image_shape=image_shape
    )
    images = slices.map(
        lambda indices: decode(indices, "first" if first else "train"),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = images.map(finish) if first else augment_batch(images)
    ds = ds.apply(tf.data.experimental.assert_cardinality(steps * shard.replicas))
    return ds.prefetch(tf.data.AUTOTUNE)


def decode_indices(split, indices, tag: str, *, flip, seed: int, image_shape: tuple):
    """The images at ``indices`` of ``split``, decoded (and mirrored by their coin if alternating).

    Returns:
        ``(uint8 [n, H, W, C], int32 [n])``.
    """

    def decode(index):
        image, label = split.lookup(index, tag)
        if flip == "alternating":
            image = augment.flip_by_index(image, index, seed)
        return tf.ensure_shape(image, image_shape), label

    spec = (tf.TensorSpec(image_shape, tf.uint8), tf.TensorSpec([], tf.int32))
    return tf.map_fn(decode, indices, fn_output_signature=spec)
