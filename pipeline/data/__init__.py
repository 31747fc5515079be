"""Data: image sources, the bad-image scan, statistics and tf.data pipelines.

``load_source`` lives in ``pipeline.data.sources``, with the source registry
(``register_source``, ``list_sources``, ``get_source``, ``source_options``);
that module imports TensorFlow only inside the loaders. The tf.data names below
(``make_datasets``, ``DataBundle``, ...) live in ``pipeline.data.datasets``.
Both load on first use, so ``pipeline.data.scan`` and ``pipeline.data.inspect``
start without TensorFlow.
"""

from __future__ import annotations

import importlib

_DATASETS_NAMES = (
    "DataBundle",
    "PREVIEW_IMAGES",
    "SHUFFLE_BUFFER",
    "STATS_BATCH",
    "channel_stats",
    "class_weights",
    "make_datasets",
    "training_stats",
    "WorkerShard",
)


def __getattr__(name: str):
    if name == "load_source":
        return importlib.import_module("pipeline.data.sources").load_source
    if name in _DATASETS_NAMES:
        return getattr(importlib.import_module("pipeline.data.datasets"), name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")


__all__ = [*_DATASETS_NAMES, "load_source"]
