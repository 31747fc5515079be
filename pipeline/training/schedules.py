"""Learning-rate schedules with linear warmup, in Keras ops (any backend)."""

from __future__ import annotations

import math

import keras
from keras import ops

SCHEDULES = ("constant", "step", "cosine", "linear")


@keras.saving.register_keras_serializable(package="pipeline")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to ``peak_lr``, then constant, step, cosine or linear decay.

    Warmup then linear decay to zero is the one-cycle schedule (Smith 2018, as
    in the fast CIFAR-10 recipes of Page's DAWNBench entries).

    Keras's own ``CosineDecay`` has a warmup but ``PiecewiseConstantDecay`` has
    none, so one small schedule covers the three shapes the same way.

    Args:
        peak_lr: learning rate at the end of warmup (already scaled to the
            global batch).
        total_steps: optimizer steps of the whole run.
        warmup_steps: steps of linear warmup from ``peak_lr / warmup_steps``
            (or from ``warmup_from * peak_lr``).
        kind: ``constant``, ``step``, ``cosine`` or ``linear``.
        warmup_from: learning rate at step 0 as a fraction of ``peak_lr``; 0
            starts at ``peak_lr / warmup_steps`` (the speed records start at 0.2).
        final: linear only: learning rate at the last step as a fraction of
            ``peak_lr`` (the speed records end at 0.07).
        alpha: cosine only: final learning rate as a fraction of ``peak_lr``.
        milestones: step only: fractions of ``total_steps`` at which the rate
            is multiplied by ``factor``.
        factor: step only: the multiplier.
    """

    def __init__(
        self,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        kind: str = "cosine",
        alpha: float = 0.0,
        milestones: tuple[float, ...] = (),
        factor: float = 0.1,
        warmup_from: float = 0.0,
        final: float = 0.0,
    ):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        if peak_lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {peak_lr}")
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                f"got {total_steps} and {warmup_steps}"
            )
        bad = [m for m in milestones if not 0.0 < m < 1.0]
        if bad:
            raise ValueError(f"milestones are fractions of training in (0, 1), got {bad}")
        if not (0.0 <= warmup_from <= 1.0 and 0.0 <= final <= 1.0):
            raise ValueError(
                f"warmup_from and final are fractions of peak_lr in [0, 1], got "
                f"{warmup_from} and {final}"
            )
        self.peak_lr = float(peak_lr)
        self.warmup_from = float(warmup_from)
        self.final = float(final)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind
        self.alpha = float(alpha)
        self.milestones = tuple(float(m) for m in milestones)
        self.factor = float(factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
            lr = self.peak_lr * (self.alpha + (1.0 - self.alpha) * cosine)
        elif self.kind == "linear":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            lr = self.peak_lr * (1.0 - (1.0 - self.final) * progress)
        elif self.kind == "step":
            lr = ops.convert_to_tensor(self.peak_lr, "float32")
            for m in self.milestones:
                boundary = float(round(m * self.total_steps))
                lr = ops.where(step >= boundary, lr * self.factor, lr)
        else:
            lr = ops.convert_to_tensor(self.peak_lr, "float32")
        if self.warmup_steps > 0:
            if self.warmup_from > 0:
                fraction = step / self.warmup_steps
                warm = self.peak_lr * (self.warmup_from + (1.0 - self.warmup_from) * fraction)
            else:
                warm = self.peak_lr * (step + 1.0) / self.warmup_steps
            lr = ops.where(step < self.warmup_steps, warm, lr)
        return lr

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
            "alpha": self.alpha,
            "milestones": list(self.milestones),
            "factor": self.factor,
            "warmup_from": self.warmup_from,
            "final": self.final,
        }
