"""Exporting a trained run (the command is ``python -m pipeline.export``).

Each format goes to ``<run_dir>/export/`` with the class names beside or inside it:

- ``saved_model/``: a TensorFlow SavedModel whose ``serving_default`` signature
  takes uint8 images ``[N, H, W, 3]`` of any height and width, resizes them
  inside the way training did (``data.resize``; digits: antialiased stretch),
  and returns ``{"probabilities": [N, C] float32, "classes": [C] string}``. The
  module also holds ``class_names``, ``image_size``, ``resize`` and ``tta`` as
  variables and ``assets/class_names.txt``. ``tf.saved_model.load`` alone loads it.
- ``model.keras`` + ``class_names.json``: the Keras model (float32 pixels
  ``[N, S, S, 3]`` on 0..255 -> logits); loading it needs ``import pipeline.models``.
- ``model.tflite`` + ``class_names.json``: LiteRT through Keras's own
  ``model.export(format="litert")``; float32 pixels ``[N, S, S, 3]`` ->
  probabilities. Checking it needs the ``ai-edge-litert`` package.
- ``model.onnx`` + ``class_names.json``: ONNX through Keras's own
  ``model.export(format="onnx")`` (tf2onnx); float32 pixels ``[N, S, S, 3]`` on
  0..255 (input ``pixels``) -> probabilities; checked with onnxruntime. Both come
  with ``pip install "pipeline-cnn-trainer[onnx]"``.

With ``tta=flip|flip_translate`` the SavedModel, LiteRT and ONNX exports hold the
test-time augmentation (``pipeline.evaluation.tta``): they return the softmax of the
logits averaged over the views. A ``.keras`` file holds the plain model only
(``python -m pipeline.predict MODEL.keras --tta ...`` adds TTA when predicting),
so ``format=keras`` with a TTA mode is refused.

The model is rebuilt in float32 (a mixed-precision run's weights are float32).
After each export a parity check runs the exported model on a fixed batch and
compares its probabilities with the in-memory model's (wrapped in the same
TTA); the largest absolute difference goes to ``export/parity.json`` and must
be at most ``1e-4``. Each export and each check prints one line with its
seconds on standard error.

The checkpoint is checked against the SHA-256 in the run's manifest before it
is loaded, and each exported artifact's SHA-256 is recorded there in turn (when
the export goes inside the run directory), so predict can check it
(``pipeline.runs.hashes``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline import progress
from pipeline.errors import PipelineError
from pipeline.runs import hashes

log = logging.getLogger("pipeline.export")

FORMATS = ("saved_model", "keras", "tflite", "onnx")
TTA_FORMATS = ("saved_model", "tflite", "onnx")  # a .keras file cannot hold the TTA wrapper layer
PARITY_TOLERANCE = 1e-4  # max abs difference of probabilities, both in float32
PARITY_BATCH = 8  # images in the parity batch
PARITY_EXTRA_PIXELS = (9, 5)  # the batch is larger than the model's input, so resizing runs
LITERT_PACKAGE = "ai-edge-litert"
ONNX_PACKAGES = ("tf2onnx", "onnxruntime")  # writing (through Keras), and running the export
ONNX_INSTALL = 'pip install "pipeline-cnn-trainer[onnx]" (in a checkout: pip install -e ".[onnx]")'
ONNX_INPUT = "pixels"  # the ONNX graph's input name


def export_run(
    run_dir,
    *,
    formats: Sequence[str] = ("saved_model",),
    checkpoint: str = "final",
    out_dir=None,
    tta: str = "none",
) -> dict:
    """Exports a training run's model and checks each export against it.

    Args:
        run_dir: a directory written by ``pipeline.train``.
        formats: any of ``saved_model``, ``keras``, ``tflite``, ``onnx``.
        checkpoint: ``final`` (``model.keras``), ``best`` or ``last``.
        out_dir: where to write; defaults to ``<run_dir>/export``.
        tta: test-time augmentation baked into the exports: ``none``,
            ``flip`` or ``flip_translate`` (``saved_model``, ``tflite``, ``onnx``).

    Returns:
        The parity report (also in ``<out_dir>/parity.json``).

    Raises:
        PipelineError: an unknown format or TTA mode, a TTA mode with
            ``keras``, a missing run or checkpoint, a missing package, or an
            export that disagrees with the model.
    """
    from pipeline.runs.reader import load_run

    formats = check_formats(formats, tta=tta)
    run = load_run(run_dir)
    run.weights_path(checkpoint)  # a missing checkpoint fails before the slow part
    model = run.build_model(checkpoint)
    out = Path(out_dir) if out_dir else run.path / "export"
    report = export_model(
        model,
        out,
        formats=formats,
        class_names=run.class_names,
        image_size=run.image_size,
        resize=run.resize,
        tta=tta,
        provenance={"run_dir": str(run.path), "checkpoint": checkpoint},
    )
    _record_exports(run.path, out, report)
    return report


def _record_exports(run_dir: Path, out: Path, report: dict) -> None:
    """Records the exported files' SHA-256 in the run's manifest, when they lie inside the run."""
    if not out.resolve().is_relative_to(run_dir.resolve()):
        log.warning("%s is outside %s: its SHA-256 is not recorded in the manifest", out, run_dir)
        return
    paths = [out / r["path"] for r in report["formats"].values()]
    names = out / "class_names.json"
    hashes.record_artifacts(run_dir, paths + ([names] if names.is_file() else []))


def export_model(
    model,
    out_dir,
    *,
    formats: Sequence[str],
    class_names: list[str],
    image_size: int,
    resize: str,
    tta: str = "none",
    provenance: dict | None = None,
) -> dict:
    """Exports a float32 model in each format, checks each, and writes ``parity.json``.

    Args:
        model: a Keras model taking 0..255 float pixels ``[N, S, S, 3]`` and
            returning logits, built under the float32 policy.
        out_dir: the export directory.
        formats: any of ``FORMATS``.
        class_names: the model's classes, in output order.
        image_size: ``S``.
        resize: ``crop``, ``pad`` or ``stretch``: how the SavedModel brings
            other sizes to ``S``.
        tta: ``none``, ``flip`` or ``flip_translate``: the exports (and the
            model they are checked against) average the logits over its views.
        provenance: recorded in the report as is (where the model came from).

    Returns:
        ``{"tta", "tolerance", "batch_shape", "formats": {format: {"path",
        "max_abs_diff", "tta"}}, ...}``.

    Raises:
        PipelineError: a bad format or TTA mode, or a format's parity check
            failed (``parity.json`` is written first).
    """
    from pipeline.evaluation.tta import with_tta

    formats = check_formats(formats, tta=tta)
    model = with_tta(model, tta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch = _parity_batch(model, image_size, resize)
    report = {**(provenance or {}), "tta": tta, "tolerance": PARITY_TOLERANCE}
    report.update(batch_shape=list(batch.raw.shape), formats={})
    info = {"class_names": list(class_names), "image_size": int(image_size), "resize": resize}
    for fmt in formats:
        with progress.timed(fmt, done="exported"):
            path = _write_format(fmt, model, out, info, tta, batch)
        with progress.timed(fmt, done="parity checked"):
            got = _run_format(fmt, path, batch, info["class_names"])
        diff = float(np.max(np.abs(got - batch.expected)))
        # per format too: parity.json keeps earlier exports' entries, perhaps of another tta
        report["formats"][fmt] = {"path": path.name, "max_abs_diff": diff, "tta": tta}
        log.info("Exported %s to %s: max abs difference %.3g", fmt, path, diff)
    _write_parity(out, report)
    _check_parity(out, report)
    return report


def _write_format(fmt: str, model, out: Path, info: dict, tta: str, batch: ParityBatch) -> Path:
    """Writes one format into ``out``, ``class_names.json`` beside a file; returns its path."""
    if fmt == "saved_model":
        path = out / "saved_model"
        export_saved_model(model, path, **info, tta=tta)
        return path
    if fmt == "keras":
        path = out / "model.keras"
        model.save(path)
    elif fmt == "tflite":
        path = out / "model.tflite"
        _export_tflite(model, path)
    else:
        path = out / "model.onnx"
        _export_onnx(model, path, batch.resized)
    (out / "class_names.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def _run_format(fmt: str, path: Path, batch: ParityBatch, class_names: list[str]) -> np.ndarray:
    """The written model's probabilities on the parity batch."""
    if fmt == "saved_model":
        return _run_saved_model(path, batch.raw, class_names)
    if fmt == "keras":
        return _run_keras(path, batch.resized)
    if fmt == "tflite":
        return _run_tflite(path, batch.resized)
    # on the CPU: a GPU provider may compute in TF32, which is not what is being checked
    return OnnxModel(path, providers=["CPUExecutionProvider"])(batch.resized)


def _check_parity(out: Path, report: dict) -> None:
    """Raises unless every format's probabilities are within ``PARITY_TOLERANCE``."""
    bad = {f: r["max_abs_diff"] for f, r in report["formats"].items()}
    bad = {f: d for f, d in bad.items() if not d <= PARITY_TOLERANCE}
    if bad:
        raise PipelineError(
            f"exported model disagrees with the in-memory one: max abs difference of "
            f"probabilities {bad} > {PARITY_TOLERANCE} (see {out / 'parity.json'})."
        )


def export_saved_model(
    model, path, *, class_names: list[str], image_size: int, resize: str, tta: str = "none"
) -> None:
    """Writes a SavedModel serving uint8 images of any size; see the module docstring.

    ``tta`` is only recorded (the ``tta`` variable): ``model`` is served as
    given, so pass it already wrapped by ``pipeline.evaluation.tta.with_tta``.
    """
    import tensorflow as tf

    from pipeline.data.sources import RESIZE_MODES, resize_image

    if resize not in RESIZE_MODES:
        raise PipelineError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    size = int(image_size)

    class Serving(tf.Module):
        def __init__(self):
            super().__init__(name="pipeline_classifier")
            self.model = model
            self.class_names = tf.Variable(list(class_names), trainable=False, name="class_names")
            self.image_size = tf.Variable(size, trainable=False, name="image_size")
            self.resize = tf.Variable(resize, trainable=False, name="resize")
            self.tta = tf.Variable(tta, trainable=False, name="tta")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, "images")])
        def serve(self, images):
            resized = tf.map_fn(
                lambda image: resize_image(image, size, resize),
                images,
                fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8),
            )
            logits = self.model(tf.cast(resized, tf.float32), training=False)
            probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
            return {"probabilities": probabilities, "classes": tf.identity(self.class_names)}

    module = Serving()
    with tempfile.TemporaryDirectory() as tmp:
        names_file = Path(tmp) / "class_names.txt"
        names_file.write_text("".join(f"{n}\n" for n in class_names))
        module.class_names_file = tf.saved_model.Asset(str(names_file))
        tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def _export_tflite(model, path: Path) -> None:
    """LiteRT through Keras: pixels in, probabilities out."""
    import keras

    with_softmax = keras.Model(
        model.inputs, keras.layers.Softmax(dtype="float32", name="probabilities")(model.outputs[0])
    )
    path.unlink(missing_ok=True)
    with_softmax.export(str(path), format="litert", verbose=False)


def _export_onnx(model, path: Path, resized: np.ndarray) -> None:
    """ONNX through Keras (tf2onnx): pixels in, probabilities out.

    Keras exports only a model that has been called, so the softmax-topped
    model is called on the parity images first.
    """
    import warnings

    import keras
    import tensorflow as tf

    require_onnx()
    softmax = keras.layers.Softmax(dtype="float32", name="probabilities")
    with_softmax = keras.Model(model.inputs[0], softmax(model.outputs[0]))  # one input, as called
    with_softmax(resized[:1], training=False)
    spec = tf.TensorSpec([None, *resized.shape[1:]], tf.float32, name=ONNX_INPUT)
    path.unlink(missing_ok=True)
    converter_log = logging.getLogger("tf2onnx")
    level = converter_log.level
    converter_log.setLevel(logging.WARNING)  # its INFO notes (opset, optimizer passes) are noise
    try:
        with _normalization_as_variables(with_softmax), warnings.catch_warnings():
            # Keras's NumPy 2 patch of tf2onnx looks up np.object, which warns
            warnings.filterwarnings("ignore", "In the future `np.object`", FutureWarning)
            with_softmax.export(str(path), format="onnx", verbose=False, input_signature=[spec])
    except ImportError as err:  # installed but broken (find_spec found it)
        raise PipelineError(f"format=onnx: {err}; reinstall: {ONNX_INSTALL}") from err
    finally:
        converter_log.setLevel(level)


@contextlib.contextmanager
def _normalization_as_variables(model):
    """Holds the mean and variance of ``model``'s Normalization layers in variables meanwhile.

    The layer keeps them as constant tensors, which the traced function captures as
    extra inputs; tf2onnx 1.17 turns those into inputs of the ONNX graph without
    their values, and onnxruntime then asks for them. Variables are frozen into the
    graph like every weight. The tensors are put back afterwards.
    """
    import keras
    import tensorflow as tf

    held = [
        (layer, layer.mean, layer.variance)
        for layer in model._flatten_layers(include_self=False)  # nested models, TTA's too
        if isinstance(layer, keras.layers.Normalization) and layer.mean is not None
    ]
    try:
        for layer, mean, variance in held:
            layer.mean = tf.Variable(mean, trainable=False, name="mean")
            layer.variance = tf.Variable(variance, trainable=False, name="variance")
        yield
    finally:
        for layer, mean, variance in held:
            layer.mean, layer.variance = mean, variance


def require_onnx(what: str = "format=onnx", packages: Sequence[str] = ONNX_PACKAGES) -> None:
    """Checks that ``packages`` (tf2onnx, onnxruntime) can be imported, importing none of them.

    Args:
        what: what needs them, for the message (``format=onnx``, the MODEL file).
        packages: the packages to look for.

    Raises:
        PipelineError: naming the missing ones and the extra that installs them.
    """
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise PipelineError(f"{what} needs {' and '.join(missing)}, not installed: {ONNX_INSTALL}")


class OnnxModel:
    """An ONNX file run by onnxruntime: ``model(pixels) -> probabilities``.

    Args:
        path: the ``.onnx`` file.
        providers: onnxruntime's execution providers; None: every one available.

    Attributes:
        input_shape: the input's ``(N, H, W, C)``, None where the size is free.
        output_shape: the first output's shape, likewise.

    Raises:
        PipelineError: onnxruntime is missing, or the file is not a model it can run.
    """

    def __init__(self, path, *, providers: Sequence[str] | None = None):
        require_onnx(str(path), ["onnxruntime"])
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its graph-optimizer notes are not the user's
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=list(providers or ort.get_available_providers())
            )
        except Exception as err:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PipelineError(
                f"{path} cannot be loaded as an ONNX model ({first[:300]}); export it again with "
                "python -m pipeline.export run_dir=RUN format=onnx"
            ) from err
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise PipelineError(
                f"{path} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); a "
                f"pipeline export takes one ({ONNX_INPUT}). Export it with python -m "
                "pipeline.export run_dir=RUN format=onnx"
            )
        self._input, self._output = inputs[0], self.session.get_outputs()[0]
        self.input_shape = tuple(d if isinstance(d, int) else None for d in self._input.shape)
        self.output_shape = tuple(d if isinstance(d, int) else None for d in self._output.shape)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        feed = {self._input.name: np.ascontiguousarray(pixels, np.float32)}
        return self.session.run([self._output.name], feed)[0]


def require_litert():
    """Returns LiteRT's ``Interpreter`` class.

    Raises:
        PipelineError: ``ai-edge-litert`` is not installed.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as err:
        raise PipelineError(
            f"format=tflite needs the {LITERT_PACKAGE} package to run the exported model for its "
            f"parity check (tf.lite's interpreter is deprecated): pip install {LITERT_PACKAGE}"
        ) from err
    return Interpreter


def check_formats(formats, *, tta: str = "none") -> list[str]:
    """Checks export formats, the TTA mode (and LiteRT for tflite) before anything runs.

    Args:
        formats: a format or a list of them.
        tta: the test-time augmentation to bake into every format.

    Returns:
        The formats, as a list.

    Raises:
        PipelineError: an unknown format or TTA mode, a TTA mode with a format
            that cannot hold it, LiteRT missing for ``tflite``, or tf2onnx or
            onnxruntime missing for ``onnx``.
    """
    from pipeline.evaluation.tta import check_mode

    if isinstance(formats, str):
        formats = [formats]
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise PipelineError(
            f"format must be one or more of {', '.join(FORMATS)}; got {formats or 'nothing'}"
        )
    plain_only = [f for f in formats if f not in TTA_FORMATS]
    if check_mode(tta, "tta") != "none" and plain_only:
        raise PipelineError(
            f"tta={tta} can be baked into {', '.join(TTA_FORMATS)} only, not {plain_only}: "
            "a .keras file holds the plain model. Export keras with tta=none and predict with "
            f"python -m pipeline.predict MODEL.keras --tta {tta}, or drop it from the formats."
        )
    if "tflite" in formats:
        require_litert()  # before anything is written
    if "onnx" in formats:
        require_onnx()
    return formats


class ParityBatch(NamedTuple):
    """The batch every export is checked on.

    Attributes:
        raw: uint8 ``[N, S + 9, S + 5, 3]`` random pixels (the SavedModel resizes them).
        resized: float32 ``[N, S, S, 3]``: ``raw`` resized as training did.
        expected: float32 ``[N, C]``: the in-memory model's probabilities on ``resized``.
    """

    raw: np.ndarray
    resized: np.ndarray
    expected: np.ndarray


def _parity_batch(model, image_size: int, resize: str) -> ParityBatch:
    """A fixed uint8 batch, its resized float32 copy, and the model's probabilities."""
    import keras

    from pipeline.data.sources import resize_image

    height, width = (image_size + extra for extra in PARITY_EXTRA_PIXELS)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (PARITY_BATCH, height, width, 3), dtype=np.uint8)
    resized = np.stack([resize_image(image, image_size, resize).numpy() for image in raw])
    resized = resized.astype(np.float32)
    logits = keras.ops.convert_to_numpy(model(resized, training=False))
    return ParityBatch(raw, resized, _softmax(logits))


def _softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float32)
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


def _run_saved_model(path: Path, raw: np.ndarray, class_names: list[str]) -> np.ndarray:
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    outputs = serve(images=tf.constant(raw))
    classes = [c.decode() for c in outputs["classes"].numpy()]
    if classes != list(class_names):
        raise PipelineError(f"{path} returns classes {classes}, expected {list(class_names)}")
    return outputs["probabilities"].numpy()


def _run_keras(path: Path, resized: np.ndarray) -> np.ndarray:
    import keras

    from pipeline import security

    loaded = security.safe_load_keras(path)
    return _softmax(keras.ops.convert_to_numpy(loaded(resized, training=False)))


def _run_tflite(path: Path, resized: np.ndarray) -> np.ndarray:
    interpreter = require_litert()(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(resized.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], resized)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _write_parity(out: Path, report: dict) -> None:
    from pipeline.runs import manifest

    path = out / "parity.json"
    earlier = json.loads(path.read_text()).get("formats", {}) if path.exists() else {}
    manifest.write_json(path, {**report, "formats": {**earlier, **report["formats"]}})
