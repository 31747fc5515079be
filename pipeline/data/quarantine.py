"""Find bad images before training and quarantine them: report, never delete.

Every file under the class folders is opened once: zero-byte files, files that
are not images, unsupported formats, truncated or corrupt data, images too
small or too large (refused from the header, without decoding), exact
duplicates within a class and the same image under two classes. Odd but good
images (grayscale, RGBA, palette, CMYK, 16-bit, animated, EXIF-rotated) are
kept and counted; they are decoded to 8-bit RGB. Results are cached per file
by (path, size, mtime) under ``data/scans/``, so a second scan costs little.
Files are only read. The command is ``python -m pipeline.data.scan``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

SCAN_VERSION = 1  # bump when per-file results change meaning: old caches are ignored
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF")
# Conversions TensorFlow's own decoders do not make (EXIF orientation) or cannot
# (palette/16-bit BMPs): such files are decoded with Pillow instead.
PIL_CONVERSIONS = {"exif-rotated", "bmp-non-rgb"}
EXIF_ORIENTATION = 0x0112


@dataclass
class ScanResult:
    """The outcome of scanning one image folder.

    Attributes:
        root: the folder scanned.
        class_names: class subfolder names, sorted.
        good: ``[(path, label, needs_pil)]`` of the files to train on.
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
        try:
            image.seek(0)
            image.load()
            # PNG can keep EXIF after the pixels: read it once they are loaded
            if image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
                conversions.append("exif-rotated")
        except Exception as err:  # truncated or corrupt data
            return bad("corrupt or truncated", f"{type(err).__name__}: {err}", **facts)
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(f"{mode}{image.size}".encode())
    return {
        "ok": True,
        "reason": None,
        "detail": "",
        **facts,
        "conversions": conversions,
        "hash": digest.hexdigest(),
    }


def _header_conversions(image, path: str) -> list[str]:
    """What decoding an opened Pillow image to 8-bit RGB will convert, from its header."""
    conversions = []
    if getattr(image, "n_frames", 1) > 1:  # counting frames seeks: read the mode after
        conversions.append("animated")
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


def decode_with_pil(path: str) -> np.ndarray:
    """Decodes any supported image to 8-bit RGB ``[H, W, 3]``, EXIF orientation applied."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.seek(0)  # first frame of an animation
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I") or image.mode == "F":
            pixels = np.asarray(image).astype(np.float64)
            peak = 65535.0 if pixels.max() > 255 or image.mode.startswith("I;16") else 255.0
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


def _progress(done: int, total: int, start: float) -> None:
    if not sys.stderr.isatty() and done not in (total,) and done % 10_000:
        return
    rate = done / max(time.perf_counter() - start, 1e-9)
    end = "\n" if done == total else "\r"
    print(f"  scanning {done}/{total} files ({rate:,.0f}/s)", end=end, file=sys.stderr, flush=True)


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
        hit = cache.get(rel)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            reuse = hit["result"]
            # a file refused as too large under a smaller max_pixels was never decoded
            refused = reuse.get("reason") == "too large"
            if not (refused and reuse["width"] * reuse["height"] <= max_pixels):
                results[path] = reuse
                continue
        todo.append((path, rel, st))
    cached = len(results)
    if todo:
        with ThreadPoolExecutor(max_workers=workers or min(8, 2 * (os.cpu_count() or 1))) as pool:
            scanned = pool.map(lambda item: inspect_file(item[0], max_pixels=max_pixels), todo)
            for i, ((path, rel, st), result) in enumerate(zip(todo, scanned, strict=True), 1):
                results[path] = result
                cache[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "result": result}
                if progress:
                    _progress(cached + i, len(files), start)
        if cache_file:
            _save_cache(cache_file, root, cache)
    return _judge(root, class_names, files, results, min_size, max_pixels, start, cached)


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
        good.append((path, label, bool(PIL_CONVERSIONS & set(r["conversions"]))))
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
