"""Pipelines that run on a tf.data service: the training batches, fixed batches, statistics.

With ``data.service=grpc://host:port`` (the dispatcher of a fleet started with
``python -m pipeline.data.service``), the training split is decoded, flipped
and cropped on the service's workers (``tf.data.experimental.service``): the
trainer sends the pipeline's graph and receives finished batches. The unit of
work is one global batch: the run's batches are numbered over all its epochs
(``k = epoch * steps + b``); batch ``k`` holds the images at positions
``b * batch .. (b + 1) * batch`` of epoch ``k // steps``'s permutation of the
split (``tf.random.experimental.index_shuffle`` seeded with ``seed`` and the
epoch), so each epoch gives every training image once whichever worker
decodes it, and a run gets the same batches every time. The dispatcher hands
batch numbers to workers as they ask (``distributed_epoch``), so the order in
which batches arrive, and the random crops a worker draws, are not
reproducible. The statistics pass runs there too (each worker sends sums).

The files must be at the same path on the service's workers as on the trainer.
Validation and test splits are decoded by the trainer (once; they are cached).
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from pipeline.errors import PipelineError

CONNECT_TIMEOUT_S = 5.0


def address(service: str) -> tuple[str, int]:
    """``(host, port)`` of ``grpc://host:port`` (or ``host:port``).

    Raises:
        PipelineError: not an address.
    """
    parsed = urlparse(service if "://" in service else f"grpc://{service}")
    if parsed.scheme != "grpc" or not parsed.hostname or not parsed.port:
        raise PipelineError(
            f"data.service must be grpc://host:port (the dispatcher's), got {service!r}"
        )
    return parsed.hostname, parsed.port


def check_reachable(service: str, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """``grpc://host:port`` once something listens there.

    Raises:
        PipelineError: nothing answers: one line saying how to start a dispatcher.
    """
    host, port = address(service)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise PipelineError(
            f"data.service={service}: no tf.data dispatcher answers at {host}:{port} ({err}). "
            f"Start one there: python -m pipeline.data.service dispatcher --port {port}, and "
            f"workers: python -m pipeline.data.service worker --dispatcher {host}:{port}"
        ) from None
    return f"grpc://{host}:{port}"


def _batch_indices(k, *, steps: int, batch_size: int, count: int, seed: int):
    """The split positions of the run's batch number ``k`` (see the module's docstring)."""
    import tensorflow as tf

    epoch, b = k // steps, k % steps
    start = b * batch_size
    positions = tf.range(start, tf.minimum(start + batch_size, count), dtype=tf.int64)
    key = tf.stack([tf.constant(seed, tf.int64), epoch])
    return tf.random.experimental.index_shuffle(positions, seed=key, max_index=count - 1)


def training_batches(
    split,
    *,
    service: str,
    decode_indices,
    augment_batch,
    steps: int,
    batch_size: int,
    seed: int,
    start: int,
    stop: int,
    after=None,
):
    """The run's batches number ``start`` to ``stop - 1`` (over epochs), made on the service.

    Args:
        split: the training split (random access).
        service: the dispatcher, ``grpc://host:port``.
        decode_indices: ``(indices, tag) -> (uint8 images, labels)``.
        augment_batch: the pipeline's crop and flip, float32 and one-hot.
        steps: batches per epoch.
        after: per-batch augmentation the trainer runs on what arrives
            (Keras's RandAugment, MixUp and CutMix keep state a service cannot hold).
    """
    import tensorflow as tf

    def make(k):
        indices = _batch_indices(
            k, steps=steps, batch_size=batch_size, count=split.count, seed=seed
        )
        epoch = tf.strings.as_string(k // steps)
        return decode_indices(indices, tf.strings.join(["train:", epoch]))  # logged with its epoch

    ds = tf.data.Dataset.range(start, stop).map(make, num_parallel_calls=tf.data.AUTOTUNE)
    ds = _on_service(augment_batch(ds), service)
    if after is not None:
        ds = ds.map(after, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def fixed_batch(split, *, service: str, decode_indices, transform, size: int, tag: str):
    """One batch of the split's first ``size`` images, made on the service.

    The pre-flight batch (``transform``: to float32 and one-hot) and the
    TensorBoard preview (the training augmentation).
    """
    import tensorflow as tf

    size = min(size, split.count)
    ds = tf.data.Dataset.range(1).map(lambda _: decode_indices(tf.range(size, dtype=tf.int64), tag))
    return _on_service(transform(ds), service)


def statistics_sums(split, *, service: str, num_classes: int, batch: int = 512):
    """``channel_sums`` of the training split, each worker summing the batches it decodes.

    Returns:
        float64 ``[pixels, sum x3, sum of squares x3, count per class...]``.
    """
    import numpy as np
    import tensorflow as tf

    def sums(indices):
        images, labels = tf.map_fn(
            lambda i: split.lookup(i, "stats"),
            indices,
            fn_output_signature=(tf.TensorSpec(None, tf.uint8), tf.TensorSpec([], tf.int32)),
        )
        x = tf.reshape(tf.cast(images, tf.float64) / 255.0, [-1, 3])
        classes = tf.math.bincount(labels, minlength=num_classes, maxlength=num_classes)
        return tf.concat(
            [
                tf.cast(tf.shape(x)[:1], tf.float64),
                tf.reduce_sum(x, 0),
                tf.reduce_sum(tf.square(x), 0),
                tf.cast(classes, tf.float64),
            ],
            0,
        )

    ds = tf.data.Dataset.range(split.count).batch(batch).map(sums)
    total = np.zeros(7 + num_classes, np.float64)
    for part in _on_service(ds, service):
        total += part.numpy()
    return total


def _on_service(ds, service: str):
    """``ds`` run by the service's workers, each element once (distributed epoch)."""
    import tensorflow as tf

    return ds.apply(
        tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=service
        )
    )
