"""Bad input found once the data or the model is known: refused before training, in one line."""

import logging

import keras
import numpy as np
import pytest

from conftest import TINY, compose, write_image_folder
from pipeline.errors import PipelineError
from pipeline.train import train


def _folder_config(folder, tmp_path, *overrides):
    return compose(
        ["data=folder", f"data.path={folder}", *TINY, f"data.cache_dir={tmp_path / 'cache'}"]
        + list(overrides)
    )


def test_batch_larger_than_the_training_split_is_refused(tiny_folder, tmp_path):
    cfg = _folder_config(tiny_folder, tmp_path, "data.batch_size=100000")
    with pytest.raises(PipelineError, match=r"data.batch_size=100000 is larger than the training"):
        train(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_a_dataset_of_one_class_is_refused(tmp_path):
    folder = write_image_folder(tmp_path / "one", classes=("cat",), per_class=20)
    with pytest.raises(PipelineError, match=r"1 class found \(cat\)"):
        train(_folder_config(folder, tmp_path), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_weights_that_match_no_layer_are_refused(tmp_path):
    from pipeline import models

    other = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2, name="elsewhere")])
    path = str(tmp_path / "other.weights.h5")
    other.save_weights(path)
    section = {"arch": "cnn", "width": 4, "weights": path}
    with pytest.raises(PipelineError, match="match no layer") as err:
        models.build_from_config(
            section, num_classes=3, input_shape=(16, 16, 3), mean=[0.5] * 3, std=[0.25] * 3
        )
    assert path in str(err.value) and "model=cnn" in str(err.value)


def test_weights_of_the_same_model_still_load(tmp_path):
    from pipeline import models

    kwargs = {"num_classes": 3, "input_shape": (16, 16, 3), "mean": [0.5] * 3, "std": [0.25] * 3}
    source = models.build_from_config({"arch": "cnn", "width": 4}, **kwargs)
    path = str(tmp_path / "cnn.weights.h5")
    source.save_weights(path)
    loaded = models.build_from_config({"arch": "cnn", "width": 4, "weights": path}, **kwargs)
    for a, b in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unwritable_cache_dir_warns_and_trains_without_it(tiny_folder, tmp_path, caplog):
    blocked = tmp_path / "cache_is_a_file"  # cannot hold a cache, even for root (read-only can)
    blocked.write_text("")
    cfg = compose(
        ["data=folder", f"data.path={tiny_folder}", *TINY, f"data.cache_dir={blocked}"]
        + ["trainer.epochs=1", "export.formats=[]"]
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        metrics = train(cfg, run_dir=tmp_path / "run")
    assert np.isfinite(metrics["train_loss"])
    assert any(f"data.cache_dir={blocked} cannot be written" in r.message for r in caplog.records)
    assert blocked.read_text() == ""
