"""Image sources: each yields unbatched ``(uint8 image [S, S, 3], int32 label)`` splits.

A source decodes, converts to RGB and resizes every image once, to the final
``image_size``, so what follows (caching, statistics, augmentation) sees one
fixed shape. Splits are deterministic for a given seed and recorded by member
(indices, file paths or TFDS split specs) so later commands can rebuild them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # TensorFlow is imported where a function needs it
    import tensorflow as tf

    from pipeline.data.quarantine import ScanResult

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
UNREADABLE_AFTER_SCAN = "cannot read image file"  # starts the message of a file gone since the scan
RESIZE_MODES = ("crop", "pad", "stretch")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOG_DECODES = (
    "PIPELINE_LOG_DECODES"  # set: every decoded file is printed to stderr (tests count them)
)
TFDS_DOWNLOAD_RETRIES = 3  # TFDS's own 10, with its backoff, wait ~3.5 minutes to say "offline"
COMMON_DATA_KEYS = (  # data.* keys every source shares; the others are the loader's own
    "source",
    "image_size",
    "batch_size",
    "natural_images",
    "cache_dir",
    "class_weights",
    "shard",
    "service",
)


@dataclass
class Split:
    """One split of a source.

    Attributes:
        images: unbatched ``(uint8 [S, S, 3], int32)`` pairs in a fixed order.
        count: number of examples.
        members: what went into the split (indices, relative paths or a TFDS spec).
    """

    images: tf.data.Dataset
    count: int
    members: list | str
    lookup: Callable | None = None  # (int64 index, tag) -> (image, label): one example, decoded
    pillow_files: list[str] = field(default_factory=list)  # decoded by Pillow in this process

    @property
    def random_access(self) -> bool:
        """Whether one example can be decoded by its index (folders and in-memory arrays).

        Pipelines that choose images before decoding them (each worker of a
        cluster decoding only its share) need it; TFDS records are read in order.
        """
        return self.lookup is not None


@dataclass
class Source:
    """The three splits of a dataset and what describes it."""

    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    fingerprint: str
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SourceSpec:
    """A registered data source: its loader and what the rest of the package needs to know.

    Attributes:
        name: the ``data.source`` value (``conf/data/<name>.yaml`` sets it).
        load: the loader; takes ``image_size``, the source's own ``data.*`` keys
            and, where ``seeded``, ``seed``; returns a :class:`Source`.
        identity: ``data.*`` keys that name the dataset: a resumed run must keep them.
        seeded: the split depends on the run's seed.
        cached: the loader takes ``data.cache_dir``.
        for_training: ``pipeline.train`` accepts it (``synthetic`` is for the benchmark).
    """

    name: str
    load: Callable[..., Source]
    identity: tuple[str, ...] = ()
    seeded: bool = True
    cached: bool = False
    for_training: bool = True


_SOURCES: dict[str, SourceSpec] = {}


def register_source(
    name: str,
    *,
    identity: tuple[str, ...] = (),
    seeded: bool = True,
    cached: bool = False,
    for_training: bool = True,
):
    """Registers a loader as ``data.source=<name>`` (see :class:`SourceSpec`).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def register(load: Callable[..., Source]) -> Callable[..., Source]:
        if name in _SOURCES:
            raise ValueError(f"Data source {name!r} is already registered.")
        _SOURCES[name] = SourceSpec(name, load, tuple(identity), seeded, cached, for_training)
        return load

    return register


def list_sources(*, for_training: bool = False) -> list[str]:
    """The registered ``data.source`` names (only those ``pipeline.train`` takes, if asked)."""
    return sorted(n for n, spec in _SOURCES.items() if spec.for_training or not for_training)


def get_source(name: str) -> SourceSpec:
    """The registered source ``name``.

    Raises:
        PipelineError: an unknown name, with the valid ones.
    """
    if name not in _SOURCES:
        raise PipelineError(f"data.source must be one of {', '.join(list_sources())}; got {name!r}")
    return _SOURCES[name]


def identity_keys() -> tuple[str, ...]:
    """Every ``data.*`` key that names a dataset, over all sources (for ``resume=``).

    In registration order, without repeats, so messages list them in a stable order.
    """
    return tuple(dict.fromkeys(key for spec in _SOURCES.values() for key in spec.identity))


def source_options(data: Mapping) -> dict:
    """The loader's own keyword arguments out of a ``data`` config section.

    Args:
        data: the ``data`` section (a DictConfig or plain mapping).
    """
    from omegaconf import DictConfig, OmegaConf

    options = (
        OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
    )
    spec = get_source(options["source"])
    kept = {k: v for k, v in options.items() if k not in COMMON_DATA_KEYS}
    if spec.cached:
        kept["cache_dir"] = options.get("cache_dir", "data")
    return kept


def load_source(source: str, *, image_size: int, seed: int, **options) -> Source:
    """Loads the registered source ``source`` with its own options (``conf/data/*.yaml``).

    Raises:
        PipelineError: an unknown source, a bad image size, or the loader's own errors.
    """
    spec = get_source(source)
    if image_size < 8:
        raise PipelineError(f"data.image_size must be >= 8, got {image_size}")
    if spec.seeded:
        options["seed"] = seed
    return spec.load(image_size=image_size, **options)


def resize_image(image: tf.Tensor, size: int, mode: str) -> tf.Tensor:
    """Resizes one RGB image to ``size x size`` and returns it as uint8.

    Args:
        image: ``[H, W, 3]`` image of any numeric dtype on the 0..255 scale.
        size: output height and width in pixels.
        mode: ``crop`` keeps the aspect ratio and center-crops the longer side,
            ``pad`` keeps it and pads with black, ``stretch`` ignores it.

    Returns:
        ``[size, size, 3]`` uint8 tensor.
    """
    import tensorflow as tf

    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    shape = tf.shape(image)
    out = tf.cond(  # an image already size x size resizes to itself: skip the work
        tf.logical_and(shape[0] == size, shape[1] == size),
        lambda: tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0, 255), tf.uint8),
        lambda: _resized(image, size, mode),
    )
    out.set_shape([size, size, 3])
    return out


def _resized(image: tf.Tensor, size: int, mode: str) -> tf.Tensor:
    import tensorflow as tf

    image = tf.cast(image, tf.float32)
    if mode == "stretch":
        out = tf.image.resize(image, (size, size), antialias=True)
    elif mode == "pad":
        out = tf.image.resize_with_pad(image, size, size, antialias=True)
    elif mode == "crop":
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = size / tf.reduce_min(shape)
        new_hw = tf.cast(tf.math.ceil(shape * scale), tf.int32)
        out = tf.image.resize(image, new_hw, antialias=True)
        out = tf.image.resize_with_crop_or_pad(out, size, size)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """Converts a 1-, 2-, 3- or 4-channel image to 3 channels (alpha dropped)."""
    import tensorflow as tf

    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels in (1, 2):
        return tf.tile(image[..., :1], [1, 1, 3])
    if channels == 4:
        return image[..., :3]
    n = tf.shape(image)[-1]
    return tf.cond(n < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[list, list]:
    """Splits example indices per class; returns (kept, taken) index lists, sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    kept, taken = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_take = int(round(len(idx) * fraction))
        taken.extend(idx[:n_take].tolist())
        kept.extend(idx[n_take:].tolist())
    return sorted(kept), sorted(taken)


def _array_split(images: np.ndarray, labels: np.ndarray, idx: list) -> Split:
    import tensorflow as tf

    held = (tf.constant(images[idx]), tf.constant(labels[idx].astype(np.int32)))
    ds = tf.data.Dataset.from_tensor_slices(held)

    def lookup(index, tag="train"):
        return tf.gather(held[0], index), tf.gather(held[1], index)

    return Split(images=ds, count=len(idx), members=[int(i) for i in idx], lookup=lookup)


@register_source("digits")
def load_digits(*, image_size: int, seed: int, test_fraction: float, val_fraction: float) -> Source:
    """scikit-learn's 8x8 digits, scaled to 0..255 and resized to ``image_size``.

    The test split takes ``test_fraction`` of each class; validation takes
    ``val_fraction`` of what is left. Members are indices into ``load_digits()``.
    """
    import tensorflow as tf
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    raw = (bunch.images * (255.0 / 16.0)).astype(np.float32)[..., None]  # [N, 8, 8, 1]
    resized = tf.image.resize(raw, (image_size, image_size), method="bilinear")
    images = np.repeat(np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8), 3, axis=-1)
    labels = bunch.target.astype(np.int64)

    rest, test_idx = _stratified_split(labels, test_fraction, seed)
    train_sub, val_sub = _stratified_split(labels[rest], val_fraction, seed + 1)
    train_idx = [rest[i] for i in train_sub]
    val_idx = [rest[i] for i in val_sub]

    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    return Source(
        name="digits",
        train=_array_split(images, labels, train_idx),
        val=_array_split(images, labels, val_idx),
        test=_array_split(images, labels, test_idx),
        class_names=[str(n) for n in bunch.target_names],
        fingerprint=f"digits-{image_size}-{digest}",
    )


def decode_file(path, size: int | None = None) -> tf.Tensor:
    """Decodes an image file to uint8 RGB ``[H, W, 3]`` as the scan saw it.

    Every file goes through ``quarantine.decode_with_pil``, the decoder the scan
    checks files with (TensorFlow's own decoders refuse some files it accepts,
    such as 16-bit BMPs, and apply no EXIF orientation).

    Args:
        path: string tensor.
        size: the side the image is resized to next, so large images can be
            reduced while decoding (see ``decode_with_pil``); None: full size.

    Raises:
        tf.errors.UnknownError (when the dataset is iterated): the file vanished
            or no longer decodes; it carries a ``PipelineError`` naming the file
            (``pipeline.errors.carried_user_error``).
    """
    import tensorflow as tf

    def decode(p):
        p = np.asarray(p).item()
        return decode_scanned(p.decode() if isinstance(p, bytes) else p, size)

    image = tf.numpy_function(decode, [path], tf.uint8)
    image = tf.reshape(image, tf.concat([tf.shape(image)[:2], [3]], 0))
    image.set_shape([None, None, 3])
    return image


def decode_scanned(path: str, size: int | None = None) -> np.ndarray:
    """``decode_with_pil`` for a file the scan accepted; one that changed since is named.

    Raises:
        PipelineError: the file vanished or no longer decodes (one line naming it).
    """
    from pipeline.data.quarantine import decode_with_pil

    try:
        return decode_with_pil(path, size)
    except Exception as err:  # gone, replaced or truncated since the scan
        why = " ".join(f"{type(err).__name__}: {err}".split())  # one line
        raise PipelineError(
            f"{UNREADABLE_AFTER_SCAN} {path!r} ({why}): it was deleted or changed after the "
            "scan. Restore it and resume the run (resume=<run dir>), or remove it and run again."
        ) from None


def decode_plain(path, size: int | None = None) -> tf.Tensor:
    """Decodes a file the scan found plain (8-bit RGB JPEG or PNG) with TensorFlow's ops.

    The same pixels as :func:`decode_file`, natively and in parallel (10x faster
    on small JPEGs). A file that vanished or no longer starts as a JPEG or PNG
    goes to :func:`decode_file`, which names it.
    """
    import tensorflow as tf

    exists = tf.size(tf.io.matching_files(path)) > 0  # no NotFoundError naming nothing
    data = tf.cond(exists, lambda: tf.io.read_file(path), lambda: tf.constant(b""))
    is_png = tf.strings.substr(data, 0, len(PNG_SIGNATURE)) == PNG_SIGNATURE
    image = tf.case(
        [
            (tf.io.is_jpeg(data), lambda: _jpeg_as_pillow(data)),
            (is_png, lambda: tf.io.decode_png(data, channels=3)),
        ],
        default=lambda: decode_file(path, size),
    )
    image.set_shape([None, None, 3])
    return image


def _jpeg_as_pillow(data) -> tf.Tensor:
    import tensorflow as tf

    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")


def _decodes_plain(path: str, plain_side: int, size: int) -> bool:
    """Whether TensorFlow's decoder gives this file Pillow's pixels at this image size.

    Pillow reduces an image with both sides at least ``4 * size`` while
    decoding (``decode_with_pil``); a path with glob characters would be a
    pattern to ``tf.io.matching_files``.
    """
    return 0 < plain_side < 4 * size and not any(c in path for c in "*?[\\")


def _decode_file(path, plain, label, size: int, mode: str, tag: str = "split"):
    import tensorflow as tf

    image = tf.cond(plain, lambda: decode_plain(path, size), lambda: decode_file(path, size))
    return logged_decode(resize_image(image, size, mode), path, tag), label


def logged_decode(image, path, tag: str):
    """``image``, after printing ``pipeline-decoded <tag> <path>`` under ``PIPELINE_LOG_DECODES``.

    The line is printed by the process that runs the decode (a cluster worker, a
    tf.data service worker), which is how the tests count who decoded what.
    Read when the pipeline is built; off by default.
    """
    import sys

    import tensorflow as tf

    if not os.environ.get(LOG_DECODES):
        return image
    line = tf.strings.join(["pipeline-decoded ", tag, " ", path])  # unquoted, one tensor
    printed = tf.print(line, output_stream=sys.stderr)
    with tf.control_dependencies([printed]):
        return tf.identity(image)


def file_split(files: list[tuple[str, int, int]], root: Path, size: int, mode: str) -> Split:
    """Decodes ``[(path, label, plain_side)]`` to a split; members are paths relative to ``root``.

    ``plain_side`` is the scan's (``ScanResult.good``): files it marks plain are
    decoded with TensorFlow's ops, the others with Pillow, to the same pixels.
    """
    import tensorflow as tf

    paths = [f for f, _, _ in files]
    labels = np.array([label for _, label, _ in files], dtype=np.int32)
    plain = [_decodes_plain(f, side, size) for f, _, side in files]
    columns = (tf.constant(paths, tf.string), tf.constant(plain, tf.bool), tf.constant(labels))
    ds = tf.data.Dataset.from_tensor_slices(columns).map(
        lambda p, fast, y: _decode_file(p, fast, y, size, mode),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )

    def lookup(index, tag="train"):
        path, fast, label = (tf.gather(column, index) for column in columns)
        return _decode_file(path, fast, label, size, mode, tag)

    members = [os.path.relpath(p, root) for p in paths]
    pillow = [path for path, fast in zip(paths, plain, strict=True) if not fast]
    return Split(images=ds, count=len(paths), members=members, lookup=lookup, pillow_files=pillow)


def _fingerprint_files(files: list, extra: str, hashes: dict) -> str:
    """Names the files by path, label and the scan's pixel hash (not their mtime).

    A file restored with the same pixels keeps the fingerprint, so a run stopped by
    a file that vanished resumes once it is back; a changed image changes it.
    """
    h = hashlib.sha256(extra.encode())
    for f, label, *_ in files:
        h.update(f"{f}|{hashes[f]}|{label}\n".encode())
    return h.hexdigest()[:16]


def _drop_leaks(name: str, split: list, train_hashes: dict, hashes: dict, root: Path) -> tuple:
    """Removes from a val/test split the images that also appear in train."""
    kept, leaks = [], []
    for item in split:
        twin = train_hashes.get(hashes.get(item[0]))
        if twin is None:
            kept.append(item)
        else:
            leaks.append(
                {
                    "path": os.path.relpath(item[0], root),
                    "reason": "leakage",
                    "detail": f"{name} image also in train as {os.path.relpath(twin, root)}",
                }
            )
    return kept, leaks


@register_source("folder", identity=("path", "val_path", "test_path"), cached=True)
def load_folder(
    *,
    path: str,
    image_size: int,
    seed: int,
    resize: str = "crop",
    val_path: str | None = None,
    test_path: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    min_size: int = 8,
    max_pixels: int = 89_478_485,
    max_bad_fraction: float = 0.01,
    cache_dir: str | None = "data",
) -> Source:
    """Images in class subfolders, scanned, then split per class with a seed.

    Every file is scanned first (``pipeline.data.scan``): bad files are left
    where they are, listed in the scan report (``Source.details["scan"]``) and
    not used. Val/test images identical to a training image are dropped from
    val/test as leakage.

    Raises:
        PipelineError: a folder is missing or malformed, a val/test folder has
            a class the training folder lacks, or too many files are bad.
    """
    from pipeline.data import quarantine as scan

    if resize not in RESIZE_MODES:
        raise PipelineError(f"data.resize must be one of {RESIZE_MODES}, got {resize!r}")
    root = Path(path).expanduser()
    limits = {"min_size": min_size, "max_pixels": max_pixels, "cache_dir": cache_dir}
    train_scan = _scan_training_folder(root, limits)
    holdouts = {"test": (test_path, test_fraction), "val": (val_path, val_fraction)}
    splits, roots, extra_scans = _split_folder(train_scan, path, holdouts, seed, limits)
    scans = {"train": train_scan, **extra_scans}
    splits, leaks = _without_leaks(splits, roots, scans)
    report = _scan_report(scans, leaks)
    log.info("%s", "\n".join(scan.summary_table(r) for r in scans.values()))
    if leaks:
        log.warning("%d val/test images also appear in train; dropped from val/test", len(leaks))
    for result in scans.values():
        scan.check_bad_fraction(result, max_bad_fraction)
    _check_splits_not_empty(splits, root, allow_empty_val=val_fraction == 0 and not val_path)
    all_files = splits["train"] + splits["val"] + splits["test"]
    hashes = {p: h for result in scans.values() for p, h in result.hashes.items()}
    fp = _fingerprint_files(all_files, f"{image_size}|{resize}|{seed}", hashes)
    return Source(
        name="folder",
        train=file_split(splits["train"], roots["train"], image_size, resize),
        val=file_split(splits["val"], roots["val"], image_size, resize),
        test=file_split(splits["test"], roots["test"], image_size, resize),
        class_names=train_scan.class_names,
        fingerprint=f"folder-{fp}",
        details={"path": str(root), "val_path": val_path, "test_path": test_path, "scan": report},
    )


def _scan_training_folder(root: Path, limits: dict) -> ScanResult:
    """Scans the training folder (``data.path``); every class must keep a usable image.

    Raises:
        PipelineError: a class folder holds no usable image.
    """
    from pipeline.data import quarantine as scan

    result = scan.scan_folder(root, **limits)
    class_names = result.class_names
    empty = sorted(set(class_names) - {class_names[label] for _, label, _ in result.good})
    if empty:
        raise PipelineError(
            f"class folder(s) {empty} under {str(root)!r} hold no usable images "
            f"({', '.join(IMAGE_EXTENSIONS)}; bad files are listed by "
            "`python -m pipeline.data.scan`). Add images or remove the folder."
        )
    return result


def _split_folder(
    train_scan: ScanResult, path: str, holdouts: dict, seed: int, limits: dict
) -> tuple[dict, dict, dict]:
    """Test, then val, from their own folder or per class out of ``data.path``; train is the rest.

    Args:
        train_scan: the ``ScanResult`` of ``data.path``.
        path: ``data.path`` as given (for messages).
        holdouts: ``{"test": (folder or None, fraction), "val": (...)}``.
        seed: split seed (test uses ``seed``, val ``seed + 1``).
        limits: ``scan_folder`` keyword arguments.

    Returns:
        ``(splits, roots, scans)``, by split name: each split's ``[(file, label,
        plain_side)]``, the folder its members are relative to, and the scans of
        the val/test folders given.
    """
    root = Path(path).expanduser()
    files = train_scan.good
    labels = np.array([label for _, label, _ in files])
    pool = list(range(len(files)))
    splits: dict[str, list] = {}
    roots: dict[str, Path] = {}
    scans: dict = {}
    for offset, name in enumerate(("test", "val")):
        folder, fraction = holdouts[name]
        if folder:
            splits[name], scans[name] = _holdout_folder(
                name, folder, path, train_scan.class_names, limits
            )
            roots[name] = Path(folder).expanduser()
        else:
            kept, taken = _stratified_split(labels[pool], fraction, seed + offset)
            splits[name] = [files[pool[i]] for i in taken]
            pool = [pool[i] for i in kept]
            roots[name] = root
    splits["train"] = [files[i] for i in pool]
    roots["train"] = root
    return splits, roots, scans


def _holdout_folder(
    name: str, folder: str, path: str, class_names: list, limits: dict
) -> tuple[list, ScanResult]:
    """A val or test split from its own folder, labelled by the training folder's classes.

    Returns:
        ``([(file, label, plain_side)], scan result)``.

    Raises:
        PipelineError: the folder has a class that ``data.path`` lacks.
    """
    from pipeline.data import quarantine as scan

    extra = scan.scan_folder(folder, **limits)
    unknown = sorted(set(extra.class_names) - set(class_names))
    if unknown:
        raise PipelineError(
            f"data.{name}_path={folder!r} has classes {unknown} that "
            f"data.path={path!r} lacks. Both need the same class subfolders."
        )
    remap = {i: class_names.index(c) for i, c in enumerate(extra.class_names)}
    return [(f, remap[y], pil) for f, y, pil in extra.good], extra


def _without_leaks(splits: dict, roots: dict, scans: dict) -> tuple[dict, list]:
    """The splits with val/test images that also appear in train dropped, and those dropped."""
    hashes = {p: h for result in scans.values() for p, h in result.hashes.items()}
    train_hashes = {hashes[f]: f for f, _, _ in splits["train"]}
    kept, leaks = dict(splits), []
    for name in ("val", "test"):
        kept[name], found = _drop_leaks(name, splits[name], train_hashes, hashes, roots[name])
        leaks += found
    return kept, leaks


def _check_splits_not_empty(splits: dict, root: Path, *, allow_empty_val: bool) -> None:
    """Raises PipelineError for an empty split (val may be empty when asked for)."""
    for name in ("train", "val", "test"):
        if not splits[name] and not (name == "val" and allow_empty_val):
            raise PipelineError(
                f"the {name} split of {str(root)!r} is empty: add images, or set "
                f"data.{name}_fraction / data.{name}_path."
            )


def _scan_report(scans: dict, leaks: list) -> dict:
    """One report for the folders scanned: per folder, plus the leakage found."""
    report = {name: result.report() for name, result in scans.items()}
    report["leakage"] = leaks
    return report


def _default_tfds_splits(known: list[str], val_fraction: float) -> tuple[str, str, str]:
    pct = int(round(100 * (1.0 - val_fraction)))
    if "validation" in known and "test" in known:
        return "train", "validation", "test"
    if "validation" in known:
        return f"train[:{pct}%]", f"train[{pct}%:]", "validation"
    return f"train[:{pct}%]", f"train[{pct}%:]", "test"


@register_source("tfds", identity=("name",), seeded=False, cached=True)
def load_tfds(
    *,
    name: str,
    image_size: int,
    cache_dir: str,
    resize: str = "crop",
    train_split: str | None = None,
    val_split: str | None = None,
    test_split: str | None = None,
    val_fraction: float = 0.1,
    download: bool = True,
) -> Source:
    """A TFDS image-classification dataset, downloaded into ``cache_dir`` on first use.

    Raises:
        PipelineError: unknown dataset, one without a single image and label, a
            failed download, or (``download=False``) one not prepared in ``cache_dir``.
    """
    builder, class_names = _tfds_builder(name, cache_dir)
    info = builder.info
    if download:
        _download_tfds(builder, name, cache_dir)
    elif not builder.is_prepared():
        raise PipelineError(
            f"TFDS dataset {name!r} is not prepared under data.cache_dir={cache_dir} "
            f"(no {name}/{info.version}/ there) and data.download=false; allow the download, "
            "or point data.cache_dir at a folder where it is prepared."
        )
    defaults = _default_tfds_splits(list(info.splits.keys()), val_fraction)
    specs = [s or d for s, d in zip((train_split, val_split, test_split), defaults, strict=True)]
    train, val, test = (_tfds_split(builder, spec, image_size, resize) for spec in specs)
    return Source(
        name=name,
        train=train,
        val=val,
        test=test,
        class_names=class_names,
        fingerprint=f"tfds-{name}-{info.version}-{image_size}-{resize}-" + "|".join(specs),
        details={"tfds_version": str(info.version), "splits": specs},
    )


def _tfds_builder(name: str, cache_dir: str) -> tuple:
    """The TFDS builder of ``name`` and its class names, checked to be image classification.

    Raises:
        PipelineError: unknown dataset, or one without a single image and label.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=cache_dir)
    except Exception as err:  # tfds raises several types for an unknown name
        raise PipelineError(
            f"data.name={name!r} is not a TFDS dataset ({err}). See "
            "https://www.tensorflow.org/datasets/catalog for names."
        ) from err
    info = builder.info
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or keys[0] != "image":
        raise PipelineError(
            f"TFDS dataset {name!r} has supervised keys {keys}; an image-classification "
            "dataset with ('image', 'label') is needed."
        )
    label_feature = info.features[keys[1]]
    class_names = [str(n) for n in getattr(label_feature, "names", [])]
    if not class_names:
        raise PipelineError(f"TFDS dataset {name!r}: its label feature has no class names.")
    return builder, class_names


def _download_tfds(builder, name: str, cache_dir: str) -> None:
    """``builder.download_and_prepare()``, a failed download told in one line.

    Raises:
        PipelineError: a file that could not be fetched (no network, a server down:
            naming the URL and the offline ways), or a package the dataset needs.
    """
    from tensorflow_datasets.core.download import downloader

    retries = downloader.MAX_RETRIES
    downloader.MAX_RETRIES = min(retries, TFDS_DOWNLOAD_RETRIES)  # read at each request
    try:
        builder.download_and_prepare()
    except ModuleNotFoundError as err:  # a package this dataset's own code imports
        raise PipelineError(
            f"TFDS dataset {name!r} needs the Python package {err.name!r}, which is not "
            f"installed: pip install {err.name}"
        ) from err
    except Exception as err:
        failed = _failed_download(err)
        if failed is None:
            raise
        url, reason = failed
        raise PipelineError(
            f"cannot download the TFDS dataset {name!r} from {url} ({reason}). Offline: use "
            f"a data.cache_dir where it is already prepared (data.cache_dir={cache_dir} has no "
            f"{name}/{builder.info.version}/), or your own images with data=folder "
            "data.path=<dir>."
        ) from err
    finally:
        downloader.MAX_RETRIES = retries


def _failed_download(err: BaseException) -> tuple[str, str] | None:
    """``(url, reason)`` if ``err`` or an error it carries is a failed HTTP request, else None."""
    import requests

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, requests.RequestException):
            request = getattr(err, "request", None)
            url = getattr(request, "url", None) or "its download URL"
            if isinstance(err, requests.HTTPError) and err.response is not None:
                return url, f"HTTP {err.response.status_code}"
            if isinstance(err, requests.Timeout):
                return url, "timed out"
            if isinstance(err, requests.ConnectionError):
                return url, "no connection: no network, or the server is down"
            return url, type(err).__name__
        err = err.__cause__ or err.__context__
    return None


def _tfds_split(builder, spec: str, image_size: int, resize: str) -> Split:
    """One TFDS split spec, as RGB uint8 images at ``image_size`` and int32 labels, in order."""
    import tensorflow as tf

    ds = builder.as_dataset(split=spec, as_supervised=True, shuffle_files=False)
    ds = ds.map(
        lambda x, y: (resize_image(to_rgb(x), image_size, resize), tf.cast(y, tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    count = int(ds.cardinality())
    if count < 0:
        count = int(ds.reduce(0, lambda n, _: n + 1))
    return Split(images=ds, count=count, members=spec)


@register_source("synthetic", for_training=False)
def load_synthetic(
    *, image_size: int, seed: int, num_classes: int = 10, count: int = 2048
) -> Source:
    """Random uint8 images held in memory, for ``python -m pipeline.bench`` only.

    Args:
        image_size: height and width in pixels.
        seed: NumPy seed.
        num_classes: classes, drawn uniformly.
        count: training images; val and test hold the first 64 of them.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, count).astype(np.int32)

    def split(n):
        ds = tf.data.Dataset.from_tensor_slices((images[:n], labels[:n]))
        return Split(images=ds, count=n, members=list(range(n)))

    return Source(
        name="synthetic",
        train=split(count),
        val=split(min(count, 64)),
        test=split(min(count, 64)),
        class_names=[f"class_{i}" for i in range(num_classes)],
        fingerprint=f"synthetic-{image_size}-{num_classes}-{count}-{seed}",
    )
