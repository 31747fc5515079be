"""FGSM and PGD under L-infinity, and the self-checking robustness report on a tiny run."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.evaluation import attacks as adversarial
from pipeline.models import build

EPS = [1 / 255, 8 / 255, 32 / 255, 128 / 255]  # 128/255 can flip the colour channels


@pytest.fixture(scope="module")
def trained(tiny_runs, tmp_path_factory):
    """A folder run that learnt the colours, copied: evaluate writes eval/ into it."""
    run = tiny_runs(
        "trainer.epochs=10",
        "export.formats=[]",
        "optimizer=adam",
        "optimizer.lr=0.1",  # 0.00625 at batch 8: learns the colours
    ).copy_to(tmp_path_factory.mktemp("adv") / "run")
    return run.path, run.folder


def _tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return build("cnn", num_classes=3, input_shape=(16, 16, 3), mean=[100.0] * 3, std=[50.0] * 3)


def _batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 16, 16, 3)).astype(np.float32), np.arange(n) % 3


def _losses(model, x, y):
    logits = model(tf.constant(x), training=False)
    return keras.ops.convert_to_numpy(
        keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    )


@pytest.mark.parametrize("eps", [2 / 255, 8 / 255])
def test_attacks_stay_in_the_eps_ball_and_the_pixel_range(eps):
    model = _tiny_model()
    x, y = _batch()
    x[0] = 0.0  # a black and a white image: clipping to [0, 255] must bind
    x[1] = 255.0
    for adv in (
        adversarial.fgsm(model, x, y, eps),
        adversarial.pgd(model, x, y, eps, steps=3, random_start=True, seed=1),
    ):
        adv = adv.numpy()
        assert adv.dtype == np.float32 and adv.shape == x.shape
        assert adv.min() >= 0.0 and adv.max() <= 255.0
        assert np.abs(adv - x).max() <= eps * 255 + 1e-3
        assert np.abs(adv - x).max() >= eps * 255 * 0.5  # it moved: the gradient is not zero


def test_pgd_never_lowers_the_loss_and_zero_eps_is_identity():
    model = _tiny_model()
    x, y = _batch()
    adv = adversarial.pgd(model, x, y, 4 / 255, steps=5, random_start=False).numpy()
    assert np.all(_losses(model, adv, y) >= _losses(model, x, y) - 1e-5)
    np.testing.assert_array_equal(adversarial.pgd(model, x, y, 0.0, steps=2).numpy(), x)
    with pytest.raises(ValueError, match="eps must be in"):
        adversarial.fgsm(model, x, y, 8)  # 8 meant as 8/255


def test_report_on_a_trained_run_passes_its_own_checks(trained):
    run_dir, folder = trained
    report = evaluate(
        run_dir,
        checkpoint="last",
        test_path=str(folder),  # all 30 images: enough for the accuracies to mean something
        adversarial=True,
        eps=EPS,
        pgd_steps=10,
        max_examples=30,
    )
    adv = report["adversarial"]
    saved = json.loads((run_dir / "eval" / "report.json").read_text())["adversarial"]
    assert saved == json.loads(json.dumps(adv))
    assert adv["count"] == 30 and adv["clean_accuracy"] == pytest.approx(report["accuracy"])
    assert adv["clean_accuracy"] >= 0.9  # the colours are easy: the model learnt them
    rows = {(r["attack"], r["eps"]): r["accuracy"] for r in adv["attacks"]}
    assert len(rows) == 2 * len(EPS)
    for eps in EPS:
        assert rows["pgd", eps] <= rows["fgsm", eps] <= adv["clean_accuracy"]
    # Whether PGD-10 breaks this tiny ReLU net at 128/255 depends on the CPU's numerics (dead
    # units can hide the gradient); the report must say so consistently either way.
    near_zero = adv["checks"]["near_zero"]
    assert near_zero["checked"] and near_zero["pgd_accuracy"] == rows["pgd", 128 / 255]
    assert near_zero["ok"] == (rows["pgd", 128 / 255] <= near_zero["threshold"] == 0.1)
    assert adv["checks"]["ordering"]["ok"] and adv["input_gradient_norm"] > 0
    assert adv["warnings"] == [c["message"] for c in adv["checks"].values() if not c["ok"]]


def _channel_mean_model():
    """A linear model whose logit for class c is the mean of colour channel c: no dead units."""
    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(3)
    model = keras.Model(inputs, dense(pooled))
    dense.set_weights([np.eye(3, dtype=np.float32) / 255.0, np.zeros(3, np.float32)])
    return model


def test_pgd_breaks_a_model_that_eps_can_break_and_the_report_says_all_is_well():
    # Class colour 200-240 on one channel, 0-40 on the others: at 128/255 the attacker can drop
    # the class channel to <= 112 and lift another to >= 128, so the optimum is 0% accuracy.
    rng = np.random.default_rng(0)
    y = np.arange(12) % 3
    x = rng.integers(0, 41, (12, 16, 16, 3)).astype(np.float32)
    x[np.arange(12), :, :, y] += 200.0
    model = _channel_mean_model()
    report = adversarial.robustness_report(model, x, y, eps_list=[8 / 255, 128 / 255], steps=10)
    rows = {(r["attack"], r["eps"]): r["accuracy"] for r in report["attacks"]}
    assert report["clean_accuracy"] == 1.0 and rows["pgd", 8 / 255] == 1.0  # 8/255 is too small
    assert rows["pgd", 128 / 255] == 0.0 and rows["fgsm", 128 / 255] == 0.0
    assert report["checks"]["near_zero"]["checked"] and report["warnings"] == []


def test_a_model_that_survives_a_large_eps_is_flagged():
    checks = adversarial._checks(
        0.9,
        [
            {"attack": "fgsm", "eps": 128 / 255, "accuracy": 0.4},
            {"attack": "pgd", "eps": 128 / 255, "accuracy": 0.3},
        ],
        grad_norm=1.0,
    )
    assert checks["ordering"]["ok"] and checks["gradients"]["ok"]
    assert not checks["near_zero"]["ok"] and "too few pgd_steps" in checks["near_zero"]["message"]


class _Quantize(keras.layers.Layer):
    """Rounds pixels to 4 levels: a gradient of zero everywhere (masking)."""

    def call(self, x):
        return keras.ops.round(x / 85.0) * 85.0


def test_zero_input_gradient_warns_of_gradient_masking():
    inner = _tiny_model()
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, inner(_Quantize()(inputs)))
    x, y = _batch(4)
    report = adversarial.robustness_report(model, x, y, eps_list=[8 / 255], steps=2)
    assert report["input_gradient_norm"] == 0.0
    assert not report["checks"]["gradients"]["ok"]
    assert any(w.startswith("gradient_masking") for w in report["warnings"])
    assert not report["checks"]["near_zero"]["checked"]  # 8/255 < 32/255: nothing to judge


def test_bad_attack_settings_are_refused_before_the_slow_part(trained):
    run_dir, _ = trained
    with pytest.raises(PipelineError, match=r"eval\.eps must be .* got \[8\.0\]"):
        evaluate(run_dir, checkpoint="last", adversarial=True, eps=[8])
    with pytest.raises(PipelineError, match=r"eval\.pgd_steps .* got 0"):
        evaluate(run_dir, checkpoint="last", adversarial=True, pgd_steps=0)
