"""Model zoo: a registry of image classifiers and `build()`, which wraps one for training.

Every registered builder is `fn(num_classes, input_shape, **kwargs) -> keras.Model`
(plus `pretrained=None` when keras.applications has weights for it). Its input is
already-preprocessed float images, its output float32 logits. `build()` puts the
preprocessing in front, so the model the trainer gets takes raw 0..255 pixels:

    model = build("resnet20", num_classes=10, input_shape=(32, 32, 3),
                  mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
"""

from __future__ import annotations

import inspect
import logging
import numbers
import os
import re
import warnings
from collections.abc import Mapping, Sequence

import keras
import numpy as np

from pipeline.errors import PipelineError
from pipeline.models.layers import AlternatingFlip, ImagenetPreprocess, PatchWhitening
from pipeline.models.registry import get_model, list_models, register_model

logger = logging.getLogger(__name__)

PRETRAINED_CHOICES = ("imagenet",)
WEIGHTS_SUFFIXES = (".weights.h5", ".keras")


def build(
    arch: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pretrained: str | None = None,
    weights: str | os.PathLike | None = None,
    adapt_images: np.ndarray | None = None,
    alternating_flip: bool = False,
    **kwargs,
) -> keras.Model:
    """Builds the model the trainer uses: raw pixels -> preprocessing -> network -> logits.

    Args:
        arch: A registered model name (see `list_models()`).
        num_classes: Number of output logits, >= 1.
        input_shape: `(height, width, channels)` of the images.
        mean: Per-channel mean of the training images on the [0, 1] scale. Required
            unless `pretrained` is set (then the weights' own preprocessing is used).
        std: Per-channel standard deviation on the [0, 1] scale, all > 0.
        pretrained: None (random init) or "imagenet" (keras.applications weights,
            downloaded by Keras on first use; only models backed by keras.applications).
        weights: Path to a local `.weights.h5` or `.keras` file to fine-tune from.
            Layers whose shapes differ (e.g. a head for another number of classes)
            are skipped with a logged warning.
        adapt_images: raw training images (``[N, H, W, C]``, 0..255), a few thousand,
            that set the network's data-dependent layers (``PatchWhitening``); None
            leaves them at their initial values (fine when weights are loaded afterwards).
        alternating_flip: put an ``AlternatingFlip`` layer in front, which
            mirrors training batches on odd epochs (with
            ``pipeline.training.callbacks.AlternatingFlipEpochs``); the identity at inference.
        **kwargs: Passed to the builder (e.g. `norm="sync"` for "cnn").

    Returns:
        An uncompiled `keras.Model`: float images (0..255) -> float32 logits `(batch, num_classes)`.

    Raises:
        ValueError: For an unknown `arch`, a bad argument, or `pretrained` on a model
            that has no such weights.
        FileNotFoundError: If `weights` does not exist.
    """
    builder = get_model(arch)
    input_shape = _check_input_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    if pretrained is not None:
        _check_pretrained(arch, builder, pretrained, input_shape)
        kwargs["pretrained"] = pretrained
    else:
        mean, std = _check_mean_std(mean, std, channels=input_shape[-1])
    weights = None if weights is None else _check_weights_path(weights)
    backbone = builder(num_classes, input_shape, **kwargs)
    inputs, x = _front(input_shape, backbone, pretrained, mean, std, alternating_flip)
    model = keras.Model(inputs, backbone(x), name=arch)
    if adapt_images is not None:
        _adapt(backbone, keras.Model(inputs, x), adapt_images)
    if weights is not None:
        _load_weights(model, weights)
    return model


def build_from_config(
    model_section: Mapping,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    **extra,
) -> keras.Model:
    """Builds the model a config's ``model`` section describes, with `build`.

    Args:
        model_section: the ``model`` section as a plain mapping (resolved, e.g. by
            ``OmegaConf.to_container``): ``arch`` and the builder's options.
        num_classes: number of output logits.
        input_shape: ``(height, width, channels)`` of the images.
        mean: per-channel mean of the training images, [0, 1] scale.
        std: per-channel standard deviation, [0, 1] scale.
        **extra: more arguments of `build` (e.g. ``adapt_images``); they take
            precedence over the section's options of the same name.

    Returns:
        The uncompiled model, as `build` returns it.

    Raises:
        PipelineError: ``model={arch}: ...`` for an unknown ``arch``, a bad option
            or a missing weights file.
    """
    options = dict(model_section)
    arch = options.pop("arch")
    options.update(extra)
    try:
        return build(
            arch, num_classes=num_classes, input_shape=input_shape, mean=mean, std=std, **options
        )
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise PipelineError(f"model={arch}: {err}") from err


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(_is_int(d) and d > 0 for d in shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive ints, got {input_shape!r}"
        )
    return tuple(int(d) for d in shape)


def _check_num_classes(num_classes) -> int:
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return int(num_classes)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_pretrained(arch, builder, pretrained, input_shape) -> None:
    if pretrained not in PRETRAINED_CHOICES:
        raise ValueError(
            f"pretrained must be None or one of {PRETRAINED_CHOICES}, got {pretrained!r}"
        )
    if "pretrained" not in inspect.signature(builder).parameters:
        raise ValueError(
            f"Model {arch!r} has no {pretrained} weights (pretrained={pretrained!r}); "
            f"models backed by keras.applications have: {', '.join(_pretrainable())}."
        )
    if input_shape[-1] != 3:
        raise ValueError(
            f"pretrained={pretrained!r} needs 3-channel RGB input, got input_shape={input_shape}"
        )


def _pretrainable() -> list[str]:
    return [n for n in list_models() if "pretrained" in inspect.signature(get_model(n)).parameters]


def _check_mean_std(mean, std, channels: int) -> tuple[list[float], list[float]]:
    if mean is None or std is None:
        raise ValueError(
            f"mean and std (per-channel, [0, 1] scale) are required unless pretrained is set, "
            f"got mean={mean!r}, std={std!r}"
        )
    mean = np.asarray(mean, dtype="float64").ravel().tolist()
    std = np.asarray(std, dtype="float64").ravel().tolist()
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need one value per channel ({channels}), got mean={mean}, std={std}"
        )
    if min(std) <= 0:
        raise ValueError(f"std must be > 0 for every channel, got {std}")
    return mean, std


def _check_weights_path(weights: str | os.PathLike) -> str:
    path = os.fspath(weights)
    if not path.endswith(WEIGHTS_SUFFIXES):
        raise ValueError(f"weights must be a {' or '.join(WEIGHTS_SUFFIXES)} file, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    return path


def _front(input_shape, backbone, pretrained, mean, std, alternating_flip: bool):
    """The pixel input, and what it becomes at the backbone: flipped (maybe), preprocessed."""
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = AlternatingFlip(name="alternating_flip")(inputs) if alternating_flip else inputs
    return inputs, _preprocessing(x, backbone, pretrained, mean, std)


def _preprocessing(inputs, backbone, pretrained, mean, std):
    # Preprocess in float32 even under a mixed policy: 0..255 pixels and small
    # normalised values both lose digits in 16-bit floats.
    if pretrained is not None:
        return ImagenetPreprocess(
            backbone.preprocess_mode, dtype="float32", name="imagenet_preprocess"
        )(inputs)
    x = keras.layers.Rescaling(1.0 / 255.0, dtype="float32", name="rescale")(inputs)
    variance = [s**2 for s in std]
    return keras.layers.Normalization(
        mean=mean, variance=variance, dtype="float32", name="normalize"
    )(x)


def _load_weights(model: keras.Model, path: str) -> None:
    # Keras reports skipped layers as a Python warning that prints whole tensors;
    # say instead which layers kept their fresh initialisation, and why.
    before = model.get_weights()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path, skip_mismatch=True)
    after = model.get_weights()
    if before and all(np.array_equal(b, a) for b, a in zip(before, after, strict=True)):
        raise ValueError(
            f"weights={path!r} match no layer of this {model.name} model (no weight was "
            "loaded: the file holds another architecture's weights); pass a file saved from "
            "the same model.arch, or weights=null"
        )
    reports = [str(w.message) for w in caught if "could not be loaded" in str(w.message)]
    for warning in caught:
        message = str(warning.message)
        if message in reports:
            continue
        if reports and message.startswith("Skipping nested container"):
            # Keras retries the same mismatched layers through a nested
            # Functional model's op list and warns about them a second time.
            logger.debug(message)
            continue
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if reports:
        skipped = [
            name
            for report in reports
            for name in re.findall(r"<\w+ name=([^,>]+)", report.rpartition("loaded:")[2])
        ]
        logger.warning(
            "Loading weights from %s skipped layers whose shapes differ from the file "
            "(e.g. a classifier head for another number of classes); they keep their "
            "fresh initialisation: %s",
            path,
            ", ".join(skipped) or reports[0].splitlines()[0],
        )
    logger.info("Loaded weights from %s", path)


def _adapt(backbone: keras.Model, preprocess: keras.Model, images: np.ndarray) -> None:
    """Sets each ``PatchWhitening`` layer from what the raw ``images`` become at its input."""
    layers = [layer for layer in backbone.layers if isinstance(layer, PatchWhitening)]
    if not layers:
        return
    features = preprocess.predict(np.asarray(images, "float32"), batch_size=500, verbose=0)
    for layer in layers:
        upstream = keras.Model(backbone.input, layer.input)
        layer.adapt(upstream.predict(features, batch_size=500, verbose=0))


# Saved models carry their optimizer and its learning-rate schedule: registering
# the schedule here lets `keras.saving.load_model` read any `model.keras` of ours
# once `pipeline.models` is imported.
# Importing the families registers their models; they need `register_model` above.
from pipeline.models import (  # noqa: E402, F401, I001
    cnn,
    fastnet,
    inception,
    keras_app,
    resnet_cifar,
    resnet_imagenet,
)

# what a compiled model.keras may hold besides our layers, so that `import pipeline.models`
# is all keras.saving.load_model needs
from pipeline.training import optimizers, schedules  # noqa: E402, F401

__all__ = [
    "ImagenetPreprocess",
    "build",
    "build_from_config",
    "get_model",
    "list_models",
    "register_model",
]
