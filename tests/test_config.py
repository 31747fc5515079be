"""Every option of every config group composes, and bad configs fail early and clearly."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO, compose
from pipeline.config import check_config
from pipeline.errors import PipelineError

GROUPS = ["data", "augment", "model", "optimizer", "schedule", "trainer", "experiment"]
HYDRA_GROUPS = ["hparams_search", "launcher"]  # set hydra.*: composed in test_sweep.py


def _options(group):
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in _options(g)], ids=lambda s: s
)
def test_every_option_composes(override):
    cfg = compose([override])
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for key in ("data", "augment", "model", "optimizer", "schedule", "trainer", "seed"):
        assert key in container, f"{override}: {key} missing"
    check_config(cfg)


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ is empty"


def test_defaults_train_the_cnn_on_digits():
    cfg = compose()
    assert cfg.data.source == "digits"
    assert cfg.model.arch == "cnn"
    assert cfg.augment.flip is False  # digits are not mirror-symmetric
    assert compose(["augment=mixup"]).augment.mixup_alpha == 0.2
    assert compose(["data=folder", "data.path=/x"]).augment.flip is True


def test_model_configs_name_registered_models():
    from pipeline.models import list_models

    for option in _options("model"):
        assert compose([f"model={option}"]).model.arch in list_models()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.strategy=magic", "trainer.strategy must be one of"),
        ("trainer.precision=float64", "trainer.precision must be one of"),
        ("trainer.jit_compile=maybe", "trainer.jit_compile must be one of"),
        ("trainer.epochs=0", "trainer.epochs must be >= 1"),
        ("optimizer.lr=-1", "optimizer.lr must be > 0"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(PipelineError, match=message) as err:
        check_config(compose([override]))
    assert override.split("=")[1] in str(err.value)


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_unknown_key_fails_in_hydra_before_tensorflow():
    proc = _run_cli("trainer.epoch=3", "hydra.run.dir=/tmp/should-not-exist-pipeline")
    assert proc.returncode != 0
    assert "epoch" in proc.stderr and "trainer" in proc.stderr
    assert "tensorflow" not in proc.stderr.lower()


def test_unknown_group_option_lists_the_choices():
    proc = _run_cli("model=resnet9000")
    assert proc.returncode != 0
    assert "resnet9000" in proc.stderr and "resnet20" in proc.stderr


def test_the_commands_conf_dir_holds_the_tested_and_documented_groups():
    from pipeline import config

    assert Path(config.CONF_DIR) == Path(CONF_DIR)  # what @hydra.main loads is what we compose
    on_disk = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())
    defaults = OmegaConf.load(Path(CONF_DIR) / "config.yaml").defaults
    assert sorted(next(iter(d)) for d in defaults if not isinstance(d, str)) == on_disk
    assert on_disk == sorted(GROUPS + HYDRA_GROUPS)  # a new group joins GROUPS, so it is composed
    reference = (REPO / "README.md").read_text().split("## Config reference")[1].split("\n#")[0]
    assert re.findall(r"^\| `(\w+)` \|", reference, re.MULTILINE) == GROUPS


def test_he_et_al_recipe_steps_the_learning_rate_at_32k_and_48k_of_64k():
    cfg = compose(["experiment=cifar10_resnet20"])
    assert (cfg.model.arch, cfg.data.batch_size, cfg.optimizer.lr) == ("resnet20", 128, 0.1)
    assert cfg.optimizer.momentum == 0.9 and not cfg.optimizer.nesterov
    # Keras decays decoupled from momentum: 10 x He et al.'s coupled 1e-4 at momentum 0.9
    assert cfg.optimizer.weight_decay == pytest.approx(1e-4 / (1 - cfg.optimizer.momentum))
    steps_per_epoch = -(-45_000 // 128)  # train[:90%] of CIFAR-10's 50,000
    total = cfg.trainer.epochs * steps_per_epoch
    assert 64_000 <= total <= 64_200
    boundaries = [round(m * total) for m in cfg.schedule.milestones]
    assert [round(b, -3) for b in boundaries] == [32_000, 48_000]
    assert cfg.schedule.name == "step" and cfg.augment.crop_padding > 0 and cfg.augment.flip


@pytest.mark.parametrize("name", ["cifar10_fast", "digits_fast"])
def test_fast_recipes_are_one_cycle(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.schedule.name == "linear" and cfg.schedule.warmup_epochs >= 1
    assert cfg.optimizer.nesterov and cfg.trainer.epochs <= 30
