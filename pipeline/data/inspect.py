"""Look at a data set before training: ``python -m pipeline.data.inspect [data overrides]``.

Loads the data as ``pipeline.train`` does (same ``data=...`` overrides, same
splits, same scan for ``data=folder``) and reports:

- the class counts of each split and the imbalance ratio (largest class over
  smallest);
- the distribution of the original image sizes: for ``data=folder`` the
  width and height the scan recorded per file (its cache under
  ``<data.cache_dir>/scans/``, so nothing is reopened); for digits and TFDS
  datasets of one fixed shape, that shape;
- the training split's per-channel mean and std on the [0, 1] scale, as
  training computes them (``pipeline.data.channel_stats``);
- a grid of ``inspect.samples_per_class`` random training images per class,
  one row per class, at ``data.image_size`` as the model sees them (before
  augmentation).

Writes ``inspect.json`` and ``inspect.png`` to the Hydra run dir.

    python -m pipeline.data.inspect data=folder data.path=/my/images data.image_size=32
    python -m pipeline.data.inspect data=digits +inspect.samples_per_class=4
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.config import check_config, hydra_main, prepare_run_dir
from pipeline.errors import PipelineError, user_errors
from pipeline.terminal import quiet_tensorflow

log = logging.getLogger("pipeline.data.inspect")

SAMPLES_PER_CLASS = 8  # images per row of inspect.png (+inspect.samples_per_class=N)
SPLITS = ("train", "val", "test")
DIGITS_SIZE = (8, 8)  # width, height of scikit-learn's digits before resizing
MIN_TILE = 64  # pixels: small images are enlarged by a whole factor, nearest neighbour
GAP = 2  # pixels between tiles and around the grid
LABEL_CHARS = 24  # longer class names are shortened in the grid
MAX_GRID_CLASSES = 100  # rows drawn; the report still counts every class
MAX_TABLE_CLASSES = 30  # rows printed; inspect.json holds all
TOP_SIZES = 10  # most common original sizes listed
PASS_BATCH = 512  # images per step of the sampling pass


def inspect_data(cfg: DictConfig, run_dir=None) -> dict:
    """Counts, sizes, statistics and sample images of the data set the config names.

    Args:
        cfg: the composed config (``conf/config.yaml`` plus overrides); reads
            ``data.*``, ``seed`` and ``inspect.samples_per_class`` (default 8).
        run_dir: where to write; defaults to Hydra's output dir.

    Returns:
        The report (also written to ``<run_dir>/inspect.json``).

    Raises:
        PipelineError: a problem with the config, data or files.
    """
    check_config(cfg)
    per_class = int(OmegaConf.select(cfg, "inspect.samples_per_class", default=SAMPLES_PER_CLASS))
    if per_class < 1:
        raise PipelineError(f"inspect.samples_per_class must be >= 1, got {per_class}")
    run_dir = prepare_run_dir(cfg, run_dir)

    from PIL import Image

    from pipeline import data
    from pipeline.data.sources import source_options
    from pipeline.runs import manifest as runinfo

    d = cfg.data
    source = data.load_source(d.source, image_size=d.image_size, seed=cfg.seed, **source_options(d))
    scan_report = source.details.pop("scan", None)
    train = source.train.images.cache()  # the stats pass fills it; sampling reads memory
    num_classes = len(source.class_names)
    mean, std, train_counts = data.channel_stats(train, source.train.count, num_classes)
    samples = sample_images(train, num_classes, per_class, cfg.seed)
    counts = {"train": train_counts}
    for split in ("val", "test"):
        counts[split] = split_counts(getattr(source, split), source.class_names, source.name)
    report = {
        "source": source.name,
        "class_names": source.class_names,
        "image_size": int(d.image_size),
        **count_report(counts, source.class_names),
        "original_sizes": original_sizes(source, d),
        "mean": mean,
        "std": std,
        "samples_per_class": per_class,
        "files": {"grid": "inspect.png"},
    }
    if scan_report is not None:
        report["quarantined"] = {k: v["bad"] for k, v in scan_report.items() if k in SPLITS}
        report["leakage_dropped"] = len(scan_report.get("leakage", []))
    Image.fromarray(render_grid(samples, source.class_names)).save(run_dir / "inspect.png")
    runinfo.write_json(run_dir / "inspect.json", report)
    print(format_summary(report, run_dir), flush=True)
    return report


def sample_images(images, num_classes: int, per_class: int, seed: int) -> list[list[np.ndarray]]:
    """Draws up to ``per_class`` images of each class.

    Reservoir sampling: one pass, every image of a class equally likely.

    Args:
        images: unbatched ``(uint8 image, label)`` pairs.
        num_classes: number of classes.
        per_class: images to keep per class.
        seed: NumPy seed of the draw.

    Returns:
        Per class, a list of up to ``per_class`` ``[H, W, 3]`` uint8 arrays.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    counts = np.zeros(num_classes, np.int64)
    samples: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for batch, labels in images.batch(PASS_BATCH).prefetch(tf.data.AUTOTUNE):
        batch = batch.numpy()
        for image, label in zip(batch, labels.numpy(), strict=True):
            counts[label] += 1
            if counts[label] <= per_class:
                samples[label].append(image)
            else:
                slot = rng.integers(counts[label])
                if slot < per_class:
                    samples[label][slot] = image
    return samples


def split_counts(split, class_names: list[str], source_name: str) -> list[int]:
    """Images per class of one split, in class order.

    A folder split's members are paths ``<class>/<file>`` relative to its
    folder, so no image is decoded; other sources' labels are read.
    """
    if source_name == "folder":
        found = Counter(Path(member).parts[0] for member in split.members)
        return [found.get(name, 0) for name in class_names]
    labels = np.concatenate(
        [y.numpy() for y in split.images.map(lambda _, y: y).batch(PASS_BATCH * 8)] or [[]]
    ).astype(np.int64)
    return np.bincount(labels, minlength=len(class_names)).tolist()


def imbalance_ratio(counts: list[int]) -> float | None:
    """Largest class over smallest; None when a class has no image."""
    return max(counts) / min(counts) if counts and min(counts) > 0 else None


def count_report(counts: dict[str, list[int]], class_names: list[str]) -> dict:
    """``counts`` (split -> per-class list, plus ``total``), split sizes and imbalance ratios."""
    counts = {**counts, "total": [sum(c) for c in zip(*counts.values(), strict=True)]}
    return {
        "counts": {s: dict(zip(class_names, c, strict=True)) for s, c in counts.items()},
        "split_sizes": {s: int(sum(c)) for s, c in counts.items()},
        "imbalance_ratio": {s: imbalance_ratio(c) for s, c in counts.items()},
    }


def original_sizes(source, data_cfg: DictConfig) -> dict:
    """The distribution of the images' sizes before resizing (see ``size_summary``).

    Folder: per file, from the scan cache (a file the cache lacks is opened).
    Digits: 8x8. TFDS: the dataset's image shape when it is fixed, else
    ``{"fixed": False}`` (TFDS records no per-image size).
    """
    total = sum(getattr(source, s).count for s in SPLITS)
    if source.name == "digits":
        return size_summary([DIGITS_SIZE] * total, int(data_cfg.image_size))
    if source.name != "folder":
        shape = _tfds_image_shape(data_cfg.name, data_cfg.cache_dir)
        if shape is None or None in shape[:2]:
            return {"fixed": False, "count": total}
        return size_summary([(shape[1], shape[0])] * total, int(data_cfg.image_size))
    sizes = []
    for split in SPLITS:
        root = data_cfg.get(f"{split}_path") or data_cfg.path
        sizes += _folder_sizes(
            Path(root).expanduser(),
            getattr(source, split).members,
            cache_dir=data_cfg.cache_dir,
            max_pixels=int(data_cfg.max_pixels),
        )
    return size_summary(sizes, int(data_cfg.image_size))


def _folder_sizes(root: Path, members: list[str], *, cache_dir, max_pixels: int) -> list:
    from pipeline.data import quarantine as scan

    # the scan keeps no sizes in its result, but caches each file's facts by path
    cached = scan._load_cache(scan._cache_path(cache_dir, root)) if cache_dir else {}
    sizes = []
    for rel in members:
        facts = cached.get(rel, {}).get("result") or scan.inspect_file(
            os.path.join(root, rel), max_pixels=max_pixels
        )
        sizes.append((int(facts["width"]), int(facts["height"])))
    return sizes


def _tfds_image_shape(name: str, cache_dir: str):
    import tensorflow_datasets as tfds

    info = tfds.builder(name, data_dir=cache_dir).info
    return tuple(info.features[info.supervised_keys[0]].shape)


def size_summary(sizes: list[tuple[int, int]], image_size: int) -> dict:
    """Summarizes ``(width, height)`` pairs.

    Returns:
        ``count``, ``fixed`` (one size only), ``width`` and ``height`` as
        ``{min, median, max}``, ``distinct`` sizes, the ``most_common`` ones,
        ``non_square`` images and ``smaller_than_image_size`` (shorter side below
        ``image_size``: enlarged when resized).
    """
    if not sizes:
        return {"count": 0, "fixed": None}
    w, h = (np.array(v, np.int64) for v in zip(*sizes, strict=True))
    common = Counter(sizes).most_common(TOP_SIZES)

    def spread(v):
        return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}

    return {
        "count": len(sizes),
        "fixed": len(set(sizes)) == 1,
        "width": spread(w),
        "height": spread(h),
        "distinct": len(set(sizes)),
        "most_common": [{"width": a, "height": b, "count": n} for (a, b), n in common],
        "non_square": int((w != h).sum()),
        "smaller_than_image_size": int((np.minimum(w, h) < image_size).sum()),
    }


def tile_size(image_size: int) -> int:
    """Pixels a side of one image in the grid: enlarged by a whole factor to ``MIN_TILE``."""
    return image_size * max(1, math.ceil(MIN_TILE / image_size))


def render_grid(samples: list[list[np.ndarray]], class_names: list[str]) -> np.ndarray:
    """Draws one row per class: its name, then its sample images.

    Args:
        samples: per class, ``[S, S, 3]`` uint8 images (rows may be short or empty).
        class_names: one per row; the first ``MAX_GRID_CLASSES`` are drawn.

    Returns:
        ``[H, W, 3]`` uint8 image, ``H = rows * (tile + GAP) + GAP``.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows = min(len(class_names), MAX_GRID_CLASSES)
    size = next((s[0].shape[0] for s in samples if s), MIN_TILE)
    tile = tile_size(size)
    columns = max([len(s) for s in samples[:rows]] + [1])
    font = ImageFont.load_default()
    names = [_shorten(str(n)) for n in class_names[:rows]]
    label_width = max(_text_size(font, n)[0] for n in names) + 4 * GAP
    width = label_width + columns * (tile + GAP)  # each tile is followed by GAP
    grid = Image.new("RGB", (width, rows * (tile + GAP) + GAP), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(zip(names, samples, strict=False)):
        top = GAP + r * (tile + GAP)
        text_height = _text_size(font, name)[1]
        draw.text((2 * GAP, top + (tile - text_height) // 2), name, fill="black", font=font)
        for c, image in enumerate(images):
            picture = Image.fromarray(image).resize((tile, tile), Image.NEAREST)
            grid.paste(picture, (label_width + c * (tile + GAP), top))
    return np.asarray(grid)


def _shorten(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 3] + "..."


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def format_summary(report: dict, run_dir: Path) -> str:
    """The console summary: a table of class counts, then sizes, statistics and files."""
    names = report["class_names"]
    counts, sizes = report["counts"], report["split_sizes"]
    width = max(len(_shorten(n)) for n in names + ["class"])
    lines = [
        f"Data {report['source']}: {len(names)} classes, {sizes['total']} images "
        f"(train {sizes['train']}, val {sizes['val']}, test {sizes['test']})",
        f"  {'class':<{width}}  {'train':>7}  {'val':>6}  {'test':>6}  {'total':>7}",
    ]
    for name in names[:MAX_TABLE_CLASSES]:
        c = [counts[s][name] for s in (*SPLITS, "total")]
        lines.append(f"  {_shorten(name):<{width}}  {c[0]:>7}  {c[1]:>6}  {c[2]:>6}  {c[3]:>7}")
    if len(names) > MAX_TABLE_CLASSES:
        lines.append(f"  ... and {len(names) - MAX_TABLE_CLASSES} more classes in inspect.json")
    ratios = report["imbalance_ratio"]
    shown = ", ".join(f"{s} {_ratio(ratios[s])}" for s in ("train", "total"))
    lines.append(f"  imbalance (largest / smallest class): {shown}")
    lines.append(f"  original sizes: {_sizes_line(report['original_sizes'], report['image_size'])}")
    lines.append("  channel mean (0..1): " + " ".join(f"{m:.4f}" for m in report["mean"]))
    lines.append("  channel std  (0..1): " + " ".join(f"{s:.4f}" for s in report["std"]))
    if report.get("quarantined"):
        lines.append(f"  quarantined by the scan, per folder: {report['quarantined']}")
    shown_rows = min(len(names), MAX_GRID_CLASSES)
    lines.append(f"  samples: {run_dir / 'inspect.png'} ({shown_rows} rows)")
    lines.append(f"  report:  {run_dir / 'inspect.json'}")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "inf (a class has no image)" if value is None else f"{value:.2f}"


def _sizes_line(sizes: dict, image_size: int) -> str:
    if "width" not in sizes:  # no image, or a TFDS dataset of varying sizes
        return "variable (not recorded by this source)"
    w, h = sizes["width"], sizes["height"]
    if sizes["fixed"]:
        line = f"all {w['min']}x{h['min']}"
    else:
        common = ", ".join(
            f"{c['width']}x{c['height']} ({c['count']})" for c in sizes["most_common"][:3]
        )
        line = (
            f"width {w['min']}..{w['max']} (median {w['median']:g}), height {h['min']}..{h['max']} "
            f"(median {h['median']:g}); {sizes['distinct']} distinct, most common {common}; "
            f"{sizes['non_square']} not square"
        )
    return f"{line}; {sizes['smaller_than_image_size']} smaller than {image_size} px"


@hydra_main("config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: the data keys of ``conf/config.yaml``."""
    quiet_tensorflow()
    with user_errors(log):
        inspect_data(cfg)


if __name__ == "__main__":
    main()
