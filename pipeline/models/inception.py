"""Inception: InceptionV3 for inputs >= 75px, the compact Inception of Zhang et al. below.

The compact network is the "small Inception" of Zhang et al. 2017 (Understanding
deep learning requires rethinking generalization, appendix A), built for 28-32px
CIFAR crops; ~1.65M parameters at 10 classes.
"""

from __future__ import annotations

import keras

from pipeline.models.keras_app import application_classifier
from pipeline.models.layers import BatchNorm
from pipeline.models.registry import register_model

MIN_INCEPTION_V3_SIZE = 75  # pixels a side, the smallest InceptionV3 accepts
STEM_FILTERS = 96
# ("inception", c1, c3): concat(1x1 conv c1, 3x3 conv c3);
# ("downsample", c): concat(3x3/2 conv c, 3x3/2 maxpool).
COMPACT_LAYOUT = (
    ("inception", 32, 32),
    ("inception", 32, 48),
    ("downsample", 80),
    ("inception", 112, 48),
    ("inception", 96, 64),
    ("inception", 80, 80),
    ("inception", 48, 96),
    ("downsample", 96),
    ("inception", 176, 160),
    ("inception", 176, 160),
)
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@register_model
def inception(
    num_classes: int, input_shape: tuple[int, int, int], pretrained: str | None = None
) -> keras.Model:
    """InceptionV3 when both sides are >= 75px, else the compact Inception of Zhang et al.

    Args:
        num_classes: Number of output logits.
        input_shape: `(height, width, channels)`.
        pretrained: None or "imagenet" (InceptionV3 only, so inputs >= 75px).

    Returns:
        A `keras.Model` mapping preprocessed images to float32 logits.

    Raises:
        ValueError: If `pretrained` is set for inputs under 75px.
    """
    if min(input_shape[:2]) >= MIN_INCEPTION_V3_SIZE:
        return application_classifier(
            "InceptionV3", num_classes, input_shape, pretrained=pretrained, name="inception"
        )
    if pretrained is not None:
        raise ValueError(
            f"pretrained={pretrained!r} needs InceptionV3, which needs inputs of at least "
            f"{MIN_INCEPTION_V3_SIZE}x{MIN_INCEPTION_V3_SIZE}px, got input_shape={input_shape}; "
            "the compact Inception used below that has no pretrained weights."
        )
    return _compact_inception(num_classes, input_shape)


def _compact_inception(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    inputs = keras.Input(shape=input_shape)
    x = _conv_module(inputs, STEM_FILTERS, 3, 1, name="stem")
    for i, (kind, *channels) in enumerate(COMPACT_LAYOUT, start=1):
        if kind == "inception":
            x = _inception_module(x, *channels, name=f"inception{i}")
        else:
            x = _downsample_module(x, *channels, name=f"downsample{i}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="inception")


def _conv_module(x, filters: int, kernel_size: int, stride: int, name: str):
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _inception_module(x, c1: int, c3: int, name: str):
    branch1 = _conv_module(x, c1, 1, 1, name=f"{name}_1x1")
    branch3 = _conv_module(x, c3, 3, 1, name=f"{name}_3x3")
    return keras.layers.Concatenate(name=f"{name}_concat")([branch1, branch3])


def _downsample_module(x, c: int, name: str):
    conv = _conv_module(x, c, 3, 2, name=f"{name}_conv3x3")
    pool = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"{name}_pool")(x)
    return keras.layers.Concatenate(name=f"{name}_concat")([conv, pool])
