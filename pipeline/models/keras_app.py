"""Any `keras.applications` architecture, by name, with a fresh classifier head."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

import keras

from pipeline.models.registry import register_model

# How each keras.applications module expects ImageNet-pretrained inputs (the `mode`
# of its `preprocess_input`), keyed by module name; see layers.ImagenetPreprocess.
# "none": the network preprocesses raw 0..255 pixels itself.
PREPROCESS_MODES = {
    "resnet": "caffe",
    "vgg16": "caffe",
    "vgg19": "caffe",
    "resnet_v2": "tf",
    "inception_v3": "tf",
    "inception_resnet_v2": "tf",
    "xception": "tf",
    "mobilenet": "tf",
    "mobilenet_v2": "tf",
    "nasnet": "tf",
    "densenet": "torch",
    "efficientnet": "none",
    "efficientnet_v2": "none",
    "convnext": "none",
    "mobilenet_v3": "none",
    "regnet": "none",
}
PRETRAINED_CHOICES = (None, "imagenet")


def application_names() -> list[str]:
    """Returns the architecture names `keras.applications` offers, sorted."""
    return sorted(
        name
        for name in dir(keras.applications)
        if name[:1].isupper() and callable(getattr(keras.applications, name))
    )


def preprocess_mode(application: str) -> str:
    """Returns the `ImagenetPreprocess` mode matching an application's ImageNet weights.

    Args:
        application: A name from `application_names()`, e.g. "ResNet50".

    Returns:
        "caffe", "tf", "torch" or "none".

    Raises:
        ValueError: If the name is unknown or its module has no known mode.
    """
    module = _application(application).__module__.rsplit(".", 1)[-1]
    if module not in PREPROCESS_MODES:
        raise ValueError(
            f"No ImageNet preprocessing known for {application!r} (module {module!r}); "
            "add it to PREPROCESS_MODES."
        )
    return PREPROCESS_MODES[module]


def application_classifier(
    application: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    pretrained: str | None = None,
    name: str | None = None,
) -> keras.Model:
    """Wraps `keras.applications.<application>` (no top, average pooling) with a Dense head.

    Trained from scratch (`pretrained=None`) the network takes normalised images like
    every other model here, so its built-in preprocessing is turned off (or, for
    EfficientNet B0-B7 where it cannot be, undone). With `pretrained="imagenet"` it
    takes the input of its weights, i.e. raw pixels passed through
    `ImagenetPreprocess(model.preprocess_mode)`, which `models.build()` adds.

    Args:
        application: A name from `application_names()`, e.g. "ResNet50".
        num_classes: Number of output logits.
        input_shape: `(height, width, channels)`; each application has a minimum size.
        pretrained: None or "imagenet" (downloaded by Keras on first use).
        name: Name of the returned model; defaults to `application`.

    Returns:
        A `keras.Model` with float32 logits and a `preprocess_mode` attribute.

    Raises:
        ValueError: For an unknown application or `pretrained` value.
    """
    fn = _application(application)
    if pretrained not in PRETRAINED_CHOICES:
        raise ValueError(f"pretrained must be one of {PRETRAINED_CHOICES}, got {pretrained!r}")
    mode = preprocess_mode(application)
    has_switch = "include_preprocessing" in inspect.signature(fn).parameters
    options = {"include_preprocessing": False} if has_switch and pretrained is None else {}
    base = fn(
        include_top=False,
        weights=pretrained,
        input_shape=input_shape,
        pooling="avg",
        **options,
    )
    inputs = keras.Input(shape=input_shape)
    x = inputs
    if pretrained is None and mode == "none" and not has_switch:
        # EfficientNet B0-B7 always divide by 255 first; without this, normalised
        # inputs would shrink ~255x and drown in the stem BatchNorm's epsilon.
        x = keras.layers.Rescaling(255.0, name="undo_builtin_rescaling")(x)
    x = base(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    model = keras.Model(inputs, logits, name=name or application)
    model.preprocess_mode = mode
    return model


@register_model
def keras_app(
    num_classes: int,
    input_shape: tuple[int, int, int],
    name: str = "EfficientNetB0",
    pretrained: str | None = None,
) -> keras.Model:
    """Any `keras.applications` architecture with a new classifier head.

    Args:
        num_classes: Number of output logits.
        input_shape: `(height, width, channels)`.
        name: A `keras.applications` name, e.g. "EfficientNetB0" or "MobileNetV2".
        pretrained: None or "imagenet".

    Returns:
        A `keras.Model` mapping preprocessed images to float32 logits.

    Raises:
        ValueError: For an unknown `name` (the message lists close matches).
    """
    return application_classifier(name, num_classes, input_shape, pretrained=pretrained)


def _application(application: str) -> Callable[..., keras.Model]:
    names = application_names()
    if application not in names:
        by_lower = {n.lower(): n for n in names}
        close = difflib.get_close_matches(str(application).lower(), by_lower, n=5, cutoff=0.5)
        suggestions = [by_lower[c] for c in close] or names
        raise ValueError(
            f"Unknown keras.applications architecture {application!r}; "
            f"did you mean one of: {', '.join(suggestions)}?"
        )
    return getattr(keras.applications, application)
