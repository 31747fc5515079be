"""L-infinity attacks on a classifier and a robustness report that checks itself.

Models take raw pixels on 0..255 (their Rescaling and Normalization layers are
inside), so attacks work on that scale: an ``eps`` given on the [0, 1] pixel
scale (``8/255``) moves each pixel by at most ``eps * 255``, and adversarial
images are clipped to the eps-ball and to [0, 255]. Gradients flow through the
model's own preprocessing to its float32 logits; the loss is sparse
cross-entropy on those logits. TensorFlow backend only (``GradientTape``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

PIXEL_MAX = 255.0  # the model's input range is [0, PIXEL_MAX]
DEFAULT_EPS = (1 / 255, 2 / 255, 8 / 255, 32 / 255)  # on the [0, 1] pixel scale
STEP_SIZE_FACTOR = 2.5  # PGD's default step: 2.5 * eps / steps (Madry et al.)
LARGE_EPS = 32 / 255  # from here on a non-robust model should be (nearly) always wrong
NEAR_ZERO_ACCURACY = 0.1  # "nearly always wrong" at LARGE_EPS, as a fraction
ORDER_TOLERANCE = 1e-9  # accuracies are fractions of the same examples: exact comparison
BATCH_SIZE = 64  # images per attack step


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1] (the pixel scale; 8/255 = 0.0314), got {eps}")
    return eps


def _loss_and_gradient(model, x, y):
    """Sum of per-example cross-entropy and its gradient with respect to the pixels."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = tf.cast(model(x, training=False), tf.float32)
        loss = tf.reduce_sum(
            tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )
    return loss, _or_zeros(tape.gradient(loss, x), x)


def _or_zeros(grad, x):
    """A gradient TensorFlow reports as None (a non-differentiable op) is zero."""
    import tensorflow as tf

    return tf.zeros_like(x) if grad is None else grad


def fgsm(model, x, y, eps: float):
    """Fast gradient sign method: one step of ``eps * 255`` along the loss gradient's sign.

    Args:
        model: a Keras model, 0..255 float32 pixels -> logits.
        x: ``[N, H, W, C]`` pixels on 0..255.
        y: ``[N]`` integer labels.
        eps: the L-infinity radius on the [0, 1] pixel scale.

    Returns:
        float32 ``[N, H, W, C]`` adversarial pixels in [0, 255].
    """
    import tensorflow as tf

    radius = _check_eps(eps) * PIXEL_MAX
    x = tf.convert_to_tensor(x, tf.float32)
    _, grad = _loss_and_gradient(model, x, tf.convert_to_tensor(y))
    return tf.clip_by_value(x + radius * tf.sign(grad), 0.0, PIXEL_MAX)


def pgd(
    model,
    x,
    y,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
):
    """Projected gradient descent (``steps`` signed-gradient steps, projected on the eps-ball).

    Each example keeps the iterate with the highest loss, so more steps never
    make the attack weaker.

    Args:
        model: a Keras model, 0..255 float32 pixels -> logits.
        x: ``[N, H, W, C]`` pixels on 0..255.
        y: ``[N]`` integer labels.
        eps: the L-infinity radius on the [0, 1] pixel scale.
        steps: gradient steps, >= 1.
        step_size: per step on the [0, 1] scale; None: ``2.5 * eps / steps``.
        random_start: start from a uniform point in the eps-ball instead of ``x``.
        seed: seeds the random start.

    Returns:
        float32 ``[N, H, W, C]`` adversarial pixels in [0, 255] within ``eps * 255`` of ``x``.
    """
    import tensorflow as tf

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    radius = _check_eps(eps) * PIXEL_MAX
    alpha = (STEP_SIZE_FACTOR * eps / steps if step_size is None else float(step_size)) * PIXEL_MAX
    if alpha <= 0 and radius > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y)
    low, high = tf.maximum(x - radius, 0.0), tf.minimum(x + radius, PIXEL_MAX)
    adv = x
    if random_start and radius > 0:
        noise = np.random.default_rng(seed).uniform(-radius, radius, x.shape)
        adv = tf.clip_by_value(x + tf.constant(noise, tf.float32), low, high)
    best, best_loss = adv, tf.fill([x.shape[0]], -np.inf)
    for _ in range(steps + 1):  # the last pass only scores the final iterate
        with tf.GradientTape() as tape:
            tape.watch(adv)
            logits = tf.cast(model(adv, training=False), tf.float32)
            losses = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            total = tf.reduce_sum(losses)  # inside the tape, or its gradient is None
        better = losses > best_loss
        best = tf.where(better[:, None, None, None], adv, best)
        best_loss = tf.where(better, losses, best_loss)
        grad = _or_zeros(tape.gradient(total, adv), adv)
        adv = tf.clip_by_value(adv + alpha * tf.sign(grad), low, high)
    return best


def robustness_report(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    eps_list: Sequence[float] = DEFAULT_EPS,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    advance: Callable[[float], None] | None = None,
) -> dict:
    """Accuracy under FGSM and PGD-``steps`` at each eps, with the report's own sanity checks.

    Args:
        model: a Keras model, 0..255 float32 pixels -> float32 logits.
        images: ``[N, H, W, C]`` pixels on 0..255 (uint8 or float).
        labels: ``[N]`` integer labels.
        eps_list: L-infinity radii on the [0, 1] pixel scale.
        steps: PGD steps.
        step_size: PGD step on the [0, 1] scale; None: ``2.5 * eps / steps``.
        random_start: PGD starts from a random point in the eps-ball.
        seed: seeds PGD's random start.
        batch_size: images per attack step.
        advance: called with the images done (a fraction of a batch per eps) as
            the attacks go, for a progress line; None: nothing.

    Returns:
        A JSON-ready dict: ``count``, ``clean_accuracy``, ``attacks`` (one
        row per attack and eps: ``attack``, ``eps``, ``eps_pixels``,
        ``accuracy``), ``input_gradient_norm`` (mean L2 norm per image of the
        loss gradient at the clean images), ``checks`` (``ordering``,
        ``near_zero``, ``gradients``, each with ``ok`` and what was compared)
        and ``warnings`` (one line per failed check).
    """
    eps_list = [_check_eps(e) for e in eps_list]
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int64)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need N > 0 images and N labels, got {len(images)} and {len(labels)}")
    pgd_options = {"steps": steps, "step_size": step_size, "random_start": random_start}
    batches = {"seed": seed, "batch_size": batch_size, "advance": advance or (lambda _: None)}
    clean, rows, grad_norm = _attack_batches(
        model, images, labels, eps_list, pgd_options, **batches
    )
    checks = _checks(clean, rows, grad_norm)
    return {
        "count": len(images),
        "clean_accuracy": clean,
        "pgd_steps": steps,
        "step_size": step_size,
        "random_start": random_start,
        "attacks": rows,
        "input_gradient_norm": grad_norm,
        "checks": checks,
        "warnings": [c["message"] for c in checks.values() if not c["ok"]],
    }


def _attack_batches(
    model,
    images,
    labels,
    eps_list: list[float],
    pgd_options: dict,
    *,
    seed: int,
    batch_size: int,
    advance: Callable[[float], None],
) -> tuple[float, list[dict], float]:
    """Attacks ``images`` a batch at a time with FGSM and PGD at each eps.

    ``advance(n)`` is told of the images done after each eps of each batch.

    Returns:
        ``(clean accuracy, rows, gradient norm)``: one row per attack and eps
        (``attack``, ``eps``, ``eps_pixels``, ``accuracy``), and the mean L2
        norm per image of the loss's input gradient at the clean images.
    """
    import tensorflow as tf

    correct = {("clean", 0.0): 0}
    correct.update({(a, e): 0 for e in eps_list for a in ("fgsm", "pgd")})
    grad_norms = []
    for start in range(0, len(images), batch_size):
        x = tf.constant(images[start : start + batch_size])
        y = tf.constant(labels[start : start + batch_size])
        correct["clean", 0.0] += _hits(model, x, y)
        _, grad = _loss_and_gradient(model, x, y)
        grad_norms.extend(tf.norm(tf.reshape(grad, [len(x), -1]), axis=1).numpy().tolist())
        for e in eps_list:
            correct["fgsm", e] += _hits(model, fgsm(model, x, y, e), y)
            adv = pgd(model, x, y, e, seed=seed + start, **pgd_options)
            correct["pgd", e] += _hits(model, adv, y)
            advance(len(x) / max(len(eps_list), 1))
    rows = [
        {
            "attack": a,
            "eps": e,
            "eps_pixels": e * PIXEL_MAX,
            "accuracy": correct[a, e] / len(images),
        }
        for e in eps_list
        for a in ("fgsm", "pgd")
    ]
    return correct["clean", 0.0] / len(images), rows, float(np.mean(grad_norms))


def _hits(model, x, y) -> int:
    """How many of ``x`` the model classifies as ``y``."""
    import tensorflow as tf

    logits = model(x, training=False)
    return int(tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == y, tf.int32)))


def _checks(clean: float, rows: list[dict], grad_norm: float) -> dict:
    accuracy = {(r["attack"], r["eps"]): r["accuracy"] for r in rows}
    eps_list = sorted({r["eps"] for r in rows})
    broken = [
        {"eps": e, "clean": clean, "fgsm": accuracy["fgsm", e], "pgd": accuracy["pgd", e]}
        for e in eps_list
        if not accuracy["pgd", e] <= accuracy["fgsm", e] + ORDER_TOLERANCE
        or not accuracy["fgsm", e] <= clean + ORDER_TOLERANCE
    ]
    ordering = {
        "ok": not broken,
        "rule": "pgd accuracy <= fgsm accuracy <= clean accuracy at every eps",
        "violations": broken,
        "message": f"attack ordering does not hold at {broken}: the attack may be broken",
    }
    largest = max(eps_list, default=0.0)
    checked = largest >= LARGE_EPS - 1e-12
    at_largest = accuracy.get(("pgd", largest))
    near_zero = {
        "ok": not checked or at_largest <= NEAR_ZERO_ACCURACY,
        "checked": checked,
        "eps": largest,
        "large_eps": LARGE_EPS,
        "threshold": NEAR_ZERO_ACCURACY,
        "pgd_accuracy": at_largest,
        "message": (
            f"pgd accuracy at eps={largest:.4f} is {at_largest}, above {NEAR_ZERO_ACCURACY}: "
            "an eps this large should fool an undefended model; suspect gradient masking or "
            "too few pgd_steps"
        ),
    }
    gradients = {
        "ok": bool(np.isfinite(grad_norm) and grad_norm > 0),
        "input_gradient_norm": grad_norm,
        "message": (
            f"gradient_masking: the loss's gradient with respect to the input is {grad_norm} "
            "(zero or not finite), so gradient attacks cannot work and their accuracies "
            "overstate robustness"
        ),
    }
    return {"ordering": ordering, "near_zero": near_zero, "gradients": gradients}
