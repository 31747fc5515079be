"""The model registry: builders register under their function name.

Each family module (``cnn``, ``resnet_cifar``, ...) decorates its builders with
:func:`register_model`; ``pipeline.models`` imports the families, so every
builder is registered once ``pipeline.models`` is imported.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import keras

_MODELS: dict[str, Callable[..., keras.Model]] = {}


def register_model(fn: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
    """Adds a model builder to the registry under its function name.

    Args:
        fn: `fn(num_classes, input_shape, **kwargs) -> keras.Model` returning logits.

    Returns:
        `fn` unchanged, so this works as a decorator.

    Raises:
        ValueError: If a builder with the same name is already registered.
    """
    if fn.__name__ in _MODELS:
        raise ValueError(f"Model {fn.__name__!r} is already registered.")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Returns the registered model names, sorted."""
    return sorted(_MODELS)


def get_model(name: str) -> Callable[..., keras.Model]:
    """Returns the builder registered under `name`.

    Args:
        name: A name from `list_models()`.

    Returns:
        The builder function.

    Raises:
        ValueError: If `name` is not registered; the message lists the valid names.
    """
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), _MODELS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown model {name!r}.{hint} Registered models: {', '.join(list_models())}."
        )
    return _MODELS[name]
