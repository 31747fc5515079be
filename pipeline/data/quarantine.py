"""Find bad images before training and quarantine them: report, never delete.

Every file under the class folders is opened once: zero-byte files, files that
are not images, unsupported formats, truncated or corrupt data, images too
small or too large (refused from the header, without decoding), exact
duplicates within a class and the same image under two classes. Odd but good
images (grayscale, RGBA, palette, CMYK, 16-bit, animated, EXIF-rotated) are
kept and counted; they are decoded to 8-bit RGB by :func:`decode_with_pil`,
the one decoder training, evaluation and predict use too, so what the scan
accepts decodes the same everywhere. Results are cached per file by (path,
size, mtime, ctime, inode) under ``data/scans/``: a file replaced by another of
the same size with its mtime restored changes its ctime and is scanned again.
Full-size decodes share a memory budget (:data:`DECODE_MEMORY_BYTES`): threads
wait rather than decode more at once than it holds. Files are only read. The
command is ``python -m pipeline.data.scan``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import unicodedata
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.progress import Progress

log = logging.getLogger(__name__)

SCAN_VERSION = 2  # bump when per-file results change meaning: old caches are ignored
# MPO: the multi-picture JPEG that many phones and cameras write (its first picture is used)
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF")
# Full-size decodes held in memory at once, over all threads (bytes): at most this,
# and at most a quarter of the memory available when first needed. One image
# larger than the budget is decoded alone.
DECODE_MEMORY_BYTES = 1 << 30
BYTES_PER_DECODED_PIXEL = 8  # Pillow's 4-byte pixels, plus one converted copy
HASH_ROWS = 256  # rows hashed at a time: no full-size copy of the pixels for the hash
TRIM_AFTER_BYTES = 64 << 20  # after a decode this large, hand freed memory back to the system
# Plain 8-bit RGB JPEGs and PNGs (no conversion at all) decode to the same pixels
# with TensorFlow's decoders (JPEG with dct_method="INTEGER_ACCURATE", as Pillow's
# libjpeg does), natively and in parallel: ScanResult.good gives their smaller side
# so training can use them; every other file goes through decode_with_pil.
TF_EXACT_FORMATS = ("JPEG", "PNG")
EXIF_ORIENTATION = 0x0112


@dataclass
class ScanResult:
    """The outcome of scanning one image folder.

    Attributes:
        root: the folder scanned.
        class_names: class subfolder names, sorted.
        good: ``[(path, label, plain_side)]`` of the files to train on;
            ``plain_side`` is the smaller side of a plain JPEG or PNG that
            TensorFlow's decoder reads to the same pixels, 0 for other files.
        bad: ``[{"path", "class", "reason", "detail"}]`` of quarantined files.
        conversions: ``{conversion: count}`` among the good files.
        hashes: ``{path: pixel hash}`` of the good files (for leakage checks).
        seconds: wall time of the scan; cached: files answered from the cache.
    """

    root: Path
    class_names: list[str]
    good: list[tuple[str, int, bool]]
    bad: list[dict]
    conversions: dict[str, int]
    hashes: dict[str, str]
    seconds: float = 0.0
    cached: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.good) + len(self.bad)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / max(self.total, 1)

    def report(self) -> dict:
        """The JSON-serializable report (``scan_report.json``)."""
        return {
            "root": str(self.root),
            "total": self.total,
            "good": len(self.good),
            "bad": len(self.bad),
            "bad_fraction": self.bad_fraction,
            "by_reason": dict(Counter(b["reason"] for b in self.bad)),
            "conversions": self.conversions,
            "class_counts": dict(
                Counter(self.class_names[label] for _, label, _ in self.good).most_common()
            ),
            "seconds": round(self.seconds, 3),
            "cached_files": self.cached,
            "bad_files": self.bad,
            **self.extra,
        }


class DecodeBudget:
    """Bytes of decoded pixels the process may hold at once; callers wait for room.

    Args:
        total: the budget in bytes. A request larger than all of it waits until
            nothing else is held, then runs alone.
    """

    def __init__(self, total: int):
        if total < 1:
            raise ValueError(f"total must be >= 1 byte, got {total}")
        self.total = total
        self.used = 0
        self._room = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        """Holds ``nbytes`` of the budget for the ``with`` block."""
        nbytes = max(0, min(int(nbytes), self.total))
        with self._room:
            self._room.wait_for(lambda: self.used + nbytes <= self.total)
            self.used += nbytes
        try:
            yield
        finally:
            with self._room:
                self.used -= nbytes
                self._room.notify_all()
            if nbytes >= TRIM_AFTER_BYTES:
                _return_freed_memory()


def _return_freed_memory() -> None:
    """Asks glibc to give freed heap memory back to the system (a no-op elsewhere).

    Pillow allocates a large image in 16 MiB blocks, which glibc serves from each
    thread's own heap once its mmap threshold has grown; freed, they stay in that
    heap, so N scanning threads would keep N full-size images resident.
    """
    import ctypes

    with contextlib.suppress(AttributeError, OSError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


_BUDGET: list[DecodeBudget] = []  # the process's one budget, made on first use
_BUDGET_LOCK = threading.Lock()


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def decode_budget() -> DecodeBudget:
    """The process's decode budget: ``DECODE_MEMORY_BYTES``, at most a quarter of free memory."""
    with _BUDGET_LOCK:
        if not _BUDGET:
            available = _available_memory()
            limit = DECODE_MEMORY_BYTES if available is None else available // 4
            _BUDGET.append(DecodeBudget(max(64 << 20, min(DECODE_MEMORY_BYTES, limit))))
        return _BUDGET[0]


def _pixel_hash(image, mode: str) -> str:
    """A hash of a loaded image's pixels, mode and size, hashed in strips of rows."""
    digest = hashlib.blake2b(digest_size=16)
    width, height = image.size
    for top in range(0, height, HASH_ROWS):  # = hashing image.tobytes(), without its copy
        digest.update(image.crop((0, top, width, min(height, top + HASH_ROWS))).tobytes())
    digest.update(f"{mode}{image.size}".encode())
    return digest.hexdigest()


def _png_bit_depth(path: str) -> int:
    with open(path, "rb") as f:
        header = f.read(25)
    return header[24] if len(header) == 25 and header[12:16] == b"IHDR" else 8


def inspect_file(path: str, *, max_pixels: int) -> dict:
    """Opens one file and says what it is; never raises for a bad file.

    Args:
        path: the file.
        max_pixels: images with more pixels are refused from the header alone.

    Returns:
        ``{"ok": bool, "reason", "detail", "format", "width", "height",
        "conversions": [...], "hash"}``.
    """
    from PIL import Image, UnidentifiedImageError

    def bad(reason, detail="", **facts):
        return {"ok": False, "reason": reason, "detail": detail, **facts}

    if os.path.getsize(path) == 0:
        return bad("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            image = Image.open(path)
    except UnidentifiedImageError:
        return bad("not an image", "no image format recognised in its bytes")
    except Image.DecompressionBombError as err:  # Pillow's own header check, past 2x its limit
        return bad("too large", str(err))
    except Exception as err:  # Pillow raises many types for broken headers
        return bad("corrupt or truncated", f"{type(err).__name__}: {err}")
    with image:
        fmt, (width, height) = image.format, image.size
        facts = {"format": fmt, "width": width, "height": height}
        if fmt not in SUPPORTED_FORMATS:
            return bad("unsupported format", f"{fmt}; supported: {SUPPORTED_FORMATS}", **facts)
        if width * height > max_pixels:
            return bad(
                "too large",
                f"{width}x{height} = {width * height} pixels > data.max_pixels={max_pixels}",
                **facts,
            )
        conversions = _header_conversions(image, path)
        mode = image.mode  # before loading, which can change it (GIF frames)
        with decode_budget().hold(BYTES_PER_DECODED_PIXEL * width * height):
            try:
                image.seek(0)
                image.load()
                # PNG can keep EXIF after the pixels: read it once they are loaded
                if image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
                    conversions.append("exif-rotated")
            except Exception as err:  # truncated or corrupt data
                return bad("corrupt or truncated", f"{type(err).__name__}: {err}", **facts)
            digest = _pixel_hash(image, mode)
    return {
        "ok": True,
        "reason": None,
        "detail": "",
        **facts,
        "conversions": conversions,
        "hash": digest,
    }


def _header_conversions(image, path: str) -> list[str]:
    """What decoding an opened Pillow image to 8-bit RGB will convert, from its header."""
    conversions = []
    if getattr(image, "n_frames", 1) > 1:  # counting frames seeks: read the mode after
        conversions.append("multi-picture" if image.format == "MPO" else "animated")
    fmt, mode = image.format, image.mode
    if mode in ("L", "1", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        conversions.append("grayscale")
    if mode in ("RGBA", "LA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        conversions.append("alpha")
    if mode == "P":
        conversions.append("palette")
    if mode == "CMYK":
        conversions.append("cmyk")
    if mode.startswith("I;16") or (fmt == "PNG" and _png_bit_depth(path) == 16):
        conversions.append("16-bit")
    if fmt == "BMP" and mode not in ("RGB", "RGBA"):
        conversions.append("bmp-non-rgb")
    return conversions


def decode_with_pil(path: str, size: int | None = None) -> np.ndarray:
    """Decodes any supported image to 8-bit RGB ``[H, W, 3]``, EXIF orientation applied.

    The package's one image decoder: the scan accepts what it decodes, and
    training, evaluation and predict decode with it, so a file the scan passed
    decodes to the same pixels everywhere. The full-size decode holds its share
    of :func:`decode_budget` while it runs.

    Args:
        path: the file.
        size: the side the image will be resized to; None decodes at full size.
            Otherwise the image is reduced while decoding where the format
            allows (JPEG's DCT scaling), then by a whole factor, keeping both
            sides at least ``2 * size``: a 9000x9000 image never reaches the
            resize at full size.
    """
    from PIL import Image, ImageOps

    keep = None if size is None else 2 * int(size)
    with Image.open(path) as image:
        image.seek(0)  # first frame of an animation, first picture of an MPO
        if keep and image.format in ("JPEG", "MPO"):
            image.draft(None, (keep, keep))  # decodes at 1/2, 1/4 or 1/8 scale when it can
        sixteen = image.mode.startswith("I;16")
        width, height = image.size
        with decode_budget().hold(BYTES_PER_DECODED_PIXEL * width * height):
            image.load()
            image = ImageOps.exif_transpose(_reduced(image, keep))
            return _rgb8(image, sixteen)


def _reduced(image, keep: int | None):
    """The loaded image shrunk by the largest whole factor that keeps both sides >= ``keep``."""
    factor = 1 if keep is None else min(image.size) // keep
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # same values, in a mode Pillow can reduce
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):
        image = image.convert("RGB")  # palette, CMYK, 1-bit: as the final conversion would
    return image.reduce(factor)


def _rgb8(image, sixteen: bool) -> np.ndarray:
    """A Pillow image as 8-bit RGB: 16-bit and float grey scaled to 0..255, alpha dropped."""
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image).astype(np.float64)
        peak = 65535.0 if pixels.max() > 255 or sixteen else 255.0
        grey = np.clip(np.round(pixels * 255.0 / peak), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def list_class_files(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Every non-hidden file under each class subfolder, whatever its extension."""
    if not root.is_dir():
        raise PipelineError(
            f"data.path={str(root)!r} is not a folder. Point data.path at a folder "
            "holding one subfolder of images per class."
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unprintable = [name for name in classes if _has_control_characters(name)]
    if unprintable:
        raise PipelineError(
            f"class folder name(s) {', '.join(repr(n) for n in unprintable)} under "
            f"{str(root)!r} hold a newline or other control character, which would garble "
            "logs, reports and class_names.json. Rename the folder(s)."
        )
    if not classes:
        raise PipelineError(
            f"{str(root)!r} has no class subfolders. Expected {root}/<class_name>/<image files>."
        )
    files = []
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            hidden = any(part.startswith(".") for part in p.relative_to(root).parts)
            if p.is_file() and not hidden:
                files.append((str(p), label))
    return classes, files


def _has_control_characters(name: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name)  # \n, \t, \x1b...


def _cache_path(cache_dir: str | os.PathLike, root: Path) -> Path:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / "scans" / f"{key}.json"


def _load_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache.get("files", {}) if cache.get("version") == SCAN_VERSION else {}


def _save_cache(path: Path, root: Path, files: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": SCAN_VERSION, "root": str(root), "files": files}))
    os.replace(tmp, path)


def scan_folder(
    root: str | os.PathLike,
    *,
    min_size: int = 8,
    max_pixels: int = 89_478_485,
    cache_dir: str | os.PathLike | None = "data",
    workers: int | None = None,
    progress: bool = True,
) -> ScanResult:
    """Scans a class-per-subfolder image folder; reads files, changes nothing.

    Args:
        root: folder with one subfolder per class.
        min_size: images whose shorter side is smaller (pixels) are refused.
        max_pixels: images with more pixels are refused from the header.
        cache_dir: where per-file results are cached (``<cache_dir>/scans/``);
            None turns the cache off.
        workers: threads opening files (Pillow decodes without the GIL).
        progress: print progress to stderr.

    Returns:
        A ``ScanResult``.
    """
    start = time.perf_counter()
    root = Path(root).expanduser()
    class_names, files = list_class_files(root)
    cache_file = _cache_path(cache_dir, root) if cache_dir else None
    cache = _load_cache(cache_file) if cache_file else {}
    results: dict[str, dict] = {}
    todo = []
    for path, _ in files:
        rel = os.path.relpath(path, root)
        st = os.stat(path)
        reuse = _cached_result(cache.get(rel), _file_key(st), max_pixels)
        if reuse is not None:
            results[path] = reuse
            continue
        todo.append((path, rel, st))
    cached = len(results)
    if todo:
        threads = workers or min(8, 2 * (os.cpu_count() or 1))
        detail = f"{cached} more from the cache" if cached else ""
        shown = Progress("scanning", len(todo), unit="files", detail=detail) if progress else None
        with ThreadPoolExecutor(max_workers=threads) as pool, shown or contextlib.nullcontext():
            scanned = pool.map(lambda item: inspect_file(item[0], max_pixels=max_pixels), todo)
            for (path, rel, st), result in zip(todo, scanned, strict=True):
                results[path] = result
                cache[rel] = {**_file_key(st), "result": result}
                if shown:
                    shown.advance()
        if cache_file:
            _save_cache(cache_file, root, cache)
    return _judge(root, class_names, files, results, min_size, max_pixels, start, cached)


def _file_key(st: os.stat_result) -> dict:
    """What says a file is unchanged: ctime changes even when a copy restores the mtime."""
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
    }


def _cached_result(hit, key: dict, max_pixels: int) -> dict | None:
    """A cached per-file result still valid for this file and ``max_pixels``, else None."""
    if not isinstance(hit, dict) or not isinstance(hit.get("result"), dict):
        return None
    if any(hit.get(k) != v for k, v in key.items()):
        return None
    result = hit["result"]
    if not result.get("ok") and result.get("reason") == "too large":
        # refused from its header, never decoded: scan it again if max_pixels now admits it.
        # Pillow's own refusal (past twice its limit) records no size and stays refused.
        width, height = result.get("width"), result.get("height")
        if width is not None and height is not None and width * height <= max_pixels:
            return None
    return result


def _judge(root, class_names, files, results, min_size, max_pixels, start, cached) -> ScanResult:
    """Applies the size limits and the cross-file checks (duplicates, label conflicts)."""
    bad, candidates = [], []
    for path, label in files:
        r = results[path]
        rel = os.path.relpath(path, root)
        entry = {"path": rel, "class": class_names[label]}
        if not r["ok"]:
            bad.append({**entry, "reason": r["reason"], "detail": r["detail"]})
        elif r["ok"] and r["width"] * r["height"] > max_pixels:
            detail = f"{r['width']}x{r['height']} pixels > data.max_pixels={max_pixels}"
            bad.append({**entry, "reason": "too large", "detail": detail})
        elif r["ok"] and min(r["width"], r["height"]) < min_size:
            detail = f"{r['width']}x{r['height']} < data.min_size={min_size}"
            bad.append({**entry, "reason": "too small", "detail": detail})
        else:
            candidates.append((path, label, r))
    by_hash = defaultdict(list)
    for path, label, r in candidates:
        by_hash[r["hash"]].append((path, label))
    good, conversions, hashes = [], Counter(), {}
    for path, label, r in candidates:
        rel = os.path.relpath(path, root)
        entry = {"path": rel, "class": class_names[label]}
        copies = by_hash[r["hash"]]
        labels = sorted({class_names[lab] for _, lab in copies})
        if len(labels) > 1:
            others = [os.path.relpath(p, root) for p, _ in copies if p != path]
            detail = f"same image in classes {labels}: {others}"
            bad.append({**entry, "reason": "label conflict", "detail": detail})
            continue
        first = copies[0][0]
        if first != path:
            detail = f"same image as {os.path.relpath(first, root)}"
            bad.append({**entry, "reason": "duplicate", "detail": detail})
            continue
        conversions.update(r["conversions"])
        good.append((path, label, _plain_side(r)))
        hashes[path] = r["hash"]
    bad.sort(key=lambda b: b["path"])
    return ScanResult(
        root=root,
        class_names=class_names,
        good=good,
        bad=bad,
        conversions=dict(conversions),
        hashes=hashes,
        seconds=time.perf_counter() - start,
        cached=cached,
    )


def _plain_side(facts: dict) -> int:
    """The smaller side of a file TensorFlow decodes to Pillow's pixels, else 0."""
    plain = facts["format"] in TF_EXACT_FORMATS and not facts["conversions"]
    return min(facts["width"], facts["height"]) if plain else 0


def summary_table(result: ScanResult) -> str:
    """A console summary: counts by reason and by conversion, and the first bad files."""
    lines = [
        f"Scanned {result.total} files in {result.root} in {result.seconds:.1f} s "
        f"({result.cached} from cache): {len(result.good)} good, {len(result.bad)} quarantined "
        f"({100 * result.bad_fraction:.2f}%).",
    ]
    reasons = Counter(b["reason"] for b in result.bad)
    if reasons:
        lines.append("  quarantined (left in place, not used):")
        lines += [f"    {reason:<22} {n:>7}" for reason, n in reasons.most_common()]
        lines += [f"      {b['path']}: {b['reason']}" for b in result.bad[:5]]
        if len(result.bad) > 5:
            lines.append(f"      ... and {len(result.bad) - 5} more in scan_report.json")
    if result.conversions:
        lines.append("  converted to 8-bit RGB (kept):")
        lines += [f"    {name:<22} {n:>7}" for name, n in sorted(result.conversions.items())]
    return "\n".join(lines)


def check_bad_fraction(result: ScanResult, max_bad_fraction: float) -> None:
    """Stops when too much of the folder is bad.

    Raises:
        PipelineError: the bad fraction exceeds ``max_bad_fraction``.
    """
    if result.bad_fraction > max_bad_fraction:
        raise PipelineError(
            f"{len(result.bad)} of {result.total} files in {str(result.root)!r} are bad "
            f"({100 * result.bad_fraction:.1f}% > data.max_bad_fraction="
            f"{100 * max_bad_fraction:g}%). See scan_report.json for each file and its reason; "
            "fix or remove them yourself, or raise data.max_bad_fraction to train on the rest."
        )
