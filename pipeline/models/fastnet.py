"""The small wide network of the CIFAR-10 speed records (Jordan 2024, airbench94).

A frozen 2x2 patch-whitening convolution, three blocks of
[conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU],
a 3x3 max-pool and a bias-free linear head scaled by 1/9: about 118 M
multiply-adds per 32x32 image at the default widths, which trains to ~94% on
CIFAR-10 in ten epochs (see ``experiment=cifar10_94``).

The whitening filters are set from training images when the model is built
(``pipeline.models.build(..., adapt_images=...)``), then stay frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from pipeline.models.layers import BatchNorm, PartialIdentity, PatchWhitening
from pipeline.models.registry import register_model

WIDTHS = (64, 256, 256)  # channels of the three blocks; (128, 384, 384) is the records' wider net
BN_MOMENTUM = 0.6  # Keras convention: = PyTorch's momentum 0.4, as in airbench94
BN_EPSILON = 1e-12  # the records' value; the batch variances are O(1)
LOGIT_SCALE = 1.0 / 9.0
WHITEN_KERNEL = 2  # 2x2 patches: 12 dimensions, 24 filters (each eigenvector and its negative)


def torch_default_init() -> keras.initializers.Initializer:
    """PyTorch's default conv and linear init, U(+-1/sqrt(fan_in)), which the records assume.

    Keras's Glorot init has 3x the variance for a 3x3 conv, which under BatchNorm
    makes the same learning rate 3x smaller in effect.
    """
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    )


@register_model
def fastnet(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    widths: Sequence[int] = WIDTHS,
    bn_momentum: float = BN_MOMENTUM,
    bn_epsilon: float = BN_EPSILON,
    whiten_images: int = 5000,
) -> keras.Model:
    """The airbench94 network: patch whitening, three conv-pool-BN-GELU blocks, scaled head.

    Args:
        num_classes: Number of output logits.
        input_shape: `(height, width, channels)`, height and width >= 32 (the
            three 2x pools and the final 3x3 pool need them).
        widths: Channels of the three blocks (64/256/256; 128/384/384 is wider).
        bn_momentum: BatchNorm moving-average momentum (Keras convention).
        bn_epsilon: BatchNorm epsilon.
        whiten_images: how many training images the whitening filters are
            computed from; ``pipeline.train`` passes that many to
            ``build(adapt_images=...)``, the builder only checks it.

    Returns:
        A `keras.Model` mapping normalized images to float32 logits.

    Raises:
        ValueError: If an argument is out of range.
    """
    widths = tuple(widths)
    if len(widths) != 3 or not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ValueError(f"widths must be three ints >= 1, got {list(widths)}")
    if min(input_shape[:2]) < 32:
        raise ValueError(f"fastnet needs inputs of at least 32x32 pixels, got {input_shape}")
    if not isinstance(whiten_images, int) or whiten_images < 1:
        raise ValueError(f"whiten_images must be an int >= 1, got {whiten_images!r}")
    if not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum}")

    inputs = keras.Input(shape=input_shape)
    x = PatchWhitening(kernel_size=WHITEN_KERNEL, name="whiten")(inputs)
    x = keras.layers.Activation("gelu", name="whiten_gelu")(x)
    for i, width in enumerate(widths, start=1):
        x = _block(x, width, bn_momentum, bn_epsilon, name=f"block{i}")
    x = keras.layers.MaxPooling2D(3, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(
        num_classes, use_bias=False, kernel_initializer=torch_default_init(), name="head"
    )(x)
    logits = keras.layers.Rescaling(LOGIT_SCALE, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="fastnet")


def _block(x, width: int, momentum: float, epsilon: float, name: str):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU; BN scale fixed at 1, offset trained."""
    for j in (1, 2):
        x = keras.layers.Conv2D(
            width,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer=PartialIdentity(torch_default_init()),
            name=f"{name}_conv{j}",
        )(x)
        if j == 1:
            x = keras.layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        x = BatchNorm(momentum=momentum, epsilon=epsilon, scale=False, name=f"{name}_bn{j}")(x)
        x = keras.layers.Activation("gelu", name=f"{name}_gelu{j}")(x)
    return x
