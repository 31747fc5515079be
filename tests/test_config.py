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

GROUPS = [
    "data",
    "augment",
    "model",
    "optimizer",
    "schedule",
    "trainer",
    "experiment",
    "debug",
    "logger",
]
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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=nan", "optimizer.lr must be > 0 and finite, got nan"),
        ("optimizer.lr=inf", "optimizer.lr must be > 0 and finite, got inf"),
        ("data.val_fraction=1.0", "data.val_fraction must be in [0, 1), got 1.0"),
        ("data.test_fraction=-0.1", "data.test_fraction must be in [0, 1), got -0.1"),
        ("trainer.checkpoint_monitor=val_acc", "trainer.checkpoint_monitor must be one of"),
        ("trainer.steps_per_execution=0", "trainer.steps_per_execution must be >= 1, got 0"),
    ],
)
def test_values_that_cannot_train_are_refused(override, message):
    with pytest.raises(PipelineError, match=re.escape(message)) as err:
        check_config(compose([override]))
    assert override.split("=")[1] in str(err.value)


def test_split_fractions_must_leave_training_images():
    with pytest.raises(PipelineError, match="leaves no training images") as err:
        check_config(compose(["data.val_fraction=0.5", "data.test_fraction=0.5"]))
    assert "data.val_fraction=0.5" in str(err.value) and "data.test_fraction=0.5" in str(err.value)
    check_config(compose(["data.val_fraction=0.0", "data.test_fraction=0.5"]))  # fine


@pytest.mark.parametrize(
    ("override", "closest"),
    [
        ("+trainer.epoch=3", "trainer.epochs"),
        ("+data.batchsize=8", "data.batch_size"),
        ("+model.widht=8", "model.width"),
        ("+optimizer.lrr=0.1", "optimizer.lr"),
        ("+augment.crop_pading=2", "augment.crop_padding"),
        ("+schedule.warmup_epoch=2", "schedule.warmup_epochs"),
        ("+trainer.early_stopping.patiense=3", "trainer.early_stopping.patience"),
        ("+export.format=[keras]", "export.formats"),
    ],
)
def test_unknown_keys_are_refused_with_the_closest_one(override, closest):
    with pytest.raises(PipelineError, match="is not a key of") as err:
        check_config(compose([override]))
    key = override.lstrip("+").split("=")[0]
    assert str(err.value).startswith(f"{key}=") and f"did you mean {closest}?" in str(err.value)


def test_a_key_of_another_option_is_refused():
    # data.path belongs to data=folder: with the digits source it would be ignored
    with pytest.raises(PipelineError, match=r"data.path='/x' is not a key of data with source=dig"):
        check_config(compose(["+data.path=/x"]))
    with pytest.raises(PipelineError, match="optimizer.momentum=0.5 is not a key of optimizer"):
        check_config(compose(["optimizer=adam", "+optimizer.momentum=0.5"]))


@pytest.mark.parametrize(
    "override",
    [
        "+optimizer.clipnorm=1.0",  # a Keras optimizer argument left at its default
        "+schedule.warmup_fraction=0.1",  # read for every schedule kind
        "trainer.lookahead={every:5,base:0.95,power:3}",  # free-form sections
        "+trainer.freeze_after.conv1=2",
        "augment.randaugment={num_ops:1,factor:0.3}",
    ],
)
def test_keys_the_package_reads_are_accepted(override):
    check_config(compose([override]))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+trainer.epoch=3", "did you mean trainer.epochs?"),
        ("trainer.epoch=3", "did you mean trainer.epochs?"),  # Hydra's own refusal, reworded
        ("optimizer.lr=nan", "optimizer.lr must be > 0 and finite, got nan"),
    ],
)
def test_refusals_exit_with_code_2_and_one_line(override, expected, tmp_path):
    proc = _run_cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0]
    assert "Traceback" not in proc.stderr and "+trainer.epoch=3" not in proc.stderr
