"""The data-source registry: names, configs, options, errors and what reads it."""

import inspect
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO, compose
from pipeline import config
from pipeline.data import sources
from pipeline.data.sources import (
    get_source,
    identity_keys,
    list_sources,
    load_source,
    register_source,
    source_options,
)
from pipeline.errors import PipelineError
from pipeline.runs import target

NOT_FOR_TRAINING = sorted(set(list_sources()) - set(list_sources(for_training=True)))


def _data_config(name: str):
    """``cfg.data`` of ``data=<name>``, with required (``???``) keys filled in."""
    data = compose([f"data={name}"]).data
    for key in data:
        if OmegaConf.is_missing(data, key):
            data[key] = f"required-{key}"
    return data


def test_the_built_in_sources_are_registered():
    assert {"digits", "folder", "tfds", "synthetic"} <= set(list_sources())
    assert list_sources() == sorted(list_sources())
    assert NOT_FOR_TRAINING == ["synthetic"]


@pytest.mark.parametrize("name", list_sources())
def test_each_source_has_its_config_file_naming_it(name):
    path = f"{CONF_DIR}/data/{name}.yaml"
    assert OmegaConf.load(path).source == name
    spec = get_source(name)
    assert spec.name == name and callable(spec.load)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml")))
def test_every_data_config_composes_to_a_registered_source(name):
    assert compose([f"data={name}"]).data.source in list_sources()


def test_check_config_takes_its_data_source_choices_from_the_registry():
    assert config.CHOICES["data.source"] == tuple(list_sources())
    cfg = compose()
    cfg.data.source = "nope"
    with pytest.raises(PipelineError, match="data.source must be one of") as err:
        config.check_config(cfg)
    assert "'nope'" in str(err.value)
    assert all(name in str(err.value) for name in list_sources())


def test_registering_a_taken_name_is_refused(monkeypatch):
    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    with pytest.raises(ValueError, match="'digits' is already registered"):
        register_source("digits")(lambda **_: None)
    assert get_source("digits").load is sources.load_digits


def test_load_source_names_the_valid_sources_for_an_unknown_one():
    with pytest.raises(PipelineError, match="data.source must be one of") as err:
        load_source("nope", image_size=32, seed=0)
    message = str(err.value)
    assert "'nope'" in message
    assert ", ".join(list_sources()) in message


def test_load_source_refuses_a_tiny_image_size():
    with pytest.raises(PipelineError, match="data.image_size must be >= 8, got 4"):
        load_source("digits", image_size=4, seed=0, test_fraction=0.2, val_fraction=0.1)


@pytest.mark.parametrize("name", list_sources())
def test_source_options_are_the_loaders_own_keys(name):
    spec = get_source(name)
    options = source_options(_data_config(name))
    params = inspect.signature(spec.load).parameters
    own = set(params) - {"image_size", "seed"}
    required = {k for k in own if params[k].default is inspect.Parameter.empty}
    assert set(options) <= own, f"{name}: {set(options) - own} are not {spec.load.__name__}'s"
    assert required <= set(options), (
        f"{name}: conf/data/{name}.yaml lacks {required - set(options)}"
    )
    assert ("cache_dir" in options) == spec.cached
    assert not set(options) & (set(sources.COMMON_DATA_KEYS) - {"cache_dir"})
    assert ("seed" in params) == spec.seeded


def test_source_options_from_a_plain_mapping(monkeypatch):
    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    register_source("toy_cached", cached=True)(lambda **_: None)
    common = {"image_size": 16, "batch_size": 4, "natural_images": True, "class_weights": None}
    options = {"source": "digits", "test_fraction": 0.2, "val_fraction": 0.1, **common}
    assert source_options({**options, "cache_dir": "here"}) == {
        "test_fraction": 0.2,
        "val_fraction": 0.1,
    }
    assert source_options({"source": "toy_cached", "size": 3, **common}) == {
        "size": 3,
        "cache_dir": "data",  # the default when the section has none
    }
    assert source_options({"source": "toy_cached", "cache_dir": "c", **common})["cache_dir"] == "c"


def test_identity_keys_name_the_datasets_and_drive_resume(monkeypatch):
    assert {"path", "name"} <= set(identity_keys())
    assert len(identity_keys()) == len(set(identity_keys()))
    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    register_source("toy", identity=("shelf", "path"))(lambda **_: None)
    assert identity_keys()[-1] == "shelf"  # new keys once, in registration order
    run = OmegaConf.create({"model": {"arch": "m"}, "data": {"source": "toy", "shelf": "a"}})
    now = OmegaConf.create({"model": {"arch": "m"}, "data": {"source": "toy", "shelf": "b"}})
    assert target.config_differences(run, now) == ["data.shelf (run: 'a', now: 'b')"]


def test_registry_and_resume_target_import_without_tensorflow():
    code = (
        "import sys, pipeline.data.sources, pipeline.runs.target; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("name", NOT_FOR_TRAINING)
def test_train_refuses_a_source_not_for_training(name, tmp_path):
    from pipeline.train import train

    with pytest.raises(PipelineError, match=rf"data={name} is for `python -m pipeline.bench` only"):
        train(compose([f"data={name}"]), run_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written
