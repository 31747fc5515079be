"""ImageNet ResNets: resnet18/34 (basic blocks, torchvision layout) and resnet50/101/152.

resnet50/101/152 are `keras.applications` networks (so they can start from ImageNet
weights); resnet18/34 are written here with the same basic block as the CIFAR
ResNets and match torchvision's parameter counts (11,689,512 and 21,797,672
trainable at 1000 classes). All of them train on inputs down to 32x32.
"""

from __future__ import annotations

import keras

from pipeline.models.keras_app import application_classifier
from pipeline.models.registry import register_model
from pipeline.models.resnet_cifar import basic_block, conv_bn

STAGE_WIDTHS = (64, 128, 256, 512)


def _basic_resnet(
    blocks_per_stage: tuple[int, ...],
    num_classes: int,
    input_shape: tuple[int, int, int],
    name: str,
) -> keras.Model:
    inputs = keras.Input(shape=input_shape)
    x = conv_bn(inputs, STAGE_WIDTHS[0], 7, 2, name="stem")  # 7x7/2, padding 3
    x = keras.layers.ReLU(name="stem_relu")(x)
    # Zero padding acts as PyTorch's -inf padding here: it follows a ReLU.
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    for stage, (filters, blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage, strict=True)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = basic_block(x, filters, stride, name=f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)


@register_model
def resnet18(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """ResNet-18 of He et al. 2015 in torchvision's layout (~11.7M parameters)."""
    return _basic_resnet(
        blocks_per_stage=(2, 2, 2, 2),
        num_classes=num_classes,
        input_shape=input_shape,
        name="resnet18",
    )


@register_model
def resnet34(num_classes: int, input_shape: tuple[int, int, int]) -> keras.Model:
    """ResNet-34 of He et al. 2015 in torchvision's layout (~21.8M parameters)."""
    return _basic_resnet(
        blocks_per_stage=(3, 4, 6, 3),
        num_classes=num_classes,
        input_shape=input_shape,
        name="resnet34",
    )


@register_model
def resnet50(
    num_classes: int, input_shape: tuple[int, int, int], pretrained: str | None = None
) -> keras.Model:
    """`keras.applications.ResNet50` with a new head (25.6M parameters at 1000 classes)."""
    return application_classifier(
        "ResNet50", num_classes, input_shape, pretrained=pretrained, name="resnet50"
    )


@register_model
def resnet101(
    num_classes: int, input_shape: tuple[int, int, int], pretrained: str | None = None
) -> keras.Model:
    """`keras.applications.ResNet101` with a new head (44.7M parameters at 1000 classes)."""
    return application_classifier(
        "ResNet101", num_classes, input_shape, pretrained=pretrained, name="resnet101"
    )


@register_model
def resnet152(
    num_classes: int, input_shape: tuple[int, int, int], pretrained: str | None = None
) -> keras.Model:
    """`keras.applications.ResNet152` with a new head (60.4M parameters at 1000 classes)."""
    return application_classifier(
        "ResNet152", num_classes, input_shape, pretrained=pretrained, name="resnet152"
    )
