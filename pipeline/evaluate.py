"""Evaluate a trained run: ``python -m pipeline.evaluate run_dir=... [checkpoint=last]``.

Rebuilds the run's test split (or reads another folder, ``data.test_path=...``),
runs the model from a checkpoint in float32 and writes ``<run_dir>/eval/``:

- ``report.json``: loss, top-1 and top-k accuracy (k = min(5, classes)),
  per-class precision, recall and F1, the confusion matrix, expected
  calibration error with its bins, and the most confidently wrong images;
  with ``eval.tta=flip|flip_translate`` all of them are computed on the
  test-time-augmented logits (``pipeline.tta``);
- ``confusion_matrix.png`` and ``mistakes.png``;

and logs the numbers and both images to ``<run_dir>/tensorboard/eval``.

``load_run`` is shared with ``pipeline.export`` and ``pipeline.predict``: it
reads what a run recorded and rebuilds its model without composing a config.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.adversarial import DEFAULT_EPS
from pipeline.errors import PipelineError, user_errors

log = logging.getLogger("pipeline.evaluate")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
CHECKPOINTS = {
    "best": "checkpoints/best.weights.h5",  # by trainer.checkpoint_monitor
    "last": "checkpoints/last.weights.h5",  # the last finished epoch
    "final": "model.keras",  # what training ended with (EMA weights swapped in)
}
TOP_K = 5
ECE_BINS = 15  # equal-width confidence bins
MISTAKES = 16  # images in the mistakes grid
MISTAKE_TILE = 96  # pixels a side of one image in the grid, at least
GRID_COLUMNS = 4
CM_MAX_SIDE = 800  # pixels: the confusion matrix's cells shrink to fit
BLUE = np.array([8, 48, 107], np.float64)  # the colour of a full row in the heat map


@dataclass
class Run:
    """What a training run recorded: its directory, composed config and manifest.

    Attributes:
        path: the run directory.
        config: ``.hydra/config.yaml``, as composed for training.
        manifest: ``manifest.json``.
    """

    path: Path
    config: DictConfig
    manifest: dict

    @property
    def class_names(self) -> list[str]:
        """The model's classes, in output order."""
        return list(self.manifest["data"]["class_names"])

    @property
    def image_size(self) -> int:
        """Height and width of the model's input, in pixels."""
        return int(self.manifest["data"]["image_shape"][0])

    @property
    def resize(self) -> str:
        """How images of another size are brought to ``image_size``.

        Folder and TFDS runs record ``data.resize``; digits are square and
        were stretched, which ``stretch`` (antialiased) matches for new images.
        """
        return str(self.config.data.get("resize", None) or "stretch")

    def _had_no_val_split(self) -> bool:
        return self.manifest.get("data", {}).get("counts", {}).get("val") == 0

    def weights_path(self, checkpoint: str) -> Path:
        """The file holding ``checkpoint`` (``best``, ``last`` or ``final``).

        Raises:
            PipelineError: an unknown name or a missing file.
        """
        if checkpoint not in CHECKPOINTS:
            raise PipelineError(
                f"checkpoint must be one of {', '.join(CHECKPOINTS)}; got {checkpoint!r}"
            )
        path = self.path / CHECKPOINTS[checkpoint]
        if checkpoint == "best" and not path.is_file() and self._had_no_val_split():
            log.info(
                "the run had no validation split, so no best checkpoint: using the final model"
            )
            path = self.path / CHECKPOINTS["final"]
        if not path.is_file():
            raise PipelineError(
                f"{path} does not exist: the run has no {checkpoint!r} checkpoint (did training "
                "finish an epoch?). Pick another with checkpoint=best|last|final."
            )
        return path

    def build_model(self, checkpoint: str = "best"):
        """Rebuilds the model in float32 and loads a checkpoint's weights into it.

        A mixed-precision run keeps float32 weights, so its model is rebuilt
        under the float32 policy; the global policy is put back afterwards.

        Args:
            checkpoint: ``best``, ``last`` or ``final``.

        Returns:
            A ``keras.Model`` taking 0..255 float pixels and returning logits.

        Raises:
            PipelineError: a missing checkpoint, or one that does not fit the model.
        """
        import keras

        from pipeline import models, security

        path = self.weights_path(checkpoint)
        security.verify_artifact(self.path, path)  # before a byte of it is loaded
        kwargs = OmegaConf.to_container(self.config.model, resolve=True)
        arch = kwargs.pop("arch")
        kwargs["weights"] = None  # the fine-tuning start point; ours are loaded below
        data = self.manifest["data"]
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("float32")
        try:
            model = models.build(
                arch,
                num_classes=len(data["class_names"]),
                input_shape=tuple(data["image_shape"]),
                mean=data["mean"],
                std=data["std"],
                **kwargs,
            )
            model.load_weights(path)
        except (ValueError, TypeError) as err:
            raise PipelineError(f"cannot load {path} into model={arch}: {err}") from err
        finally:
            keras.mixed_precision.set_global_policy(previous)
        return model


def check_tta(mode: str, key: str) -> str:
    """Returns ``mode`` if it is one of ``pipeline.tta.TTA_MODES``.

    Args:
        mode: the test-time augmentation asked for.
        key: how the user set it (``eval.tta``, ``--tta``, ...), for the message.

    Raises:
        PipelineError: naming ``key``, the value received and the valid modes.
    """
    from pipeline.tta import TTA_MODES

    if mode not in TTA_MODES:
        raise PipelineError(f"{key} must be one of {', '.join(TTA_MODES)}; got {mode!r}")
    return mode


def require_run_dir(cfg: DictConfig) -> None:
    """Fails with a usage line when the command line gave no ``run_dir=``."""
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise PipelineError(
            "run_dir=... is required: the directory of a finished training run, "
            "e.g. run_dir=outputs/2026-01-01/12-00-00"
        )


def load_run(run_dir) -> Run:
    """Reads a run directory written by ``pipeline.train``.

    Raises:
        PipelineError: the directory or one of its records is missing.
    """
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise PipelineError(f"run_dir={str(run_dir)!r} is not a folder. Pass a training run's dir.")
    for name in ("manifest.json", ".hydra/config.yaml"):
        if not (path / name).is_file():
            raise PipelineError(
                f"run_dir={str(run_dir)!r} has no {name}: it is not a finished training run "
                "(python -m pipeline.train writes one)."
            )
    manifest = json.loads((path / "manifest.json").read_text())
    return Run(path=path, config=OmegaConf.load(path / ".hydra" / "config.yaml"), manifest=manifest)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Loss, accuracy, top-k accuracy, per-class scores, confusion matrix and calibration.

    Args:
        logits: ``[N, C]`` model outputs.
        labels: ``[N]`` true class indices.
        class_names: the ``C`` names, in label order.

    Returns:
        A JSON-ready dict: ``loss`` (mean cross-entropy, no label smoothing),
        ``accuracy``, ``top_k``, ``top_k_accuracy``, ``macro_precision``,
        ``macro_recall``, ``macro_f1``, ``per_class`` (name -> precision,
        recall, f1, support), ``confusion_matrix`` (rows true, columns
        predicted), ``ece`` and ``calibration`` (its bins).
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    num_classes = len(class_names)
    if logits.ndim != 2 or logits.shape[1] != num_classes or len(labels) != len(logits):
        raise ValueError(
            f"need logits [N, {num_classes}] and labels [N], got {logits.shape} and {labels.shape}"
        )
    log_probs = logits - _logsumexp(logits)
    probs = np.exp(log_probs)
    predicted = probs.argmax(1)
    k = min(TOP_K, num_classes)
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    cm = confusion_matrix(labels, predicted, num_classes)
    true_pos = np.diag(cm).astype(np.float64)
    precision = _safe_divide(true_pos, cm.sum(0))
    recall = _safe_divide(true_pos, cm.sum(1))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    ece, bins = expected_calibration_error(probs.max(1), predicted == labels)
    return {
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "accuracy": float(np.mean(predicted == labels)),
        "top_k": k,
        "top_k_accuracy": float(np.mean((top_k == labels[:, None]).any(1))),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(cm[i].sum()),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "ece": ece,
        "calibration": bins,
    }


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` pairs into a ``[C, C]`` int64 matrix."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predicted, np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|`` where bin
    ``b`` holds the predictions with confidence in ``(b / bins, (b + 1) / bins]``.

    Args:
        confidences: ``[N]`` probability of each predicted class.
        correct: ``[N]`` whether each prediction was right.
        bins: number of bins.

    Returns:
        ``(ece, [{"lower", "upper", "count", "accuracy", "confidence"}, ...])``;
        empty bins have accuracy and confidence None.
    """
    confidences = np.asarray(confidences, np.float64)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # right=True puts a confidence equal to an upper edge in that bin; 0 joins the first
    index = np.clip(np.digitize(confidences, edges[1:-1], right=True), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        confidence = float(confidences[members].mean()) if count else None
        if count:
            ece += count / len(confidences) * abs(accuracy - confidence)
        table.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "accuracy": accuracy,
                "confidence": confidence,
            }
        )
    return float(ece), table


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(1, keepdims=True))


def _safe_divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros_like(b), where=b > 0)


def render_confusion_matrix(cm: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Draws a confusion matrix as a heat map: rows true, columns predicted.

    Each cell's colour is its share of the row (the class's recall on the
    diagonal); counts and class names are written when the cells are large
    enough to hold them.

    Returns:
        ``[H, W, 3]`` uint8 image.
    """
    from PIL import Image, ImageDraw, ImageFont

    cm = np.asarray(cm)
    n = len(class_names)
    cell = int(np.clip(CM_MAX_SIDE // max(n, 1), 2, 48))
    font = ImageFont.load_default()
    labelled = cell >= 10
    names = [_shorten(str(c), 14) for c in class_names]
    margin = 8 + (max(_text_size(font, s)[0] for s in names) if labelled else 0)
    header = 22  # the axis caption
    grid = cell * n
    caption = "rows: true class, columns: predicted"
    width = max(margin + grid, _text_size(font, caption)[0] + 8) + 8
    image = Image.new("RGB", (width, header + margin + grid + 8), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), caption, fill="black", font=font)
    top = header + margin
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for i in range(n):
        for j in range(n):
            colour = tuple(int(c) for c in 255 - share[i, j] * (255 - BLUE))
            x0, y0 = margin + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour)
            text = str(int(cm[i, j]))
            w, h = _text_size(font, text)
            if cell >= 18 and w < cell - 2:
                ink = "white" if share[i, j] > 0.5 else "black"
                draw.text((x0 + (cell - w) / 2, y0 + (cell - h) / 2), text, fill=ink, font=font)
    if labelled:
        for i, name in enumerate(names):
            w, h = _text_size(font, name)
            draw.text((margin - w - 4, top + i * cell + (cell - h) / 2), name, fill="black")
            label = Image.new("RGB", (w + 2, h + 2), "white")
            ImageDraw.Draw(label).text((1, 1), name, fill="black", font=font)
            label = label.rotate(90, expand=True)
            image.paste(label, (margin + i * cell + (cell - label.width) // 2, top - label.height))
    return np.asarray(image)


def render_mistakes(images: list[np.ndarray], captions: list[tuple[str, str]]) -> np.ndarray:
    """Tiles images in a grid, each upscaled and captioned with two lines.

    Args:
        images: uint8 ``[H, W, 3]`` images.
        captions: two lines of text per image.

    Returns:
        ``[H, W, 3]`` uint8 image (a short note when ``images`` is empty).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    if not images:
        image = Image.new("RGB", (240, 40), "white")
        ImageDraw.Draw(image).text((8, 12), "no misclassified images", fill="black", font=font)
        return np.asarray(image)
    side = max(images[0].shape[:2])
    scale = max(1, -(-MISTAKE_TILE // side))
    tile = side * scale
    caption_h = 2 * (_text_size(font, "Ag")[1] + 3)
    cols = min(GRID_COLUMNS, len(images))
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * (tile + 6), rows * (tile + caption_h + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(4, tile // 6)
    for k, (img, lines) in enumerate(zip(images, captions, strict=True)):
        x0, y0 = (k % cols) * (tile + 6) + 3, (k // cols) * (tile + caption_h + 6) + 3
        big = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), 0)
        sheet.paste(big, (x0, y0))
        for line_no, line in enumerate(lines):
            y = y0 + tile + 2 + line_no * (caption_h // 2)
            draw.text((x0, y), _shorten(line, chars), fill="black", font=font)
    return np.asarray(sheet)


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "~"


def _test_split(run: Run, test_path: str | None):
    """The uint8 test images to evaluate: ``(dataset, members, description)``.

    Raises:
        PipelineError: the rebuilt split differs from the manifest, or the
            other folder has classes the model does not know.
    """
    from pipeline import data
    from pipeline.train import data_options

    if test_path:
        return _folder_split(run, test_path)
    cfg = run.config
    source = data.load_source(
        cfg.data.source, image_size=cfg.data.image_size, seed=cfg.seed, **data_options(cfg.data)
    )
    recorded = run.manifest["data"]["splits"]["test"]
    if source.test.members != recorded or source.class_names != run.class_names:
        differ = (
            len(set(source.test.members) ^ set(recorded))
            if isinstance(recorded, list)
            else f"{recorded!r} recorded, {source.test.members!r} now"
        )
        raise PipelineError(
            f"the test split rebuilt from the run's data ({source.name}) differs from the one in "
            f"{run.path / 'manifest.json'} (members differing: {differ}; classes then "
            f"{run.class_names}, now {source.class_names}). The data changed since training: "
            "restore it, or evaluate on a folder with data.test_path=..."
        )
    return source.test.images, recorded, {"split": "test", "source": source.name}


def _folder_split(run: Run, test_path: str):
    """The images of another class-per-folder set, scanned and decoded as training does."""
    from pipeline.data import scan
    from pipeline.data.sources import _file_split

    root = Path(test_path).expanduser()
    if not root.is_dir():
        raise PipelineError(
            f"data.test_path={test_path!r} is not a folder. Point it at a folder holding one "
            "subfolder of images per class."
        )
    result = scan.scan_folder(root, cache_dir=run.config.data.get("cache_dir", "data"))
    classes = result.class_names
    unknown = sorted(set(classes) - set(run.class_names))
    if unknown:
        raise PipelineError(
            f"data.test_path={test_path!r} has class folders {unknown} that the model in "
            f"{run.path} does not know; its classes are {run.class_names}. Rename the folders "
            "to the model's class names, or evaluate a run trained on these classes."
        )
    missing = sorted(set(run.class_names) - set(classes))
    if missing:
        log.warning("data.test_path=%s has no images of classes %s", test_path, missing)
    if result.bad:
        log.warning("%s", scan.summary_table(result))
    files = [(f, run.class_names.index(classes[y]), pil) for f, y, pil in result.good]
    split = _file_split(files, root, run.image_size, run.resize)
    info = {"split": "folder", "path": str(root), "quarantined": result.bad}
    return split.images, split.members, info


def _predict(model, images, batch_size: int, files: list[Path] | None = None):
    """Runs the model over uint8 ``(image, label)`` pairs.

    Args:
        model: the Keras model.
        images: unbatched uint8 ``(image, label)`` pairs.
        batch_size: images per step.
        files: the image files behind ``images``, to name the broken ones.

    Returns:
        ``(logits [N, C], labels [N], mistakes)`` where ``mistakes`` holds the
        ``MISTAKES`` most confident wrong predictions as ``(confidence, index,
        predicted, image)``, most confident first.
    """
    import tensorflow as tf

    forward = tf.function(
        lambda x: model(tf.cast(x, tf.float32), training=False), reduce_retracing=True
    )
    all_logits, all_labels, mistakes = [], [], []
    seen = 0
    try:
        for batch, labels in images.batch(batch_size).prefetch(tf.data.AUTOTUNE):
            logits = np.asarray(forward(batch), np.float64)
            labels = labels.numpy()
            probs = np.exp(logits - _logsumexp(logits))
            predicted, confidence = probs.argmax(1), probs.max(1)
            for i in np.flatnonzero(predicted != labels):
                mistakes.append((float(confidence[i]), seen + i, int(predicted[i]), batch[i]))
            mistakes = sorted(mistakes, key=lambda m: (-m[0], m[1]))[:MISTAKES]
            all_logits.append(logits)
            all_labels.append(labels)
            seen += len(labels)
    except tf.errors.InvalidArgumentError as err:
        broken = [str(f) for f in files or () if not _decodes(f)]
        shown = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise PipelineError(
            f"cannot decode {shown or 'an image of the evaluation set'}. "
            "Remove or re-save the broken file(s)."
        ) from err
    if not seen:
        raise PipelineError("the evaluation set is empty: nothing to evaluate.")
    mistakes = [(c, int(i), p, img.numpy()) for c, i, p, img in mistakes]
    return np.concatenate(all_logits), np.concatenate(all_labels), mistakes


def _decodes(path: Path) -> bool:
    import tensorflow as tf

    try:
        tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        return False
    return True


def evaluate(
    run_dir,
    *,
    checkpoint: str = "best",
    test_path: str | None = None,
    batch_size: int | None = None,
    out_dir=None,
    adversarial: bool = False,
    eps: Sequence[float] = DEFAULT_EPS,
    pgd_steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    max_examples: int = 500,
    tta: str = "none",
) -> dict:
    """Evaluates a training run and writes its report, images and TensorBoard logs.

    Args:
        run_dir: a directory written by ``pipeline.train``.
        checkpoint: ``best`` or ``last`` (``checkpoints/<name>.weights.h5``), or
            ``final`` (``model.keras``).
        test_path: a class-per-subfolder folder to evaluate on instead of the
            run's own test split; its classes must be among the model's.
        batch_size: images per step; defaults to the run's ``data.batch_size``.
        out_dir: where to write; defaults to ``<run_dir>/eval``.
        adversarial: also measure accuracy under FGSM and PGD (report key
            ``adversarial``, see ``pipeline.adversarial.robustness_report``).
        eps: L-infinity radii on the [0, 1] pixel scale (``8/255`` = 0.0314).
        pgd_steps: PGD steps.
        step_size: PGD step on the [0, 1] scale; None: ``2.5 * eps / pgd_steps``.
        random_start: PGD starts from a random point in the eps-ball.
        max_examples: the first this many evaluation images are attacked.
        tta: test-time augmentation of the logits every metric is computed
            on: ``none``, ``flip`` or ``flip_translate`` (see ``pipeline.tta``).

    Returns:
        The report (also written to ``<out_dir>/report.json``).

    Raises:
        PipelineError: a missing run, checkpoint or folder, mismatched classes,
            data that changed since training, a model file changed since
            training, or bad attack or TTA settings.
    """
    from pipeline.tta import with_tta

    run = load_run(run_dir)
    weights = run.weights_path(checkpoint)
    check_tta(tta, "eval.tta")
    batch_size = int(batch_size or run.config.data.batch_size)
    if batch_size < 1:
        raise PipelineError(f"data.batch_size must be >= 1, got {batch_size}")
    attack = (
        _attack_settings(eps, pgd_steps, step_size, random_start, max_examples)
        if adversarial
        else None
    )
    images, members, data_info = _test_split(run, test_path)
    model = run.build_model(checkpoint)
    files = [Path(data_info["path"]) / m for m in members] if "path" in data_info else None
    logits, labels, mistakes = _predict(with_tta(model, tta), images, batch_size, files)
    names = run.class_names
    report = {
        "run_dir": str(run.path),
        "checkpoint": checkpoint,
        "weights": str(weights.relative_to(run.path)),
        "tta": tta,
        "data": {**data_info, "count": len(labels)},
        "class_names": names,
        **classification_metrics(logits, labels, names),
        "mistakes": [
            {
                "member": members[i] if isinstance(members, list) else i,
                "index": i,
                "true": names[labels[i]],
                "predicted": names[p],
                "confidence": c,
            }
            for c, i, p, _ in mistakes
        ],
    }
    if attack is not None:
        # always the plain model, whatever tta is: robustness stays comparable across eval.tta
        # settings, and attacking through the views would cost up to 6x the gradient steps
        report["adversarial"] = _robustness(model, images, batch_size, **attack)
    out = Path(out_dir) if out_dir else run.path / "eval"
    _write_outputs(report, mistakes, out, run)
    _print_summary(report, out)
    return report


def _attack_settings(eps, pgd_steps, step_size, random_start, max_examples) -> dict:
    """Checks the eval.* attack settings before the slow part; returns them as keywords."""
    eps = [float(e) for e in (eps or ())]
    if not eps or not all(0.0 < e <= 1.0 for e in eps):
        raise PipelineError(
            f"eval.eps must be a non-empty list of radii in (0, 1] on the [0, 1] pixel scale "
            f"(e.g. [0.00392, 0.0314] for 1/255 and 8/255), got {eps}"
        )
    if int(pgd_steps) < 1 or int(max_examples) < 1:
        raise PipelineError(
            f"eval.pgd_steps and eval.max_examples must be >= 1, got {pgd_steps} and {max_examples}"
        )
    if step_size is not None and not 0.0 < float(step_size) <= 1.0:
        raise PipelineError(
            f"eval.step_size must be null (2.5 * eps / pgd_steps) or in (0, 1], got {step_size}"
        )
    return {
        "eps_list": eps,
        "steps": int(pgd_steps),
        "step_size": None if step_size is None else float(step_size),
        "random_start": bool(random_start),
        "max_examples": int(max_examples),
    }


def _robustness(model, images, batch_size: int, *, max_examples: int, **attack) -> dict:
    """Attacks the first ``max_examples`` evaluation images; logs any failed self-check."""
    from pipeline import adversarial

    pixels, labels = [], []
    for batch, label in images.take(max_examples).batch(batch_size):
        pixels.append(batch.numpy())
        labels.append(label.numpy())
    report = adversarial.robustness_report(
        model,
        np.concatenate(pixels),
        np.concatenate(labels),
        batch_size=batch_size,
        **attack,
    )
    for warning in report["warnings"]:
        log.warning("robustness check failed: %s", warning)
    return report


def _write_outputs(report: dict, mistakes: list, out: Path, run: Run) -> None:
    import tensorflow as tf
    from PIL import Image

    from pipeline import runinfo

    out.mkdir(parents=True, exist_ok=True)
    names = report["class_names"]
    pictures = {
        "confusion_matrix": render_confusion_matrix(np.array(report["confusion_matrix"]), names),
        "mistakes": render_mistakes(
            [img for *_, img in mistakes],
            [
                (f"true: {m['true']}", f"pred: {m['predicted']} {m['confidence']:.2f}")
                for m in report["mistakes"]
            ],
        ),
    }
    report["files"] = {}
    for name, picture in pictures.items():
        Image.fromarray(picture).save(out / f"{name}.png")
        report["files"][name] = f"{name}.png"
    runinfo.write_json(out / "report.json", report)
    metrics_file = run.path / "metrics.json"
    step = (
        int(json.loads(metrics_file.read_text()).get("epochs", 0)) if metrics_file.exists() else 0
    )
    writer = tf.summary.create_file_writer(str(run.path / "tensorboard" / "eval"))
    with writer.as_default():
        for key in ("loss", "accuracy", "top_k_accuracy", "macro_f1", "ece"):
            tf.summary.scalar(f"eval_{key}", report[key], step=step)
        for name, picture in pictures.items():
            tf.summary.image(f"eval_{name}", picture[None], step=step)
    writer.close()


def _print_summary(report: dict, out: Path) -> None:
    rows = [
        ("examples", str(report["data"]["count"])),
        ("checkpoint", f"{report['checkpoint']} ({report['weights']})"),
        ("test-time augmentation", report["tta"]),
        ("loss", f"{report['loss']:.4f}"),
        ("accuracy", f"{report['accuracy']:.4f}"),
        (f"top-{report['top_k']} accuracy", f"{report['top_k_accuracy']:.4f}"),
        ("macro F1", f"{report['macro_f1']:.4f}"),
        ("ECE (15 bins)", f"{report['ece']:.4f}"),
    ]
    for row in report.get("adversarial", {}).get("attacks", []):
        name = f"{row['attack']} eps={row['eps_pixels']:.3g}/255"
        rows.append((name, f"{row['accuracy']:.4f}"))
    for warning in report.get("adversarial", {}).get("warnings", []):
        rows.append(("warning", warning))
    rows.append(("report", str(out / "report.json")))
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows) + "\n", flush=True)


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (see ``conf/evaluate.yaml``)."""
    with user_errors():
        require_run_dir(cfg)
        evaluate(
            cfg.run_dir,
            checkpoint=cfg.checkpoint,
            test_path=cfg.data.test_path,
            batch_size=cfg.data.batch_size,
            out_dir=cfg.out_dir,
            adversarial=cfg.eval.adversarial,
            eps=list(cfg.eval.eps),
            pgd_steps=cfg.eval.pgd_steps,
            step_size=cfg.eval.step_size,
            random_start=cfg.eval.random_start,
            max_examples=cfg.eval.max_examples,
            tta=cfg.eval.tta,
        )


if __name__ == "__main__":
    main()
