"""Small, documented fixes for Keras 3's TensorFlow trainer under tf.distribute.

Keras 3.15's ``TensorFlowTrainer._maybe_symbolic_build`` pulls the first batch
of every ``fit``/``evaluate`` call through the input pipeline and, under a
multi-replica strategy, averages it across replicas
(``strategy.reduce("MEAN", batch)``) only to learn its shapes. That breaks in
two ways:

- when the batch does not split evenly (a validation split smaller than the
  global batch), the per-replica shapes differ and the reduction fails with
  ``AddN ... must have the same size and shape``; under
  MultiWorkerMirroredStrategy the same reduction breaks (keras-team/keras#20585);
- the extra iterator advances a reshuffling dataset's seed, so a run under
  MirroredStrategy sees a different shuffle order than on one device.

The dataset's ``element_spec`` holds the shapes already, so we build from zeros
of that spec (one replica's view when a dimension is unknown) and iterate
nothing.

Past that, every train and test step fails under MultiWorkerMirroredStrategy
(tensorflow#72388): ``reduce_per_replica`` averages the step's outputs, which
are scalars (the loss and each metric's value), with
``strategy.reduce("MEAN", v, axis=0)`` in multi-worker mode, and a scalar has no
axis 0 (``Invalid reduction dimension 0 for input with 0 dimensions``). Within
one machine Keras stacks the replicas' scalars and takes their mean; we do the
same across workers with ``axis=None`` (a collective all-reduce, so every
worker logs the same loss and stops on the same batch). Non-scalars keep
Keras's path. Epoch-end logs are read from the metrics' variables, summed over
all replicas, as before. Everything else in Keras's trainer is left alone.
"""

from __future__ import annotations

import tensorflow as tf

_PATCHED = False
_REDUCE_PATCHED = False


def _batch_from_spec(iterator):
    """Zeros shaped like one batch of the iterator's dataset, or None if shapes are open."""
    from keras.src import tree

    spec = iterator.data_adapter.get_tf_dataset().element_spec
    # A dataset distributed from a function gives one spec per replica: take the first's.
    spec = tree.map_structure(lambda s: getattr(s, "_value_specs", [s])[0], spec)
    specs = tree.flatten(spec)
    if any(None in s.shape[1:] for s in specs if isinstance(s, tf.TensorSpec)):
        return None
    return tree.map_structure(
        lambda s: tf.zeros([1, *s.shape[1:]], s.dtype) if isinstance(s, tf.TensorSpec) else s,
        spec,
    )


def _batch_from_first_replica(strategy, iterator):
    from keras.src import tree

    for _, _, it in iterator:
        batch = next(it)
        return tree.map_structure(
            lambda v: (
                strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues)
                else v
            ),
            batch,
        )
    return None


def patch_symbolic_build() -> None:
    """Makes Keras's symbolic build work from the dataset's spec; idempotent."""
    global _PATCHED
    if _PATCHED:
        return
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            data_batch = _batch_from_spec(iterator)
            if data_batch is None:
                data_batch = _batch_from_first_replica(self.distribute_strategy, iterator)
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    _PATCHED = True


def _mean_scalars_across_workers(reduce_per_replica):
    """Keras's ``reduce_per_replica``, averaging scalar values with ``axis=None`` across workers."""
    from keras.src import tree
    from keras.src.backend.tensorflow.trainer import _collective_all_reduce_multi_worker

    def reduce(values, strategy, reduction):
        averaging = reduction in ("auto", "mean")  # auto is mean off TPUs
        if not (averaging and _collective_all_reduce_multi_worker(strategy)):
            return reduce_per_replica(values, strategy, reduction)

        def one(value):
            if strategy.experimental_local_results(value)[0].shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return reduce_per_replica(value, strategy, reduction)

        return tree.map_structure(one, values)

    return reduce


def patch_multi_worker_reduce() -> None:
    """Makes Keras average scalar step outputs (loss, metrics) across workers; idempotent."""
    global _REDUCE_PATCHED
    if _REDUCE_PATCHED:
        return
    from keras.src.backend.tensorflow import trainer

    # The step functions look the name up in the module when they are traced.
    trainer.reduce_per_replica = _mean_scalars_across_workers(trainer.reduce_per_replica)
    _REDUCE_PATCHED = True
