"""Adversarial training (fgsm_rs, pgd): the crafted batch, end-to-end runs, mirrored replicas."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY, compose, run_module
from pipeline import models
from pipeline.errors import PipelineError
from pipeline.runs.reader import load_run
from pipeline.train import train
from pipeline.training import adversarial as adversarial_training

EPS = 8 / 255  # large enough that the eps-ball bound is not met by chance


def _tiny_model():
    return models.build(
        "cnn", num_classes=3, input_shape=(16, 16, 3), mean=[120.0] * 3, std=[60.0] * 3, width=4
    )


@pytest.mark.parametrize("method", ["fgsm_rs", "pgd"])
def test_crafted_batch_stays_in_the_eps_ball_and_pixel_range(method):
    keras.utils.set_random_seed(0)
    model = adversarial_training.wrap(_tiny_model(), method=method, eps=EPS, steps=3)
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).uniform(0, 255, (6, 16, 16, 3)).astype(np.float32)
    x[0] = 0.0  # a black and a white image: the clip to [0, 255] must bite
    x[1] = 255.0
    y = keras.utils.to_categorical(np.arange(6) % 3, 3)
    adv = model.attack(tf.constant(x), tf.constant(y)).numpy()
    assert adv.shape == x.shape and adv.dtype == np.float32
    assert np.abs(adv - x).max() <= EPS * 255 + 1e-3
    assert adv.min() >= 0.0 and adv.max() <= 255.0
    assert np.mean(adv != x) > 0.5


def test_default_step_sizes_follow_the_papers():
    fgsm = adversarial_training.wrap(_tiny_model(), method="fgsm_rs", eps=EPS, steps=5)
    pgd = adversarial_training.wrap(_tiny_model(), method="pgd", eps=EPS, steps=5)
    assert fgsm.steps == 1 and math.isclose(fgsm.alpha, 1.25 * EPS * 255)
    assert pgd.steps == 5 and math.isclose(pgd.alpha, 2.5 * EPS / 5 * 255)
    plain = _tiny_model()
    assert adversarial_training.wrap(plain, method="none", eps=EPS) is plain


def test_bad_setting_is_named(tmp_path):
    cfg = compose(["trainer.adversarial=pgd", "trainer.adversarial_eps=2"])
    with pytest.raises(PipelineError, match="adversarial_eps must be in"):
        train(cfg, run_dir=tmp_path)
    with pytest.raises(PipelineError, match="trainer.adversarial must be one of"):
        train(compose(["trainer.adversarial=fgsm"]), run_dir=tmp_path)


@pytest.mark.parametrize("method", ["fgsm_rs", "pgd"])
def test_adversarial_run_saves_plain_loadable_models(tiny_folder, tmp_path, monkeypatch, method):
    traced = []  # attack() runs when train_step is traced: proof the wrapper trained
    attack = adversarial_training.AdversarialModel.attack
    monkeypatch.setattr(
        adversarial_training.AdversarialModel,
        "attack",
        lambda self, *args: traced.append(self.steps) or attack(self, *args),
    )
    overrides = ["data=folder", f"data.path={tiny_folder}", "trainer.epochs=1", *TINY]
    cfg = compose([*overrides, f"trainer.adversarial={method}", "trainer.adversarial_steps=2"])
    metrics = train(cfg, run_dir=tmp_path)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["test_loss"])
    assert traced and set(traced) == {1 if method == "fgsm_rs" else 2}
    saved = keras.saving.load_model(tmp_path / "model.keras")
    assert not isinstance(saved, adversarial_training.AdversarialModel)
    best = load_run(tmp_path).build_model("best")
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    assert np.isfinite(best.predict(x, verbose=0)).all()
    last = load_run(tmp_path).build_model("last")  # the last epoch is what model.keras holds
    np.testing.assert_allclose(last.predict(x, verbose=0), saved.predict(x, verbose=0), atol=1e-5)


def test_pgd_training_runs_on_two_mirrored_replicas(tiny_folder, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_module(
        "pipeline.train",
        "data=folder",
        f"data.path={tiny_folder}",
        "trainer.epochs=1",
        *TINY,
        "trainer.strategy=mirrored",
        "trainer.logical_cpus=2",
        "trainer.adversarial=pgd",
        "trainer.adversarial_steps=2",
        f"hydra.run.dir={run_dir}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_replicas"] == 2 and math.isfinite(metrics["train_loss"])
    assert load_run(run_dir).build_model("best") is not None
