"""Learning-rate schedules: warmup, then constant, step, cosine or linear (one cycle)."""

import math

import keras
import numpy as np
import pytest

from pipeline.training.schedules import WarmupSchedule


def lr_at(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_cosine_warms_up_then_decays_to_alpha():
    s = WarmupSchedule(peak_lr=0.4, total_steps=110, warmup_steps=10, kind="cosine", alpha=0.1)
    assert lr_at(s, 0) == pytest.approx(0.04)
    assert lr_at(s, 9) == pytest.approx(0.4)
    assert lr_at(s, 10) == pytest.approx(0.4)
    assert lr_at(s, 60) == pytest.approx(0.4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert lr_at(s, 110) == pytest.approx(0.04)


def test_step_divides_at_milestones():
    s = WarmupSchedule(peak_lr=0.1, total_steps=100, kind="step", milestones=(0.5, 0.75))
    got = [lr_at(s, i) for i in (0, 49, 50, 74, 75, 99)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_one_cycle_rises_then_falls_linearly_to_zero():
    s = WarmupSchedule(peak_lr=0.8, total_steps=100, warmup_steps=20, kind="linear")
    got = [lr_at(s, i) for i in (0, 9, 19, 20, 60, 100, 120)]
    np.testing.assert_allclose(got, [0.04, 0.4, 0.8, 0.8, 0.4, 0.0, 0.0], atol=1e-7)


def test_constant_with_warmup():
    s = WarmupSchedule(peak_lr=0.2, total_steps=50, warmup_steps=4, kind="constant")
    np.testing.assert_allclose([lr_at(s, i) for i in range(6)], [0.05, 0.1, 0.15, 0.2, 0.2, 0.2])


def test_round_trips_through_keras_serialization():
    s = WarmupSchedule(peak_lr=0.1, total_steps=100, warmup_steps=5, kind="step", milestones=(0.5,))
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(s))
    assert again.get_config() == s.get_config()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "exponential"}, "schedule must be one of"),
        ({"peak_lr": 0.0}, "learning rate must be > 0"),
        ({"warmup_steps": 200}, "warmup_steps"),
        ({"kind": "step", "milestones": (1.5,)}, "milestones are fractions"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"peak_lr": 0.1, "total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match=message):
        WarmupSchedule(**args)
