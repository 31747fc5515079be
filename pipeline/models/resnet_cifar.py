"""CIFAR ResNets of He et al. 2015 (depth 6n+2), with 1x1 projection shortcuts.

The layout matches the PyTorch reference in `shared/bench/torch_resnet_cifar.py`
layer for layer: resnet20 has 272,474 trainable parameters at 10 classes.
"""

from __future__ import annotations

import keras

from pipeline.models.layers import BatchNorm
from pipeline.models.registry import register_model

STAGE_WIDTHS = (16, 32, 64)
# PyTorch's BatchNorm2d defaults (its momentum 0.1 is Keras's 0.9).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv_bn(x, filters: int, kernel_size: int, stride: int, name: str):
    """Bias-free convolution then BatchNormalization, padded like PyTorch.

    Strided convolutions pad symmetrically (`kernel_size // 2` on each side) as
    PyTorch does, where Keras's "same" would pad only bottom/right on even sizes.

    Args:
        x: Input tensor, channels last.
        filters: Output channels.
        kernel_size: Square kernel size (odd).
        stride: Convolution stride.
        name: Prefix of the layer names.

    Returns:
        The normalised tensor (no activation).
    """
    padding = "same"
    if stride > 1 and kernel_size > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=padding,
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    return BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn")(x)


def basic_block(x, filters: int, stride: int, name: str):
    """ResNet basic block: two 3x3 conv-BN, projection shortcut when the shape changes.

    Args:
        x: Input tensor, channels last.
        filters: Output channels.
        stride: Stride of the first convolution (and of the shortcut).
        name: Prefix of the layer names.

    Returns:
        `relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`.
    """
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = conv_bn(x, filters, 1, stride, name=f"{name}_shortcut")
    y = conv_bn(x, filters, 3, stride, name=f"{name}_1")
    y = keras.layers.ReLU(name=f"{name}_1_relu")(y)
    y = conv_bn(y, filters, 3, 1, name=f"{name}_2")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _cifar_resnet(
    blocks_per_stage: int, num_classes: int, input_shape: tuple[int, int, int], name: str
) -> keras.Model:
    inputs = keras.Input(shape=input_shape)
    x = conv_bn(inputs, STAGE_WIDTHS[0], 3, 1, name="stem")
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate(STAGE_WIDTHS):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            x = basic_block(x, filters, stride, name=f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)


@register_model
def resnet20(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """CIFAR ResNet-20 (3 basic blocks per stage, ~0.27M parameters)."""
    return _cifar_resnet(
        blocks_per_stage=3, num_classes=num_classes, input_shape=input_shape, name="resnet20"
    )


@register_model
def resnet32(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """CIFAR ResNet-32 (5 basic blocks per stage, ~0.46M parameters)."""
    return _cifar_resnet(
        blocks_per_stage=5, num_classes=num_classes, input_shape=input_shape, name="resnet32"
    )


@register_model
def resnet44(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """CIFAR ResNet-44 (7 basic blocks per stage, ~0.66M parameters)."""
    return _cifar_resnet(
        blocks_per_stage=7, num_classes=num_classes, input_shape=input_shape, name="resnet44"
    )


@register_model
def resnet56(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """CIFAR ResNet-56 (9 basic blocks per stage, ~0.85M parameters)."""
    return _cifar_resnet(
        blocks_per_stage=9, num_classes=num_classes, input_shape=input_shape, name="resnet56"
    )


@register_model
def resnet110(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """CIFAR ResNet-110 (18 basic blocks per stage, ~1.7M parameters)."""
    return _cifar_resnet(
        blocks_per_stage=18, num_classes=num_classes, input_shape=input_shape, name="resnet110"
    )
