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


@keras.saving.register_keras_serializable(package="pipeline")
class BatchNorm(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` that runs TensorFlow's fused kernel where it can.

    Keras 3 normalizes with separate moment, subtract and scale ops on every
    backend; on TensorFlow that skips ``FusedBatchNormV3``, one kernel forward
    and one backward, which is much faster on a CPU. This layer calls it for
    4-D channels-last float inputs on the TensorFlow backend (XLA compiles it
    too), and Keras's own code everywhere else: other backends, masks,
    synchronized or renormalized batch norm. Same variables, config and
    moving-statistics update (the biased batch variance, as Keras keeps it),
    so weights and checkpoints are interchangeable with Keras's layer.
    """

    def _fused(self, inputs, mask) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.synchronized
            and not self.renorm
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and inputs.dtype in ("float32", "float16", "bfloat16")
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fused(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        channels = inputs.shape[-1]
        scale = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels])
        offset = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels])
        args = {"x": inputs, "scale": scale, "offset": offset, "epsilon": self.epsilon}
        if training and self.trainable:
            empty = tf.constant([], "float32")
            outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
                **args, mean=empty, variance=empty, data_format="NHWC", is_training=True
            )
            count = tf.cast(tf.size(inputs) // channels, "float32")
            variance = variance * (count - 1.0) / tf.maximum(count, 2.0)  # back to biased
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(
                self.moving_variance * momentum + variance * (1.0 - momentum)
            )
        else:
            outputs, *_ = tf.raw_ops.FusedBatchNormV3(
                **args,
                mean=tf.cast(self.moving_mean, "float32"),
                variance=tf.cast(self.moving_variance, "float32"),
                data_format="NHWC",
                is_training=False,
            )
        return ops.cast(outputs, self.compute_dtype)
