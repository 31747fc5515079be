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
nothing. Everything else in Keras's trainer is left alone.
"""

from __future__ import annotations

import tensorflow as tf

_PATCHED = False


def _batch_from_spec(iterator):
    """Zeros shaped like one batch of the iterator's dataset, or None if shapes are open."""
    from keras.src import tree

    spec = iterator.data_adapter.get_tf_dataset().element_spec
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
