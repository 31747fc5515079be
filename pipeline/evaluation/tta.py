"""Test-time augmentation: average a classifier's logits over mirrored and shifted views.

``with_tta(model, "flip_translate")`` is the records' level 2 (Jordan 2024,
airbench94): half the weight on the image and its mirror image, half on the
same two views of the image shifted one pixel up-left and one pixel
down-right (reflect padding), six forward passes in all. ``flip`` is the first
half alone (two passes). Logits are averaged, as the records do.
"""

from __future__ import annotations

from pipeline.errors import PipelineError

TTA_MODES = ("none", "flip", "flip_translate")
SHIFT = 1  # pixels, at any image size: the records' one-pixel translation


def check_mode(mode: str, key: str = "tta") -> str:
    """Returns ``mode`` if it is one of :data:`TTA_MODES`.

    Args:
        mode: the test-time augmentation asked for.
        key: how the user set it (``eval.tta``, ``--tta``, ...), for the message.

    Raises:
        PipelineError: naming ``key``, the value received and the valid modes.
    """
    if mode not in TTA_MODES:
        raise PipelineError(f"{key} must be one of {', '.join(TTA_MODES)}; got {mode!r}")
    return mode


def views(images, mode: str) -> list[tuple[float, object]]:
    """The ``(weight, view)`` pairs whose weighted logits ``mode`` sums; weights add to 1.

    Args:
        images: ``[N, H, W, C]`` images (any scale: views only move pixels).
        mode: one of :data:`TTA_MODES`.
    """
    from keras import ops

    check_mode(mode)
    if mode == "none":
        return [(1.0, images)]
    if mode == "flip":
        return [(0.5, images), (0.5, ops.flip(images, axis=2))]
    pairs = [(0.25, images), (0.25, ops.flip(images, axis=2))]
    height, width = images.shape[1], images.shape[2]
    padded = ops.pad(images, [[0, 0], [SHIFT, SHIFT], [SHIFT, SHIFT], [0, 0]], mode="reflect")
    for top in (0, 2 * SHIFT):  # up-left, then down-right
        shifted = padded[:, top : top + height, top : top + width, :]
        pairs += [(0.125, shifted), (0.125, ops.flip(shifted, axis=2))]
    return pairs


def with_tta(model, mode: str):
    """Returns ``model`` itself for ``none``, else a model averaging its logits over views.

    The wrapper shares ``model``'s weights; it takes the same inputs and
    returns float32 logits of the same shape.

    Raises:
        ValueError: an unknown ``mode``.
    """
    import keras

    from pipeline.models.layers import TestTimeAugmentation

    if check_mode(mode) == "none":
        return model
    inputs = keras.Input(shape=model.input_shape[1:], name="pixels")
    layer = TestTimeAugmentation(model, lambda images: views(images, mode), name=f"tta_{mode}")
    outputs = layer(inputs)
    return keras.Model(inputs, outputs, name=f"{model.name}_tta")
