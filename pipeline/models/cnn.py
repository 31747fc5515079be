"""A small VGG-style CNN: the fast default model for 32x32 images."""

from __future__ import annotations

import warnings

import keras

from pipeline.models.layers import BatchNorm
from pipeline.models.registry import register_model

NORMS = ("batch", "sync", "none")
STAGES = 3  # each halves height and width, so inputs need >= 2**STAGES pixels a side
CONVS_PER_STAGE = 2
BN_MOMENTUM = 0.9  # = PyTorch's momentum 0.1: statistics settle within a few epochs
BN_EPSILON = 1e-5


@register_model
def cnn(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    width: int = 32,
    dropout: float = 0.2,
    norm: str = "batch",
) -> keras.Model:
    """VGG-ish baseline: 3 stages of [conv3x3-norm-ReLU x2, maxpool], GAP, dropout, Dense.

    Stage widths are `width`, `2 * width`, `4 * width` (32/64/128 by default).

    Args:
        num_classes: Number of output logits.
        input_shape: `(height, width, channels)`, height and width >= 8.
        width: Channels of the first stage, >= 1.
        dropout: Dropout rate before the classifier, in [0, 1).
        norm: "batch" (BatchNormalization), "sync" (batch statistics synchronised
            across replicas; TensorFlow backend only, plain BatchNormalization with a
            warning elsewhere) or "none" (no normalisation; convolutions get a bias).

    Returns:
        A `keras.Model` mapping preprocessed images to float32 logits.

    Raises:
        ValueError: If an argument is out of range.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if min(input_shape[:2]) < 2**STAGES:
        raise ValueError(f"cnn needs inputs of at least 8x8 pixels, got input_shape={input_shape}")
    if norm == "sync" and keras.backend.backend() != "tensorflow":
        warnings.warn(
            f"norm='sync' needs the TensorFlow backend, got {keras.backend.backend()!r}; "
            "using plain BatchNormalization instead.",
            stacklevel=2,
        )
        norm = "batch"

    inputs = keras.Input(shape=input_shape)
    x = inputs
    for stage in range(STAGES):
        for conv in range(CONVS_PER_STAGE):
            name = f"stage{stage + 1}_conv{conv + 1}"
            x = _conv_norm_relu(x, width * 2**stage, norm, name)
        x = keras.layers.MaxPooling2D(2, name=f"stage{stage + 1}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="cnn")


def _conv_norm_relu(x, filters: int, norm: str, name: str):
    x = keras.layers.Conv2D(
        filters,
        3,
        padding="same",
        use_bias=norm == "none",
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    if norm != "none":
        x = BatchNorm(
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            synchronized=norm == "sync",
            name=f"{name}_bn",
        )(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)
