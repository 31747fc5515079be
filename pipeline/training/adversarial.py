"""Adversarial training: each batch is attacked before the optimizer step.

``fgsm_rs`` is FGSM from a random start with a step of ``1.25 * eps`` (Wong et
al. 2020, "Fast is better than free"); ``pgd`` is ``steps`` signed-gradient
steps from a random start, projected on the eps-ball (Madry et al. 2018).
Models take raw pixels on 0..255, so ``eps`` (on the [0, 1] pixel scale, as in
``pipeline.evaluation.attacks``) moves each pixel by at most ``eps * 255``.

``wrap`` returns a model that shares the built model's layers and weights and
only changes ``train_step``: it crafts the attack (model in inference mode, on
its float32 logits, with the compiled loss), then runs Keras's own train step
on the attacked batch, so loss scaling, metrics, distribution and XLA work as
for any model. Its weights files have the plain model's layout, so checkpoints
load into the plain model. TensorFlow backend only.
"""

from __future__ import annotations

import keras
import tensorflow as tf

PIXEL_MAX = 255.0  # the model's input range is [0, PIXEL_MAX]
METHODS = ("none", "fgsm_rs", "pgd")
FGSM_RS_STEP_FACTOR = 1.25  # Wong et al.: step 1.25 * eps from a uniform start
PGD_STEP_FACTOR = 2.5  # Madry et al.: step 2.5 * eps / steps


def check(*, method: str, eps: float, steps: int, step_size: float | None) -> None:
    """Checks the adversarial-training settings.

    Raises:
        ValueError: naming the bad value.
    """
    if method not in METHODS:
        raise ValueError(f"adversarial must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 < float(eps) <= 1.0:
        raise ValueError(
            f"adversarial_eps must be in (0, 1] (the pixel scale; 2/255 = 0.00784), got {eps}"
        )
    if int(steps) < 1:
        raise ValueError(f"adversarial_steps must be >= 1, got {steps}")
    if step_size is not None and float(step_size) <= 0:
        raise ValueError(f"adversarial_step_size must be > 0 or null, got {step_size}")


def wrap(
    model: keras.Model, *, method: str, eps: float, steps: int = 5, step_size: float | None = None
) -> keras.Model:
    """Wraps a built model so that ``fit`` trains on adversarial examples.

    Args:
        model: a built Keras model, 0..255 float pixels -> logits.
        method: ``none`` (returns ``model`` itself), ``fgsm_rs`` or ``pgd``.
        eps: the L-infinity radius on the [0, 1] pixel scale.
        steps: PGD steps (``fgsm_rs`` takes one).
        step_size: per step on the [0, 1] scale; None: ``1.25 * eps`` for
            ``fgsm_rs``, ``2.5 * eps / steps`` for ``pgd``.

    Returns:
        ``model``, or an ``AdversarialModel`` whose ``inner`` is ``model``.

    Raises:
        ValueError: a bad setting.
    """
    check(method=method, eps=eps, steps=steps, step_size=step_size)
    if method == "none":
        return model
    if method == "fgsm_rs":
        steps, default_step = 1, FGSM_RS_STEP_FACTOR * eps
    else:
        default_step = PGD_STEP_FACTOR * eps / steps
    step = default_step if step_size is None else float(step_size)
    return AdversarialModel(model, eps=float(eps), steps=int(steps), step_size=step)


class AdversarialModel(keras.Model):
    """A model that trains on attacked batches; ``inner`` is the plain model it wraps.

    Args:
        inner: the built model; its layers and weights are shared, not copied.
        eps: the L-infinity radius on the [0, 1] pixel scale.
        steps: signed-gradient steps from a uniform random start.
        step_size: per step on the [0, 1] scale.
    """

    def __init__(self, inner: keras.Model, *, eps: float, steps: int, step_size: float):
        super().__init__(name=f"adversarial_{inner.name}")
        self.inner = inner
        self.radius = eps * PIXEL_MAX
        self.steps = steps
        self.alpha = step_size * PIXEL_MAX
        self.built = True

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def attack(self, x, y, sample_weight=None):
        """Adversarial pixels for ``x``: in [0, 255], within ``eps * 255`` of ``x``, no gradient."""
        x = tf.cast(x, tf.float32)
        low = tf.maximum(x - self.radius, 0.0)
        high = tf.minimum(x + self.radius, PIXEL_MAX)
        noise = tf.random.uniform(tf.shape(x), -self.radius, self.radius, dtype=tf.float32)
        adv = tf.clip_by_value(x + noise, low, high)
        for _ in range(self.steps):
            with tf.GradientTape() as tape:
                tape.watch(adv)
                logits = tf.cast(self.inner(adv, training=False), tf.float32)
                loss = self.compute_loss(
                    x=adv, y=y, y_pred=logits, sample_weight=sample_weight, training=False
                )
                if self.optimizer is not None:  # float16 loss scaling keeps the gradient's sign
                    loss = self.optimizer.scale_loss(loss)
            grad = tape.gradient(loss, adv)
            if grad is None:  # no path from pixels to loss: nothing to step along
                break
            adv = tf.clip_by_value(adv + self.alpha * tf.sign(grad), low, high)
        return tf.stop_gradient(adv)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x_adv = self.attack(x, y, sample_weight)
        return super().train_step(keras.utils.pack_x_y_sample_weight(x_adv, y, sample_weight))

    def save_weights(self, filepath, overwrite=True, **kwargs):
        """Saves the plain model's weights, so checkpoints load into it."""
        return self.inner.save_weights(filepath, overwrite=overwrite, **kwargs)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Loads weights saved by ``save_weights`` (the plain model's layout)."""
        return self.inner.load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
