"""What the scan accepts, training decodes the same way; its cache and memory hold up."""

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import REPO, png_header_only
from pipeline.data import quarantine as scan
from pipeline.data.sources import (
    _decodes_plain,
    decode_file,
    decode_plain,
    file_split,
    load_folder,
    resize_image,
)
from pipeline.errors import PipelineError, carried_user_error, user_errors


def _picture(seed, size=(24, 20)):
    """A distinct RGB picture: red left half, blue right half, seeded noise."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2] = (220, 20, 20)
    pixels[:, w // 2 :] = (20, 20, 220)
    noise = np.random.default_rng(seed).integers(0, 30, pixels.shape, dtype=np.uint8)
    return Image.fromarray(pixels + noise)


def _bmp16(path: Path, picture: Image.Image, *, rgb565: bool) -> None:
    """A 16-bit BMP (Pillow writes none): RGB565 with bit fields, or RGB555 plain."""
    rgb = np.asarray(picture, np.uint16)
    h, w, _ = rgb.shape
    if rgb565:
        words = (rgb[..., 0] >> 3) << 11 | (rgb[..., 1] >> 2) << 5 | rgb[..., 2] >> 3
        compression, masks = 3, struct.pack("<III", 0xF800, 0x07E0, 0x001F)
    else:
        words = (rgb[..., 0] >> 3) << 10 | (rgb[..., 1] >> 3) << 5 | rgb[..., 2] >> 3
        compression, masks = 0, b""
    row = w * 2 + (-w * 2) % 4
    rows = b"".join(words[y].astype("<u2").tobytes().ljust(row, b"\0") for y in reversed(range(h)))
    offset = 14 + 40 + len(masks)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 16, compression, len(rows), 2835, 2835, 0, 0)
    header = b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset)
    path.write_bytes(header + info + masks + rows)


def _odd_file(kind: str, folder: Path) -> Path:
    """Writes one image of an odd but valid kind; returns its path."""
    picture = _picture(sum(map(ord, kind)))
    path = folder / f"{kind}.{kind.split('-')[0]}"
    if kind in ("bmp-rgb565", "bmp-rgb555"):
        _bmp16(path, picture, rgb565=kind == "bmp-rgb565")
    elif kind == "bmp-palette":
        picture.convert("P").save(path)
    elif kind == "bmp-rgba":
        picture.convert("RGBA").save(path)
    elif kind == "bmp-grey":
        picture.convert("L").save(path)
    elif kind == "jpg-mpo":  # what phones and cameras write: two JPEGs in one file
        picture.save(path, format="MPO", save_all=True, append_images=[_picture(99)])
    elif kind == "jpg-progressive":
        picture.save(path, progressive=True, quality=90)
    elif kind == "jpg-cmyk":
        picture.convert("CMYK").save(path, quality=95)
    elif kind == "jpg-grey":
        picture.convert("L").save(path, quality=95)
    elif kind == "jpg-rotated":
        exif = Image.Exif()
        exif[scan.EXIF_ORIENTATION] = 8
        picture.save(path, exif=exif, quality=95)
    elif kind == "png-16bit":
        path.write_bytes(tf.io.encode_png(np.asarray(picture, np.uint16) * 257).numpy())
    elif kind in ("png-1bit", "png-la", "png-interlaced"):
        mode = {"png-1bit": "1", "png-la": "LA", "png-interlaced": "RGB"}[kind]
        picture.convert(mode).save(path, interlace=kind == "png-interlaced")
    elif kind == "gif-transparent":
        picture.convert("P").save(path, transparency=0)
    elif kind == "jpg-plain":
        picture.save(path, quality=75)
    elif kind == "png-plain":
        picture.save(path)
    elif kind == "png-rgb-transparent":  # an RGB PNG with a tRNS colour: not alpha to Pillow
        picture.save(path, transparency=(220, 20, 20))
    return path


ODD_KINDS = [
    "bmp-rgb565",
    "bmp-rgb555",
    "bmp-palette",
    "bmp-rgba",
    "bmp-grey",
    "jpg-mpo",
    "jpg-progressive",
    "jpg-cmyk",
    "jpg-grey",
    "jpg-rotated",
    "png-16bit",
    "png-1bit",
    "png-la",
    "png-interlaced",
    "gif-transparent",
    "jpg-plain",
    "png-plain",
    "png-rgb-transparent",
]
# what TensorFlow's decoders read to Pillow's pixels, so training decodes them natively
TF_DECODED = {"jpg-plain", "jpg-progressive", "png-plain", "png-interlaced", "png-rgb-transparent"}


@pytest.mark.parametrize("kind", ODD_KINDS)
def test_what_the_scan_accepts_training_decodes_to_the_same_pixels(kind, tmp_path):
    path = _odd_file(kind, tmp_path)
    facts = scan.inspect_file(str(path), max_pixels=10**6)
    assert facts["ok"], facts  # an MPO was "unsupported format" before
    seen = scan.decode_with_pil(str(path))
    # TensorFlow's decoders failed on 16-bit BMPs with a traceback naming no file
    decoded = decode_file(tf.constant(str(path)), size=16).numpy()
    assert decoded.dtype == np.uint8 and decoded.shape == seen.shape
    np.testing.assert_array_equal(decoded, seen)
    plain_side = scan._plain_side(facts)
    assert (plain_side > 0) == (kind in TF_DECODED)  # decoded by TensorFlow's ops in training
    split = file_split([(str(path), 0, plain_side)], tmp_path, 16, "crop")
    ((image, label),) = list(split.images.as_numpy_iterator())
    assert label == 0 and split.members == [path.name]
    np.testing.assert_array_equal(image, resize_image(seen, 16, "crop").numpy())


def test_tensorflow_decodes_plain_files_as_pillow_does_while_pillow_reduces_large_ones(tmp_path):
    small, large = tmp_path / "small.jpg", tmp_path / "large.jpg"
    _picture(1, size=(40, 30)).save(small, quality=75)
    _picture(2, size=(160, 140)).save(large, quality=75)  # both sides >= 4 x 16: reduced
    tf_pixels = decode_plain(tf.constant(str(small))).numpy()
    np.testing.assert_array_equal(tf_pixels, scan.decode_with_pil(str(small)))
    assert _decodes_plain(str(small), 30, 16) and not _decodes_plain(str(large), 140, 16)
    assert not _decodes_plain(str(tmp_path / "a[1].jpg"), 30, 16)  # a glob pattern to TF
    files = [(str(small), 0, 30), (str(large), 1, 140)]
    images = [x for x, _ in file_split(files, tmp_path, 16, "crop").images.as_numpy_iterator()]
    for image, path in zip(images, (small, large), strict=True):
        expected = resize_image(scan.decode_with_pil(str(path), 16), 16, "crop").numpy()
        np.testing.assert_array_equal(image, expected)


def test_a_replaced_file_with_its_mtime_restored_is_scanned_again(tmp_path):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        _picture(i).save(folder / f"{i}.bmp")
    first = scan.scan_folder(tmp_path / "images", cache_dir=tmp_path, progress=False)
    target = folder / "0.bmp"
    before = target.stat()
    junk = b"not an image. " * (before.st_size // 14 + 1)  # random bytes can look like one
    target.write_bytes(junk[: before.st_size])  # same size: not an image any more
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `touch -r` does
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (
        before.st_size,
        before.st_mtime_ns,
    )
    again = scan.scan_folder(tmp_path / "images", cache_dir=tmp_path, progress=False)
    assert first.bad == [] and again.cached == 2
    assert [(b["path"], b["reason"]) for b in again.bad] == [("a/0.bmp", "not an image")]


def _two_class_folder(images):
    """Classes a and b, five distinct PNGs each."""
    for name in ("a", "b"):
        (images / name).mkdir(parents=True)
        for i in range(5):
            _picture(i + 10 * ord(name)).save(images / name / f"{i}.png")
    return images


def test_scan_then_train_on_a_folder_with_a_decompression_bomb(tmp_path):
    images = _two_class_folder(tmp_path / "images")
    png_header_only(images / "a" / "bomb.png", 20_000, 20_000)  # past twice Pillow's limit
    first = scan.scan_folder(images, cache_dir=tmp_path, progress=False)
    assert [b["reason"] for b in first.bad] == ["too large"]
    # a second scan (what training does next) reused the cache: KeyError: 'width'
    again = scan.scan_folder(images, cache_dir=tmp_path, progress=False, max_pixels=10**12)
    assert again.cached == again.total and [b["reason"] for b in again.bad] == ["too large"]
    source = load_folder(
        path=str(images),
        image_size=16,
        seed=0,
        val_fraction=0.2,
        test_fraction=0.2,
        max_bad_fraction=0.5,
        cache_dir=str(tmp_path),
    )
    assert source.details["scan"]["train"]["by_reason"] == {"too large": 1}


@pytest.mark.parametrize("name", ["cat\ndog", "tab\there", "\x1b[31mred", "line\u2028break"])
def test_class_folder_names_with_control_characters_are_refused(name, tmp_path):
    (tmp_path / "fine").mkdir()
    (tmp_path / name).mkdir()
    with pytest.raises(PipelineError, match="control character") as err:
        scan.scan_folder(tmp_path, cache_dir=None, progress=False)
    assert repr(name) in str(err.value) and "Rename" in str(err.value)


@pytest.mark.parametrize("plain_side", [0, 20], ids=["pillow", "tensorflow"])
def test_a_file_gone_after_the_scan_is_named_in_one_line(plain_side, tmp_path, capsys):
    files = []
    for i in range(3):
        _picture(i).save(tmp_path / f"{i}.png")
        files.append((str(tmp_path / f"{i}.png"), 0, plain_side))
    (tmp_path / "2.png").write_bytes(b"garbage now")  # replaced after the scan
    split = file_split(files, tmp_path, 16, "crop")
    (tmp_path / "1.png").unlink()
    with pytest.raises(tf.errors.OpError) as raised:  # a NotFoundError naming no file, before
        list(split.images)
    err = carried_user_error(raised.value)
    assert err is not None and "\n" not in str(err)
    assert str(tmp_path / "1.png") in str(err) and "deleted or changed after the scan" in str(err)
    with pytest.raises(SystemExit) as stop, user_errors():
        list(split.images)
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read image file '{tmp_path}")
    _picture(1).save(tmp_path / "1.png")
    with pytest.raises(tf.errors.OpError) as raised:
        list(split.images)
    assert str(tmp_path / "2.png") in str(carried_user_error(raised.value))


def test_the_fingerprint_follows_the_pixels_not_the_mtime(tmp_path):
    images = _two_class_folder(tmp_path / "images")

    def fingerprint():
        options = {"val_fraction": 0.2, "test_fraction": 0.2, "cache_dir": None}
        return load_folder(path=str(images), image_size=16, seed=0, **options).fingerprint

    first = fingerprint()
    restored = images / "a" / "0.png"
    data = restored.read_bytes()
    restored.unlink()
    restored.write_bytes(data)  # put back as it was, with a new mtime: resume still matches
    assert fingerprint() == first
    _picture(77).save(restored)
    assert fingerprint() != first


MEASURE = """
import resource, sys
from pipeline.data import quarantine as scan
scan.DECODE_MEMORY_BYTES = 200 << 20  # one 4000x4000 decode at a time (128 MB estimated)
paths = sys.argv[2:]
if sys.argv[1] == "scan":
    result = scan.scan_folder(paths[0], cache_dir=None, workers=4, progress=False)
    assert len(result.good) == 4, result.bad
elif sys.argv[1] == "decode":
    for path in paths:
        assert scan.decode_with_pil(path, 32).shape[0] >= 64
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)  # MiB (Linux: KiB)
"""


def _peak_mib(*args) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEASURE), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB on Linux")
def test_large_images_are_decoded_within_the_memory_budget(tmp_path):
    folder = tmp_path / "images" / "big"
    folder.mkdir(parents=True)
    pixels = np.zeros((4000, 4000, 3), np.uint8)
    for i in range(4):  # 4000x4000 (64 MB decoded by Pillow), a few hundred KB as PNG
        pixels[:, : 1000 * (i + 1)] = (200, 30 * i, 10)
        Image.fromarray(pixels).save(folder / f"{i}.png", compress_level=1)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=90)
    baseline = _peak_mib("none")
    scanned = _peak_mib("scan", str(tmp_path / "images")) - baseline
    decoded = _peak_mib("decode", *map(str, sorted(folder.iterdir())), str(tmp_path / "big.jpg"))
    # unbounded: 4 threads x (64 MB decoded + 48 MB copy for the hash) = 450 MB and more
    assert scanned < 200, scanned
    assert decoded - baseline < 200, decoded - baseline
