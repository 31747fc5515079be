"""Optimizers the config can name with ``_target_`` beside Keras's own."""

from __future__ import annotations

import keras

OFFSET_NAMES = ("beta",)  # BatchNormalization's offset variable


@keras.saving.register_keras_serializable(package="pipeline")
class SGD(keras.optimizers.SGD):
    """Keras's SGD (Nesterov, decoupled weight decay) with its own rate for BatchNorm offsets.

    The speed records train the BatchNorm offsets (``beta``) with a learning
    rate 64x that of the other weights (airbench94's ``bias_scaler``), while
    weight decay stays the same for all: here the offsets' step uses
    ``learning_rate * offset_lr_multiplier`` and Keras's decoupled weight
    decay, ``weight_decay * learning_rate`` per step, is unchanged.

    Args:
        offset_lr_multiplier: learning-rate multiplier of BatchNorm offsets, > 0.
        **kwargs: Passed to ``keras.optimizers.SGD``.

    Raises:
        ValueError: ``offset_lr_multiplier`` <= 0.
    """

    def __init__(self, offset_lr_multiplier: float = 1.0, **kwargs):
        if not offset_lr_multiplier > 0:
            raise ValueError(f"offset_lr_multiplier must be > 0, got {offset_lr_multiplier}")
        super().__init__(**kwargs)
        self.offset_lr_multiplier = float(offset_lr_multiplier)

    def update_step(self, gradient, variable, learning_rate):
        if self.offset_lr_multiplier != 1.0 and is_offset(variable):
            learning_rate = learning_rate * self.offset_lr_multiplier
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "offset_lr_multiplier": self.offset_lr_multiplier}


def is_offset(variable) -> bool:
    """Whether ``variable`` is a BatchNormalization offset (its ``beta``).

    On TensorFlow, ``update_step`` gets the underlying ``tf.Variable``, named
    like ``block1_bn1/beta:0``; a Keras variable is named ``beta``.
    """
    return variable.name.rsplit("/", 1)[-1].split(":")[0] in OFFSET_NAMES
