"""A finished run's evaluation: ``evaluate(run_dir, ...)`` writes ``<run_dir>/eval/``.

Rebuilds the run's test split (or reads another folder, ``test_path=...``),
runs the model from a checkpoint in float32 and writes:

- ``report.json``: loss, top-1 and top-k accuracy (k = min(5, classes)),
  per-class precision, recall and F1, the confusion matrix, expected
  calibration error with its bins, and the most confidently wrong images;
  with ``tta=flip|flip_translate`` all of them are computed on the
  test-time-augmented logits (``pipeline.evaluation.tta``);
- ``confusion_matrix.png`` and ``mistakes.png``;

and logs both images to ``<run_dir>/tensorboard/eval`` (the numbers stay in
``report.json``: TensorBoard would show each as a chart of one point). The
prediction pass and the attacks show their progress (images done, images/s,
time left) on standard error (``pipeline.progress``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline import progress
from pipeline.errors import PipelineError
from pipeline.evaluation.attacks import DEFAULT_EPS
from pipeline.evaluation.metrics import classification_metrics, logsumexp
from pipeline.evaluation.plots import (
    CONFUSION_MATRIX_TAG,
    LEGEND,
    MISTAKES_TAG,
    mistake_pages,
    render_confusion_matrix,
    render_mistakes,
)
from pipeline.runs.reader import Run, load_run

log = logging.getLogger("pipeline.evaluate")

MISTAKES = 16  # images in the mistakes grid


class EvalSet(NamedTuple):
    """The images a run is evaluated on.

    Attributes:
        images: unbatched uint8 ``(image, label)`` pairs.
        members: what is in it, as the manifest records a split (indices, relative
            paths or a TFDS spec).
        info: where the images came from, for the report's ``data``.
    """

    images: object
    members: list | str
    info: dict

    def files(self) -> list[Path] | None:
        """The image files of a folder split (to name a broken one), else None."""
        if "path" not in self.info:
            return None
        return [Path(self.info["path"]) / m for m in self.members]


def _test_split(run: Run, test_path: str | None) -> EvalSet:
    """The uint8 test images to evaluate.

    Raises:
        PipelineError: the rebuilt split differs from the manifest, or the
            other folder has classes the model does not know.
    """
    from pipeline import data
    from pipeline.data.sources import source_options

    if test_path:
        return _folder_split(run, test_path)
    cfg = run.config
    source = data.load_source(
        cfg.data.source, image_size=cfg.data.image_size, seed=cfg.seed, **source_options(cfg.data)
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
    return EvalSet(source.test.images, recorded, {"split": "test", "source": source.name})


def _folder_split(run: Run, test_path: str) -> EvalSet:
    """The images of another class-per-folder set, scanned and decoded as training does."""
    from pipeline.data import quarantine
    from pipeline.data.sources import file_split

    root = Path(test_path).expanduser()
    if not root.is_dir():
        raise PipelineError(
            f"data.test_path={test_path!r} is not a folder. Point it at a folder holding one "
            "subfolder of images per class."
        )
    result = quarantine.scan_folder(root, cache_dir=run.config.data.get("cache_dir", "data"))
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
        log.warning("%s", quarantine.summary_table(result))
    files = [(f, run.class_names.index(classes[y]), pil) for f, y, pil in result.good]
    split = file_split(files, root, run.image_size, run.resize)
    info = {"split": "folder", "path": str(root), "quarantined": result.bad}
    return EvalSet(split.images, split.members, info)


def _predict(model, images, batch_size: int, files: list[Path] | None = None, tta: str = "none"):
    """Runs the model over uint8 ``(image, label)`` pairs, its progress on standard error.

    Args:
        model: the Keras model.
        images: unbatched uint8 ``(image, label)`` pairs.
        batch_size: images per step.
        files: the image files behind ``images``, to name the broken ones.
        tta: the test-time augmentation ``model`` holds, for the progress line.

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
    count = int(images.cardinality())  # negative: unknown
    bar = progress.Progress(
        "evaluating", count if count >= 0 else None, detail="" if tta == "none" else f"tta {tta}"
    )
    try:
        with bar:  # its closing line once every batch is done
            for batch, labels in images.batch(batch_size).prefetch(tf.data.AUTOTUNE):
                logits = np.asarray(forward(batch), np.float64)
                labels = labels.numpy()
                probs = np.exp(logits - logsumexp(logits))
                predicted, confidence = probs.argmax(1), probs.max(1)
                for i in np.flatnonzero(predicted != labels):
                    mistakes.append((float(confidence[i]), seen + i, int(predicted[i]), batch[i]))
                mistakes = sorted(mistakes, key=lambda m: (-m[0], m[1]))[:MISTAKES]
                all_logits.append(logits)
                all_labels.append(labels)
                seen += len(labels)
                bar.advance(len(labels))
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
            ``adversarial``, see ``pipeline.evaluation.attacks.robustness_report``).
        eps: L-infinity radii on the [0, 1] pixel scale (``8/255`` = 0.0314).
        pgd_steps: PGD steps.
        step_size: PGD step on the [0, 1] scale; None: ``2.5 * eps / pgd_steps``.
        random_start: PGD starts from a random point in the eps-ball.
        max_examples: the first this many evaluation images are attacked.
        tta: ``none``, ``flip`` or ``flip_translate``: the test-time augmentation
            of the logits every metric is computed on (``pipeline.evaluation.tta``).

    Returns:
        The report (also written to ``<out_dir>/report.json``).

    Raises:
        PipelineError: a missing run, checkpoint or folder, mismatched classes,
            data or a model file changed since training, or bad attack or TTA settings.
    """
    from pipeline.evaluation.tta import check_mode

    run = load_run(run_dir)
    weights = run.weights_path(checkpoint)  # a missing checkpoint fails before the slow part
    check_mode(tta, "eval.tta")
    batch_size = _batch_size(run, batch_size)
    attack = _attack_settings(adversarial, eps, pgd_steps, step_size, random_start, max_examples)
    split = _test_split(run, test_path)
    model = run.build_model(checkpoint)
    report, mistakes = _report(run, checkpoint, weights, model, split, batch_size, tta)
    if attack is not None:
        # always the plain model, whatever tta is: robustness stays comparable across eval.tta
        # settings, and attacking through the views would cost up to 6x the gradient steps
        report["adversarial"] = _robustness(model, split.images, batch_size, **attack)
    out = Path(out_dir) if out_dir else run.path / "eval"
    _write_outputs(report, mistakes, out, run)
    print_summary(report, out)
    return report


def _batch_size(run: Run, batch_size: int | None) -> int:
    """``batch_size``, else the run's ``data.batch_size``; at least 1."""
    batch_size = int(batch_size or run.config.data.batch_size)
    if batch_size < 1:
        raise PipelineError(f"data.batch_size must be >= 1, got {batch_size}")
    return batch_size


def _report(
    run: Run, checkpoint: str, weights: Path, model, split: EvalSet, batch_size: int, tta: str
) -> tuple[dict, list]:
    """The model's metrics on ``split``, and its most confident mistakes with their images."""
    from pipeline.evaluation.tta import with_tta

    logits, labels, mistakes = _predict(
        with_tta(model, tta), split.images, batch_size, split.files(), tta
    )
    names = run.class_names
    report = {
        "run_dir": str(run.path),
        "checkpoint": checkpoint,
        "weights": str(weights.relative_to(run.path)),
        "tta": tta,
        "data": {**split.info, "count": len(labels)},
        "class_names": names,
        **classification_metrics(logits, labels, names),
        "mistakes": [
            {
                "member": split.members[i] if isinstance(split.members, list) else i,
                "index": i,
                "true": names[labels[i]],
                "predicted": names[p],
                "confidence": c,
            }
            for c, i, p, _ in mistakes
        ],
    }
    return report, mistakes


def _attack_settings(
    adversarial: bool, eps, pgd_steps, step_size, random_start, max_examples
) -> dict | None:
    """Checks the eval.* attack settings before the slow part; returns them as keywords.

    Returns:
        None when ``adversarial`` is off, else ``_robustness``'s keywords.
    """
    if not adversarial:
        return None
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
    from pipeline.evaluation import attacks

    pixels, labels = [], []
    for batch, label in images.take(max_examples).batch(batch_size):
        pixels.append(batch.numpy())
        labels.append(label.numpy())
    pixels, labels = np.concatenate(pixels), np.concatenate(labels)
    eps = ", ".join(f"{e * 255:.3g}" for e in attack["eps_list"])
    detail = f"fgsm and pgd-{attack['steps']} at eps {eps} /255"
    with progress.Progress("attacking", len(pixels), detail=detail) as bar:
        report = attacks.robustness_report(
            model, pixels, labels, batch_size=batch_size, advance=bar.advance, **attack
        )
    for warning in report["warnings"]:
        log.warning("robustness check failed: %s", warning)
    return report


def _write_outputs(report: dict, mistakes: list, out: Path, run: Run) -> None:
    """``report.json`` and the two PNGs in ``out``; the pictures in TensorBoard's ``eval`` run."""
    import tensorflow as tf
    from PIL import Image

    from pipeline.runs import manifest

    out.mkdir(parents=True, exist_ok=True)
    names = report["class_names"]
    images = [img for *_, img in mistakes]
    captions = [(m["true"], f"{m['predicted']} {m['confidence']:.0%}") for m in report["mistakes"]]
    pictures = {
        "confusion_matrix": render_confusion_matrix(np.array(report["confusion_matrix"]), names),
        "mistakes": render_mistakes(images, captions),
    }
    report["files"] = {}
    for name, picture in pictures.items():
        Image.fromarray(picture).save(out / f"{name}.png")
        report["files"][name] = f"{name}.png"
    manifest.write_json(out / "report.json", report)
    metrics_file = run.path / "metrics.json"
    step = (
        int(json.loads(metrics_file.read_text()).get("epochs", 0)) if metrics_file.exists() else 0
    )
    writer = tf.summary.create_file_writer(str(run.path / "tensorboard" / "eval"))
    with writer.as_default():
        tf.summary.image(CONFUSION_MATRIX_TAG, pictures["confusion_matrix"][None], step=step)
        pages = mistake_pages(images, captions)  # one card page each, legible at its size
        tf.summary.image(MISTAKES_TAG, pages, step=step, max_outputs=len(pages), description=LEGEND)
    writer.close()


def print_summary(report: dict, out: Path) -> None:
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
