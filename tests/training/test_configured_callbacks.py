"""trainer.callbacks: Keras callbacks from the config, built only from allowlisted classes."""

import re

import keras
import pytest

from conftest import compose
from pipeline import config
from pipeline.errors import PipelineError
from pipeline.train import train

EARLY_STOP = "{_target_:keras.callbacks.EarlyStopping,monitor:loss,min_delta:100,patience:0}"


def test_a_configured_callback_acts_on_training(tiny_runs):
    # loss never falls by 100: the first epoch sets the mark, the second stops training
    run = tiny_runs(
        "trainer.epochs=5", "export.formats=[]", f"+trainer.callbacks.stop={EARLY_STOP}"
    )
    assert run.metrics["epochs"] == 2


def test_callbacks_are_built_with_their_arguments_and_null_ones_left_out():
    cfg = compose(
        [
            f"+trainer.callbacks.stop={EARLY_STOP}",
            "+trainer.callbacks.nan={_target_:keras.callbacks.TerminateOnNaN}",
            "+trainer.callbacks.off=null",  # an experiment's callback turned off
        ]
    )
    config.check_config(cfg)
    stop, nan = config.configured_callbacks(cfg)
    assert isinstance(stop, keras.callbacks.EarlyStopping)
    assert (stop.monitor, stop.min_delta, stop.patience) == ("loss", 100, 0)
    assert isinstance(nan, keras.callbacks.TerminateOnNaN)


def test_a_class_outside_the_allowlist_is_refused_before_anything_runs(tmp_path):
    cfg = compose(
        ["+trainer.callbacks.save={_target_:keras.callbacks.ModelCheckpoint,filepath:/tmp/x.keras}"]
    )
    with pytest.raises(PipelineError) as err:
        train(cfg, run_dir=tmp_path / "run")
    message = str(err.value)
    assert "trainer.callbacks.save._target_='keras.callbacks.ModelCheckpoint' is not allowed" in (
        message
    )
    assert "\n" not in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+trainer.callbacks.plateau={_target_:keras.callbacks.ReduceLROnPlateau}",
            "trainer.callbacks.plateau: keras.callbacks.ReduceLROnPlateau sets the learning rate",
        ),
        ("+trainer.callbacks.stop=5", "trainer.callbacks.stop=5 is not a callback"),
        ("+trainer.callbacks.stop={monitor:loss}", "trainer.callbacks.stop="),
    ],
)
def test_callbacks_that_cannot_work_are_named(override, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        config.check_config(compose([override]))


def test_arguments_the_class_refuses_are_named():
    cfg = compose(["+trainer.callbacks.stop={_target_:keras.callbacks.EarlyStopping,patiense:3}"])
    with pytest.raises(
        PipelineError, match="trainer.callbacks.stop: keras.callbacks.EarlyStopping"
    ) as err:
        config.configured_callbacks(cfg)
    assert "patiense" in str(err.value)
