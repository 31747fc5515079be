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


@keras.saving.register_keras_serializable(package="pipeline")
class PartialIdentity(keras.initializers.Initializer):
    """Conv kernels whose first ``in_channels`` filters pass their input channel through.

    The records' ``dirac_`` init (airbench): filter ``o < in_channels`` is a
    unit impulse at the kernel's center on input channel ``o``, so a fresh
    network starts close to a stack of identities; the other filters come from
    ``base``.

    Args:
        base: initializer of the remaining filters.
    """

    def __init__(self, base="glorot_uniform"):
        self.base = keras.initializers.get(base)

    def __call__(self, shape, dtype=None):
        kernel = self.base(shape, dtype=dtype)
        kh, kw, cin, cout = shape
        eye = ops.reshape(ops.eye(cin, cout, dtype=kernel.dtype), (1, 1, cin, cout))
        dirac = ops.pad(
            eye, [[kh // 2, kh - 1 - kh // 2], [kw // 2, kw - 1 - kw // 2], [0, 0], [0, 0]]
        )
        n = min(cin, cout)
        keep = ops.concatenate([ops.zeros((n,), kernel.dtype), ops.ones((cout - n,), kernel.dtype)])
        return kernel * keep + dirac

    def get_config(self):
        return {"base": keras.initializers.serialize(self.base)}


@keras.saving.register_keras_serializable(package="pipeline")
class PatchWhitening(keras.layers.Layer):
    """A valid ``k x k`` convolution whose frozen filters whiten the image's patches.

    ``adapt(images)`` sets the ``2 * k * k * channels`` filters to the
    eigenvectors of the (uncentered) covariance of all ``k x k`` patches of
    ``images``, each divided by the square root of its eigenvalue (plus
    ``epsilon``) and followed by its negative, largest eigenvalue first
    (Jordan 2024, airbench94). The filters never train; the bias does.

    Args:
        kernel_size: patch side in pixels (2 in the records).
        epsilon: added to the eigenvalues before the square root.
        **kwargs: Passed to `keras.layers.Layer`.
    """

    def __init__(self, kernel_size: int = 2, epsilon: float = 5e-4, **kwargs):
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be an int >= 1, got {kernel_size!r}")
        super().__init__(**kwargs)
        self.kernel_size = kernel_size
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        k, channels = self.kernel_size, input_shape[-1]
        self.filters = 2 * k * k * channels
        self.kernel = self.add_weight(
            name="kernel",
            shape=(k, k, channels, self.filters),
            initializer="he_uniform",  # until adapt() sets it from data
            trainable=False,
        )
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, inputs):
        return ops.conv(inputs, self.kernel, padding="valid") + self.bias

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        k = self.kernel_size
        return (n, None if h is None else h - k + 1, None if w is None else w - k + 1, self.filters)

    def adapt(self, images) -> None:
        """Sets the filters from ``[N, H, W, C]`` images, preprocessed as this layer's inputs."""
        import numpy as np

        images = np.asarray(images, dtype="float32")
        if not self.built:
            self.build(images.shape)
        k = self.kernel_size
        covariance = np.zeros((k * k * images.shape[-1],) * 2)
        count = 0
        for start in range(0, len(images), 500):  # bounded memory: ~60 MB of patches a chunk
            windows = np.lib.stride_tricks.sliding_window_view(
                images[start : start + 500], (k, k), axis=(1, 2)
            )  # [n, H-k+1, W-k+1, C, k, k]
            patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, covariance.shape[0])
            covariance += patches.T.astype("float64") @ patches.astype("float64")
            count += len(patches)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance / max(count, 1))
        order = np.argsort(eigenvalues)[::-1]
        scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + self.epsilon)
        filters = np.concatenate([scaled, -scaled], axis=1)  # [k*k*C, 2*k*k*C]
        self.kernel.assign(filters.reshape(self.kernel.shape).astype("float32"))

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="pipeline")
class AlternatingFlip(keras.layers.Layer):
    """Mirrors the whole training batch on odd epochs; the identity at inference.

    With each image flipped once at random in the input pipeline (a fixed coin
    per image), this gives the records' "alternating flip" (Jordan 2024): every
    image is seen mirrored on every other epoch instead of on a fresh coin
    each epoch. The epoch's parity lives in a non-trainable variable that
    :class:`pipeline.training.callbacks.AlternatingFlipEpochs` sets when an epoch begins,
    so it is read at the training step itself, whatever the input pipeline
    prefetched. The variable is training state, not a weight: it is not
    written to weight files, so a model rebuilt without this layer (for
    evaluation) loads them.
    """

    def build(self, input_shape):
        self.mirror = self.add_weight(
            name="mirror", shape=(), initializer="zeros", trainable=False, dtype="float32"
        )

    def call(self, inputs, training=None):
        if not training:
            return inputs
        mirrored = ops.flip(inputs, axis=2)
        return ops.where(ops.cast(self.mirror, "bool"), mirrored, inputs)

    def save_own_variables(self, store):
        pass

    def load_own_variables(self, store):
        pass

    def compute_output_shape(self, input_shape):
        return input_shape


class TestTimeAugmentation(keras.layers.Layer):
    """Wraps a logits model: the weighted mean of its logits over the TTA views.

    Args:
        model: a Keras model taking ``[N, H, W, C]`` images to logits (height
            and width known).
        views: ``views(images) -> [(weight, view), ...]``, weights adding to 1
            (``pipeline.evaluation.tta.with_tta`` passes its mode's).
        **kwargs: Passed to `keras.layers.Layer`.
    """

    def __init__(self, model: keras.Model, views, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.views = views

    def call(self, images):
        logits = None
        for weight, view in self.views(images):
            term = ops.cast(self.model(view, training=False), "float32") * weight
            logits = term if logits is None else logits + term
        return logits

    def compute_output_shape(self, input_shape):
        return self.model.compute_output_shape(input_shape)
