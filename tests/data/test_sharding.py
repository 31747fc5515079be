"""Each worker of a cluster decodes only its share of every global batch, in one process's order.

In-process checks of ``make_datasets(shard=...)`` (no cluster: the workers'
pipelines are built side by side); ``tests/training/test_multiworker.py``
trains two real workers on 127.0.0.1 and counts what each decoded.
"""

import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from pipeline import data
from pipeline.data import datasets


def _digits():
    return data.load_source("digits", image_size=8, seed=0, test_fraction=0.2, val_fraction=0.1)


def _epochs(ds, n: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    return [[(x.numpy(), y.numpy()) for x, y in ds] for _ in range(n)]


@pytest.mark.parametrize("flip, replicas", [(False, 1), ("alternating", 1), (False, 2)])
def test_workers_slices_put_together_are_one_process_batches(flip, replicas):
    """Two workers' batches, side by side, are the one-process batches, epoch after epoch."""
    source = _digits()
    common = {"batch_size": 96, "seed": 3, "flip": flip}
    whole = data.make_datasets(source, **common)
    shares = []
    for index in range(2):
        shard = datasets.WorkerShard(index=index, count=2, replicas=replicas)
        bundle = data.make_datasets(source, **common, shard=shard)
        assert bundle.worker_batches is not None and bundle.shard is shard
        shares.append(bundle.worker_batches())
    one = _epochs(whole.train, 2)
    parts = [_epochs(share, 2) for share in shares]
    for epoch in range(2):
        assert len(parts[0][epoch]) == len(parts[1][epoch]) == len(one[epoch]) * replicas
        for step, (x, y) in enumerate(one[epoch]):
            pieces = [p[epoch][step * replicas + r] for p in parts for r in range(replicas)]
            np.testing.assert_array_equal(np.concatenate([px for px, _ in pieces]), x)
            np.testing.assert_array_equal(np.concatenate([py for _, py in pieces]), y)
    assert not np.array_equal(one[0][0][1], one[1][0][1])  # reshuffled each epoch


def test_a_worker_decodes_only_its_share_of_a_folder(tmp_path, monkeypatch, capfd):
    """Per epoch, the two workers decode disjoint halves of the training files, once each."""
    monkeypatch.setenv("PIPELINE_LOG_DECODES", "1")
    folder = write_image_folder(tmp_path / "images", per_class=10)
    source = data.load_source("folder", image_size=16, seed=0, path=str(folder), cache_dir=None)
    capfd.readouterr()
    decoded = []
    for index in range(2):
        shard = datasets.WorkerShard(index=index, count=2)
        bundle = data.make_datasets(source, batch_size=8, seed=0, shard=shard)
        for _ in bundle.worker_batches():
            pass
        lines = capfd.readouterr().err.splitlines()
        decoded.append(
            [line.split()[2] for line in lines if line.startswith("pipeline-decoded train")]
        )
        whole = [line for line in lines if line.startswith("pipeline-decoded split")]
        assert len(whole) == source.train.count  # no all_reduce: each measures the whole split
    train = {str(folder / m) for m in source.train.members}
    assert len(decoded[0]) == len(decoded[1]) == source.train.count // 2
    assert not set(decoded[0]) & set(decoded[1])
    assert set(decoded[0]) | set(decoded[1]) == train


def test_shared_statistics_add_up_to_one_process_statistics():
    """Each worker measures every other image; the summed statistics are the whole split's."""
    source = _digits()
    parts = []

    def all_reduce(part):  # as two workers would see it: worker 1 gets both shares' sums
        if part.shape == (1,):
            return part * 2  # "is it cached?": both answer alike
        parts.append(part)
        return parts[0] + parts[1] if len(parts) == 2 else part

    whole = data.make_datasets(source, batch_size=64, seed=0)
    for index in range(2):
        shard = datasets.WorkerShard(index=index, count=2, all_reduce=all_reduce)
        bundle = data.make_datasets(source, batch_size=64, seed=0, shard=shard)
    np.testing.assert_allclose(bundle.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(bundle.std, whole.std, rtol=1e-12)
    assert bundle.stats["class_counts"] == whole.stats["class_counts"]


def test_a_source_read_in_order_keeps_the_whole_pipeline(monkeypatch):
    source = _digits()
    source.train.lookup = None  # as a TFDS split
    bundle = data.make_datasets(
        source, batch_size=64, seed=0, shard=datasets.WorkerShard(index=0, count=2)
    )
    assert bundle.shard is None and bundle.worker_batches is None
    policy = bundle.train.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA
