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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
RESIZE_MODES = ("crop", "pad", "stretch")
SOURCES = ("digits", "folder", "tfds")


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
    else:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    """Converts a 1-, 2-, 3- or 4-channel image to 3 channels (alpha dropped)."""
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
    ds = tf.data.Dataset.from_tensor_slices((images[idx], labels[idx].astype(np.int32)))
    return Split(images=ds, count=len(idx), members=[int(i) for i in idx])


def load_digits(*, image_size: int, seed: int, test_fraction: float, val_fraction: float) -> Source:
    """scikit-learn's 8x8 digits, scaled to 0..255 and resized to ``image_size``.

    The test split takes ``test_fraction`` of each class; validation takes
    ``val_fraction`` of what is left. Members are indices into ``load_digits()``.
    """
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


def decode_file(path, use_pil) -> tf.Tensor:
    """Decodes an image file to uint8 RGB ``[H, W, 3]``.

    Args:
        path: string tensor.
        use_pil: bool tensor: decode with Pillow (EXIF orientation, odd BMPs)
            instead of TensorFlow's decoders; the scan decides per file.
    """

    def with_pil():
        from pipeline.data.scan import decode_with_pil

        def decode(p):
            p = np.asarray(p).item()
            return decode_with_pil(p.decode() if isinstance(p, bytes) else p)

        image = tf.numpy_function(decode, [path], tf.uint8)
        return tf.reshape(image, tf.concat([tf.shape(image)[:2], [3]], 0))

    def with_tf():
        return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)

    image = tf.cond(tf.cast(use_pil, tf.bool), with_pil, with_tf)
    image.set_shape([None, None, 3])
    return image


def _decode_file(path, label, use_pil, size: int, mode: str):
    return resize_image(decode_file(path, use_pil), size, mode), label


def _file_split(files: list[tuple[str, int, bool]], root: Path, size: int, mode: str) -> Split:
    paths = [f for f, _, _ in files]
    labels = np.array([label for _, label, _ in files], dtype=np.int32)
    use_pil = np.array([pil for _, _, pil in files], dtype=bool)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), labels, use_pil)).map(
        lambda p, y, pil: _decode_file(p, y, pil, size, mode),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    members = [os.path.relpath(p, root) for p in paths]
    return Split(images=ds, count=len(paths), members=members)


def _fingerprint_files(files: list, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for f, label, *_ in files:
        st = os.stat(f)
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
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
    from pipeline.data import scan

    if resize not in RESIZE_MODES:
        raise PipelineError(f"data.resize must be one of {RESIZE_MODES}, got {resize!r}")
    root = Path(path).expanduser()
    limits = {"min_size": min_size, "max_pixels": max_pixels, "cache_dir": cache_dir}
    scans = {"train": scan.scan_folder(root, **limits)}
    class_names = scans["train"].class_names
    files = scans["train"].good
    empty = sorted(set(class_names) - {class_names[label] for _, label, _ in files})
    if empty:
        raise PipelineError(
            f"class folder(s) {empty} under {str(root)!r} hold no usable images "
            f"({', '.join(IMAGE_EXTENSIONS)}; bad files are listed by "
            "`python -m pipeline.data.scan`). Add images or remove the folder."
        )
    labels = np.array([label for _, label, _ in files])
    pool = list(range(len(files)))
    splits: dict[str, list] = {}
    roots: dict[str, Path] = {}
    for name, extra_path, fraction, offset in (
        ("test", test_path, test_fraction, 0),
        ("val", val_path, val_fraction, 1),
    ):
        if extra_path:
            extra = scan.scan_folder(extra_path, **limits)
            unknown = sorted(set(extra.class_names) - set(class_names))
            if unknown:
                raise PipelineError(
                    f"data.{name}_path={extra_path!r} has classes {unknown} that "
                    f"data.path={path!r} lacks. Both need the same class subfolders."
                )
            remap = {i: class_names.index(c) for i, c in enumerate(extra.class_names)}
            splits[name] = [(f, remap[y], pil) for f, y, pil in extra.good]
            roots[name] = Path(extra_path).expanduser()
            scans[name] = extra
        else:
            kept, taken = _stratified_split(labels[pool], fraction, seed + offset)
            splits[name] = [files[pool[i]] for i in taken]
            pool = [pool[i] for i in kept]
            roots[name] = root
    splits["train"] = [files[i] for i in pool]
    roots["train"] = root
    hashes = {p: h for result in scans.values() for p, h in result.hashes.items()}
    train_hashes = {hashes[f]: f for f, _, _ in splits["train"]}
    leaks = []
    for name in ("val", "test"):
        splits[name], found = _drop_leaks(name, splits[name], train_hashes, hashes, roots[name])
        leaks += found
    report = _scan_report(scans, leaks)
    log.info("%s", "\n".join(scan.summary_table(r) for r in scans.values()))
    if leaks:
        log.warning("%d val/test images also appear in train; dropped from val/test", len(leaks))
    for result in scans.values():
        scan.check_bad_fraction(result, max_bad_fraction)
    for name in ("train", "val", "test"):
        if not splits[name] and not (name == "val" and val_fraction == 0 and not val_path):
            raise PipelineError(
                f"the {name} split of {str(root)!r} is empty: add images, or set "
                f"data.{name}_fraction / data.{name}_path."
            )
    all_files = splits["train"] + splits["val"] + splits["test"]
    fp = _fingerprint_files(all_files, f"{image_size}|{resize}|{seed}")
    return Source(
        name="folder",
        train=_file_split(splits["train"], roots["train"], image_size, resize),
        val=_file_split(splits["val"], roots["val"], image_size, resize),
        test=_file_split(splits["test"], roots["test"], image_size, resize),
        class_names=class_names,
        fingerprint=f"folder-{fp}",
        details={"path": str(root), "val_path": val_path, "test_path": test_path, "scan": report},
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
    if download:
        builder.download_and_prepare()
    defaults = _default_tfds_splits(list(info.splits.keys()), val_fraction)
    specs = [s or d for s, d in zip((train_split, val_split, test_split), defaults, strict=True)]

    def split(spec: str) -> Split:
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

    return Source(
        name=name,
        train=split(specs[0]),
        val=split(specs[1]),
        test=split(specs[2]),
        class_names=class_names,
        fingerprint=f"tfds-{name}-{info.version}-{image_size}-{resize}-" + "|".join(specs),
        details={"tfds_version": str(info.version), "splits": specs},
    )
