"""Classify images: ``python -m pipeline.predict MODEL IMAGE_OR_FOLDER... [--top-k 5]``.

MODEL is one of:

- a training run's directory: its ``model.keras``, with the class names, image
  size and resize mode the run recorded;
- a ``.keras`` file: class names, image size and resize mode from the
  ``class_names.json`` that ``pipeline.export`` writes beside it; without one,
  classes are numbered and images are center-cropped (``crop``);
- an exported SavedModel directory (``python -m pipeline.export``);
- an exported ``.onnx`` file (``python -m pipeline.export ... format=onnx``), run
  by onnxruntime, with the ``class_names.json`` written beside it (required: it
  holds the classes and the resize mode).

Folders are searched recursively for images (jpg, jpeg, png, bmp, gif). Every
file is read with Pillow (converted to RGB, the first frame of a GIF), resized
to the model's input as in training, and classified in batches. A file that
cannot be read gets a row with its error and the rest go on. The exit code is 0
when at least one image was classified, 1 when none was, 2 for a bad MODEL or
``--output`` (checked before any image is read; written to a temporary file, then
renamed, so a failed write leaves the file as it was).

``--tta flip|flip_translate`` averages the model's logits over mirrored (and
one-pixel shifted) views of each image before the softmax (``pipeline.evaluation.tta``),
for a run directory or a ``.keras`` file. A SavedModel or ONNX file serves the
test-time augmentation it was exported with (``python -m pipeline.export ...
tta=flip``); ``--tta`` cannot add one to it and is refused.

Results go to standard output (or ``--output``); the progress (images done,
images/s, time left) goes to standard error.

Before decoding, each file's header is read: files that are not images, and
images of more than ``--max-pixels`` pixels (default: the run's
``data.max_pixels``, else Pillow's limit), are refused undecoded. A model file
belonging to a run is checked against the SHA-256 in the run's manifest and
refused if it changed; ``.keras`` models are loaded in Keras's safe mode and
refused if they hold a ``Lambda`` layer; legacy ``.h5`` models only load with
``--allow-unsafe-h5``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import progress, security
from pipeline.errors import PipelineError
from pipeline.runs import hashes
from pipeline.terminal import quiet_tensorflow

BATCH_SIZE = 64  # images per model call
OUTPUT_FORMATS = ("table", "json", "csv")
DEFAULT_RESIZE = "crop"  # for a .keras file without class_names.json: data.resize's default
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own limit, and data.max_pixels's default


@dataclass
class Predictor:
    """A model ready to classify uint8 images.

    Attributes:
        class_names: the model's classes, in output order.
        image_size: height and width the model takes.
        resize: how images of other sizes are brought to ``image_size``.
        probabilities: uint8 ``[N, S, S, 3]`` -> float ``[N, C]``.
        max_pixels: larger images are refused from their header (the run's
            ``data.max_pixels`` when the model belongs to a run).
    """

    class_names: list[str]
    image_size: int
    resize: str
    probabilities: Callable[[np.ndarray], np.ndarray]
    max_pixels: int = DEFAULT_MAX_PIXELS


def load_predictor(model_path, *, allow_unsafe_h5: bool = False, tta: str = "none") -> Predictor:
    """Loads MODEL: a run directory, a ``.keras`` file, a SavedModel directory or a ``.onnx`` file.

    A model inside a training run (the run itself, or its ``export/``) is
    checked against the SHA-256 in the run's manifest first.

    Args:
        model_path: MODEL (see the module docstring).
        allow_unsafe_h5: also load a legacy full-model ``.h5``/``.hdf5`` file,
            which can run code when loaded.
        tta: test-time augmentation wrapped around a Keras model: ``none``,
            ``flip`` or ``flip_translate``; only ``none`` for a SavedModel or ONNX file.

    Raises:
        PipelineError: the path is none of these, the model changed since it
            was saved, holds code (a Lambda layer, an unallowed .h5), or cannot
            be loaded; a bad ``tta``, or one asked of a SavedModel or ONNX file;
            an ONNX file without its ``class_names.json`` or onnxruntime.
    """
    from pipeline.evaluation.tta import check_mode

    check_mode(tta, "--tta")
    path = Path(model_path).expanduser()
    if path.is_dir() and (path / hashes.MANIFEST).is_file():
        return _run_predictor(path, tta)
    run_dir = hashes.find_run_dir(path.parent)
    max_pixels = _run_max_pixels(run_dir) if run_dir else DEFAULT_MAX_PIXELS
    if path.is_dir() and (path / "saved_model.pb").is_file():
        _refuse_tta(path, "the SavedModel", tta)
        if run_dir:
            hashes.verify_artifact(run_dir, path)
        return _saved_model_predictor(path, max_pixels)
    if path.is_file() and path.suffix.lower() == ".onnx":
        _refuse_tta(path, "the ONNX model", tta)
        if run_dir:
            hashes.verify_artifact(run_dir, path)
        return _onnx_predictor(path, max_pixels)
    if path.is_file() and path.suffix.lower() in (".keras", *security.LEGACY_MODEL_SUFFIXES):
        if run_dir:
            hashes.verify_artifact(run_dir, path)
        info = _read_class_names(path.parent / "class_names.json")
        model = security.safe_load_keras(path, allow_unsafe=allow_unsafe_h5)
        resize = info.get("resize", DEFAULT_RESIZE)
        return _keras_predictor(model, path, info.get("class_names"), resize, max_pixels, tta)
    raise PipelineError(
        f"MODEL={str(model_path)!r} is not a training run directory (with manifest.json), a "
        ".keras file, a SavedModel directory (with saved_model.pb) or a .onnx file."
    )


def _refuse_tta(path: Path, what: str, tta: str) -> None:
    """An exported model serves the TTA it was exported with: ``--tta`` cannot add one."""
    if tta != "none":
        raise PipelineError(
            f"--tta {tta} cannot be added to {what} {path}: it serves what was "
            f"exported. Export it with TTA instead (python -m pipeline.export run_dir=RUN "
            f"tta={tta}, or export.tta={tta} when training), or pass the run directory or "
            "a .keras file with --tta."
        )


def _read_class_names(info_file: Path) -> dict:
    """``class_names.json`` beside a ``.keras`` file: ``{"class_names", "resize"}`` ({} if none).

    Raises:
        PipelineError: the file is not JSON, or not a list of names / such a dict.
    """
    from pipeline.data.sources import RESIZE_MODES

    if not info_file.is_file():
        return {}
    try:
        info = json.loads(info_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PipelineError(
            f"{info_file} cannot be read as JSON ({err}); fix or remove it"
        ) from err
    if isinstance(info, list):
        info = {"class_names": info}
    names = info.get("class_names") if isinstance(info, dict) else None
    resize = info.get("resize", DEFAULT_RESIZE) if isinstance(info, dict) else None
    bad_names = names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    )
    if bad_names or resize not in RESIZE_MODES:
        raise PipelineError(
            f'{info_file} must hold a list of class names, or {{"class_names": [...], '
            f'"resize": {"|".join(RESIZE_MODES)}}}; got {str(info)[:200]}'
        )
    return info


def _run_max_pixels(run_dir: Path) -> int:
    """The run's ``data.max_pixels`` (folder runs), else ``DEFAULT_MAX_PIXELS``."""
    from omegaconf import OmegaConf

    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return DEFAULT_MAX_PIXELS
    value = OmegaConf.select(OmegaConf.load(config_file), "data.max_pixels", default=None)
    return int(value) if value else DEFAULT_MAX_PIXELS


def _run_predictor(path: Path, tta: str) -> Predictor:
    from pipeline.runs.reader import load_run

    run = load_run(path)
    model_file = path / "model.keras"
    if not model_file.is_file():
        raise PipelineError(f"{path} has no model.keras: did training finish?")
    hashes.verify_artifact(path, model_file)
    model = security.safe_load_keras(model_file)
    max_pixels = _run_max_pixels(path)
    return _keras_predictor(model, model_file, run.class_names, run.resize, max_pixels, tta)


def _keras_predictor(
    model, path: Path, class_names: list[str] | None, resize: str, max_pixels: int, tta: str
) -> Predictor:
    import keras

    from pipeline.evaluation.tta import with_tta

    _, height, width, _ = model.input_shape
    num_classes = model.output_shape[-1]
    if not height or height != width:
        raise PipelineError(
            f"{path} takes images of shape {model.input_shape}; square images of a fixed size "
            "are needed."
        )
    class_names = class_names or [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise PipelineError(
            f"{path} has {num_classes} outputs but {len(class_names)} class names "
            f"({class_names}): the class_names.json beside it belongs to another model."
        )
    model = with_tta(model, tta)

    def probabilities(images: np.ndarray) -> np.ndarray:
        logits = model(images.astype(np.float32), training=False)
        return keras.ops.convert_to_numpy(keras.ops.softmax(keras.ops.cast(logits, "float32")))

    return Predictor(list(class_names), int(height), resize, probabilities, max_pixels)


def _saved_model_predictor(path: Path, max_pixels: int) -> Predictor:
    import tensorflow as tf

    if not (path / "variables").is_dir():
        raise PipelineError(
            f"{path} is a SavedModel without its variables/ folder (an incomplete copy?); "
            "copy the whole export folder, or export again with python -m pipeline.export"
        )
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"{path} cannot be loaded as a SavedModel ({first[:300]})") from err
    try:
        serve = loaded.signatures["serving_default"]
        class_names = [c.decode() for c in loaded.class_names.numpy()]
        image_size = int(loaded.image_size.numpy())
        resize = loaded.resize.numpy().decode()
    except (AttributeError, KeyError) as err:
        raise PipelineError(
            f"{path} is a SavedModel without pipeline's serving signature and class names "
            f"({err}); export one with python -m pipeline.export."
        ) from err

    def probabilities(images: np.ndarray) -> np.ndarray:
        return serve(images=tf.constant(images, tf.uint8))["probabilities"].numpy()

    return Predictor(class_names, image_size, resize, probabilities, max_pixels)


def _onnx_predictor(path: Path, max_pixels: int) -> Predictor:
    """An exported ``.onnx`` file: float32 pixels at its size in, probabilities out.

    Raises:
        PipelineError: no ``class_names.json`` beside it, or one that does not
            match it; onnxruntime missing; a file onnxruntime cannot load.
    """
    from pipeline.exporting import OnnxModel

    info_file = path.parent / "class_names.json"
    if not info_file.is_file():
        raise PipelineError(
            f"{info_file} is missing: an ONNX MODEL needs the class_names.json that "
            "python -m pipeline.export writes beside it; copy it along with the .onnx file"
        )
    info = _read_class_names(info_file)
    model = OnnxModel(path)
    _, height, width, _ = model.input_shape
    names = info.get("class_names") or []
    size = info.get("image_size", height)
    if not height or not height == width == size or model.output_shape[-1] != len(names):
        raise PipelineError(
            f"{path} takes pixels {list(model.input_shape)} and gives {model.output_shape[-1]} "
            f"probabilities, but {info_file} lists {len(names)} classes at {size} px: it "
            "belongs to another model, or the file is not a pipeline export (python -m "
            "pipeline.export run_dir=RUN format=onnx)."
        )

    def probabilities(images: np.ndarray) -> np.ndarray:
        return model(images.astype(np.float32))

    resize = info.get("resize", DEFAULT_RESIZE)
    return Predictor(list(names), int(height), resize, probabilities, max_pixels)


def list_inputs(inputs: list[str]) -> list[tuple[str, str | None]]:
    """Expands folders into their image files, in order.

    Returns:
        ``(path, error)`` pairs: ``error`` is None for a file to read, or why
        the input gives no image (missing path, folder without images).
    """
    from pipeline.data.sources import IMAGE_EXTENSIONS

    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not p.name.startswith(".")
            )
            if not files:
                found.append((item, f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder"))
            found.extend((str(f), None) for f in files)
        elif path.is_file():
            found.append((item, None))
        else:
            found.append((item, "no such file or folder"))
    return found


def check_header(path: str, max_pixels: int) -> str | None:
    """Reads only a file's header: why it must not be decoded, or None when it may.

    Args:
        path: the file.
        max_pixels: width x height above which the image is refused.

    Returns:
        None for an image of at most ``max_pixels`` pixels; else a message
        naming the file and what to do.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(path) as image:  # lazy: reads the header, decodes nothing
                width, height = image.size
    except UnidentifiedImageError:
        return (
            f"cannot read image: {name} is not an image (no image format recognised in its "
            "bytes); pass image files only"
        )
    except Image.DecompressionBombError as err:
        return f"refused: {name} is too large, not decoded ({err})"
    except Exception as err:  # Pillow raises many types for broken headers
        return f"cannot read image: {name}: {type(err).__name__}: {err}"
    if width * height > max_pixels:
        return (
            f"refused: {name} is {width}x{height} = {width * height} pixels > --max-pixels="
            f"{max_pixels}, not decoded; shrink the image or pass a larger --max-pixels"
        )
    return None


def read_image(path: str, *, size: int | None = None) -> np.ndarray:
    """Reads an image file as uint8 RGB ``[H, W, 3]``, decoded as training decodes it.

    A GIF gives its first frame; EXIF orientation is applied; 16-bit and CMYK
    images become 8-bit RGB.

    Args:
        path: the file.
        size: the model's input side: a large image is reduced while decoding
            (JPEG) or right after, to no less than twice it, as in training;
            None: full size.
    """
    from pipeline.data.quarantine import decode_with_pil

    return decode_with_pil(path, size)


def predict(
    model_path,
    inputs: list[str],
    *,
    top_k: int = 5,
    batch_size: int = BATCH_SIZE,
    max_pixels: int | None = None,
    allow_unsafe_h5: bool = False,
    tta: str = "none",
):
    """Classifies every image in ``inputs``; the progress goes to standard error.

    Args:
        model_path: MODEL (see the module docstring).
        inputs: image files and folders.
        top_k: classes reported per image (at most the number of classes).
        batch_size: images per model call.
        max_pixels: larger images are refused from their header, undecoded;
            None: the run's ``data.max_pixels``, else ``DEFAULT_MAX_PIXELS``.
        allow_unsafe_h5: also load a legacy full-model ``.h5`` MODEL.
        tta: ``none``, ``flip`` or ``flip_translate``: probabilities from the
            logits averaged over those views (run directory or ``.keras`` MODEL).

    Returns:
        One dict per file, in order: ``{"file", "predictions": [{"class",
        "probability"}, ...], "error"}``; ``error`` is None, or why the file
        could not be classified (then ``predictions`` is empty).

    Raises:
        PipelineError: MODEL cannot be loaded or is refused, or a bad
            ``top_k``/``batch_size``/``max_pixels``/``tta``.
    """
    if top_k < 1 or batch_size < 1:
        raise PipelineError(f"--top-k and --batch-size must be >= 1, got {top_k} and {batch_size}")
    if max_pixels is not None and max_pixels < 1:
        raise PipelineError(f"--max-pixels must be >= 1, got {max_pixels}")
    predictor = load_predictor(model_path, allow_unsafe_h5=allow_unsafe_h5, tta=tta)
    limit = max_pixels or predictor.max_pixels
    rows = [{"file": f, "predictions": [], "error": e} for f, e in list_inputs(inputs)]
    pending = [row for row in rows if row["error"] is None]
    with progress.Progress("classifying", len(pending)) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            _classify(predictor, batch, limit, top_k)
            bar.advance(len(batch))
    return rows


def _classify(predictor: Predictor, rows: list[dict], max_pixels: int, top_k: int) -> None:
    """Fills in each row's ``predictions``, or its ``error`` for a file that cannot be read."""
    from pipeline.data.sources import resize_image

    batch, images = [], []
    for row in rows:
        row["error"] = check_header(row["file"], max_pixels)
        if row["error"]:
            continue
        try:
            image = read_image(row["file"], size=predictor.image_size)
            images.append(resize_image(image, predictor.image_size, predictor.resize).numpy())
            batch.append(row)
        except Exception as err:  # Pillow raises many types for broken files
            row["error"] = f"cannot read image: {err}"
    if not batch:
        return
    k = min(top_k, len(predictor.class_names))
    probabilities = predictor.probabilities(np.stack(images))
    for row, probs in zip(batch, probabilities, strict=True):
        best = np.argsort(-probs, kind="stable")[:k]
        row["predictions"] = [
            {"class": predictor.class_names[i], "probability": float(probs[i])} for i in best
        ]


def format_rows(rows: list[dict], output_format: str) -> str:
    """Renders rows as an aligned table, JSON or CSV (one line per file)."""
    k = max((len(r["predictions"]) for r in rows), default=0)
    header = ["file"] + [f"{name}_{i + 1}" for i in range(k) for name in ("class", "probability")]
    if output_format == "json":
        return json.dumps(rows, indent=2) + "\n"
    table = []
    for row in rows:
        cells = [row["file"]]
        for p in row["predictions"]:
            cells += [p["class"], f"{p['probability']:.4f}"]
        table.append(cells)
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*header, "error"])
        for row, cells in zip(rows, table, strict=True):
            writer.writerow(cells + [""] * (len(header) - len(cells)) + [row["error"] or ""])
        return buffer.getvalue()
    header = ["file"] + [f"{name} {i + 1}" for i in range(k) for name in ("class", "prob")]
    widths = [max(len(c[j]) for c in [header, *table] if len(c) > j) for j in range(len(header))]
    lines = []
    for row, cells in zip([None, *rows], [header, *table], strict=True):
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))
        if row is not None and row["error"]:
            line = f"{cells[0].ljust(widths[0])}  error: {row['error']}"
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


def check_output(path: Path) -> None:
    """Refuses an ``--output`` that cannot be written: a folder, a missing or read-only parent.

    Raises:
        PipelineError: naming the path and what to do.
    """
    if path.is_dir():
        raise PipelineError(f"--output {path} is a folder; give a file name in it")
    parent = path.parent
    if not parent.is_dir():
        raise PipelineError(f"--output {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PipelineError(f"--output {path} cannot be written (permission denied)")


def write_output(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it: whole or not at all.

    Raises:
        PipelineError: the write failed (a full disk, ...); ``path`` is left as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PipelineError(
            f"--output {path} could not be written ({err.strerror or err}); nothing was "
            "written there: free space or pick another place, then run again"
        ) from err


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Classify images with a trained run, a .keras file, an exported SavedModel "
        "or an exported .onnx file.",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="run directory, .keras file, SavedModel or .onnx file"
    )
    parser.add_argument("inputs", metavar="IMAGE_OR_FOLDER", nargs="+", help="images or folders")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table", dest="output_format")
    parser.add_argument("--output", "-o", help="write to this file instead of standard output")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per model call")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse larger images from their header (default: the run's data.max_pixels, "
        f"else {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--allow-unsafe-h5",
        action="store_true",
        help="load a legacy full-model .h5 MODEL (it can run code: only files you trust)",
    )
    parser.add_argument(
        "--tta",
        default="none",
        metavar="MODE",
        # checked by predict(), which words the error as every other command does
        help="test-time augmentation for a run directory or .keras MODEL: none (default), flip "
        "(image and mirror) or flip_translate (also shifted one pixel); a SavedModel or .onnx "
        "file keeps the one it was exported with",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    quiet_tensorflow()
    try:
        if args.output:
            check_output(Path(args.output))  # before any image is classified
        rows = predict(
            args.model,
            args.inputs,
            top_k=args.top_k,
            batch_size=args.batch_size,
            max_pixels=args.max_pixels,
            allow_unsafe_h5=args.allow_unsafe_h5,
            tta=args.tta,
        )
        text = format_rows(rows, args.output_format)
        if args.output:
            write_output(Path(args.output), text)
        else:
            sys.stdout.write(text)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = sum(1 for r in rows if r["error"])
    if failed:
        print(f"{failed} of {len(rows)} inputs could not be classified", file=sys.stderr)
    return 0 if failed < len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
