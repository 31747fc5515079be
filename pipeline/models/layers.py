"""Small custom layers used by the model zoo, registered so `.keras` files reload."""

from __future__ import annotations

import keras
from keras import ops

# ImageNet statistics used by `keras.applications.imagenet_utils.preprocess_input`.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # 0..255 scale, BGR order
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)  # 0..1 scale
TORCH_STD_RGB = (0.229, 0.224, 0.225)  # 0..1 scale
PREPROCESS_MODES = ("caffe", "tf", "torch", "none")


@keras.saving.register_keras_serializable(package="pipeline")
class ImagenetPreprocess(keras.layers.Layer):
    """Maps raw RGB pixels (0..255, channels last) the way ImageNet weights expect.

    Equals `keras.applications.<module>.preprocess_input` for the module's mode, as a
    layer so that it runs on any backend and is saved with the model.

    Args:
        mode: "caffe" (RGB->BGR, then subtract the ImageNet BGR means), "tf"
            (scale to [-1, 1]), "torch" (scale to [0, 1], then standardise with the
            ImageNet RGB mean and std) or "none" (identity, for architectures that
            preprocess inside the network).
        **kwargs: Passed to `keras.layers.Layer`.

    Raises:
        ValueError: If `mode` is not one of the four above.
    """

    def __init__(self, mode: str, **kwargs):
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"mode must be one of {PREPROCESS_MODES}, got {mode!r}")
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(TORCH_MEAN_RGB, x.dtype)
            std = ops.convert_to_tensor(TORCH_STD_RGB, x.dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
