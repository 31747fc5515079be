"""Data: image sources, the bad-image scan, statistics and tf.data pipelines.

``pipeline.data.scan`` and ``pipeline.data.inspect`` load without TensorFlow
until they need it; the tf.data names below (``load_source``,
``make_datasets``, ...) live in ``pipeline.data.datasets`` and load on first use.
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
    "load_source",
    "make_datasets",
    "training_stats",
)


def __getattr__(name: str):
    if name in _DATASETS_NAMES:
        return getattr(importlib.import_module("pipeline.data.datasets"), name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")


__all__ = list(_DATASETS_NAMES)
