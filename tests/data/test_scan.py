"""Bad-image quarantine: every kind of bad file is reported, good odd ones are kept."""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import compose, png_header_only, run_module
from pipeline.data import quarantine as scan
from pipeline.data.sources import decode_file, load_folder
from pipeline.errors import PipelineError
from pipeline.train import train

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _picture(seed, size=(24, 20)):
    """A distinct RGB picture: left half red, right half blue, plus seeded noise."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2] = RED
    pixels[:, w // 2 :] = BLUE
    noise = np.random.default_rng(seed).integers(0, 30, pixels.shape, dtype=np.uint8)
    return Image.fromarray(pixels + noise)


def _write_dirty_folder(root: Path) -> dict[str, str]:
    """Writes one file of each kind; returns {relative path: expected reason or 'ok'}."""
    a, b = root / "apple", root / "banana"
    a.mkdir(parents=True)
    b.mkdir()
    expected = {}
    for i in range(6):  # plain good images
        _picture(i).save(a / f"good{i}.jpg", quality=95)
        _picture(100 + i).save(b / f"good{i}.png")
        expected[f"apple/good{i}.jpg"] = expected[f"banana/good{i}.png"] = "ok"
    (a / "empty.jpg").write_bytes(b"")
    expected["apple/empty.jpg"] = "empty file"
    (a / "notes.jpg").write_text("these are not pixels")
    expected["apple/notes.jpg"] = "not an image"
    buf = io.BytesIO()
    _picture(7, (64, 64)).save(buf, format="JPEG")
    (a / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expected["apple/truncated.jpg"] = "corrupt or truncated"
    buf = io.BytesIO()
    _picture(8, (64, 64)).save(buf, format="PNG")
    (b / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    expected["banana/truncated.png"] = "corrupt or truncated"
    _picture(9).save(a / "scan.tiff")
    expected["apple/scan.tiff"] = "unsupported format"
    _picture(10, (4, 4)).save(a / "tiny.png")
    expected["apple/tiny.png"] = "too small"
    png_header_only(b / "bomb.png", 12_000, 12_000)  # 144M pixels > data.max_pixels
    expected["banana/bomb.png"] = "too large"
    shutil.copy(a / "good0.jpg", a / "good0_copy.jpg")
    expected["apple/good0_copy.jpg"] = "duplicate"
    _picture(11).save(a / "both.png")
    _picture(11).save(b / "both.png")
    expected["apple/both.png"] = expected["banana/both.png"] = "label conflict"
    # Odd but good: converted to 8-bit RGB and kept.
    frames = [_picture(12).convert("P"), _picture(13).convert("P")]
    frames[0].save(b / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    _picture(14).convert("L").save(b / "grey.png")
    _picture(15).convert("RGBA").save(b / "alpha.png")
    _picture(16).convert("P").save(b / "palette.png")
    _picture(17).convert("CMYK").save(b / "cmyk.jpg", quality=95)
    grey16 = (np.asarray(_picture(18).convert("L"), np.uint16) * 257).astype(np.uint16)
    (b / "grey16.png").write_bytes(tf.io.encode_png(grey16[..., None]).numpy())
    rgb16 = np.asarray(_picture(19), np.uint16) * 257
    (b / "rgb16.png").write_bytes(tf.io.encode_png(rgb16).numpy())
    exif = Image.Exif()
    exif[scan.EXIF_ORIENTATION] = 6  # stored sideways: display rotated 90 degrees clockwise
    _picture(20).save(b / "rotated.jpg", exif=exif, quality=95)
    for name in ("animated.gif", "grey.png", "alpha.png", "palette.png", "cmyk.jpg"):
        expected[f"banana/{name}"] = "ok"
    for name in ("grey16.png", "rgb16.png", "rotated.jpg"):
        expected[f"banana/{name}"] = "ok"
    return expected


def _digest_tree(root: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirty")
    expected = _write_dirty_folder(root / "images")
    return root, expected


def test_each_bad_file_is_reported_with_its_reason(dirty, tmp_path):
    root, expected = dirty
    result = scan.scan_folder(root / "images", cache_dir=tmp_path, progress=False)
    reasons = {b["path"]: b["reason"] for b in result.bad}
    wanted = {p: r for p, r in expected.items() if r != "ok"}
    assert reasons == wanted
    good = {str(Path(p).relative_to(root / "images")) for p, _, _ in result.good}
    assert good == {p for p, r in expected.items() if r == "ok"}
    conversions = result.conversions
    for name in ("animated", "grayscale", "alpha", "palette", "cmyk", "16-bit", "exif-rotated"):
        assert conversions.get(name, 0) >= 1, (name, conversions)
    report = result.report()
    assert report["bad"] == len(wanted) and report["by_reason"]["label conflict"] == 2


def test_too_large_is_refused_from_the_header(dirty):
    root, _ = dirty
    result = scan.inspect_file(str(root / "images" / "banana" / "bomb.png"), max_pixels=10**6)
    # A decode would have failed on the missing pixel data ("corrupt or truncated").
    assert result["reason"] == "too large" and "144000000 pixels" in result["detail"]


def test_good_odd_images_come_out_as_8bit_rgb_upright(dirty, tmp_path):
    root, _ = dirty
    result = scan.scan_folder(root / "images", cache_dir=tmp_path, progress=False)
    decoded = {Path(p).name: decode_file(tf.constant(p)).numpy() for p, _, _ in result.good}
    for name, image in decoded.items():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
    for name in ("grey.png", "grey16.png"):
        image = decoded[name].astype(int)
        assert (image[..., 0] == image[..., 2]).all(), name  # grey: equal channels
        assert 30 < image.mean() < 200, name  # 16-bit scaled to 8-bit, not clipped
    for name in ("alpha.png", "palette.png", "cmyk.jpg", "rgb16.png", "animated.gif"):
        image = decoded[name].astype(int)
        assert image.shape[:2] == (20, 24), name
        assert image[:, :6, 0].mean() > 150 and image[:, -6:, 2].mean() > 150, name
    rotated = decoded["rotated.jpg"].astype(int)  # 24 wide x 20 high, stored sideways
    assert rotated.shape[:2] == (24, 20)  # upright: 20 wide, 24 high
    assert rotated[:6, :, 0].mean() > 150 and rotated[-6:, :, 2].mean() > 150  # red on top


def test_second_scan_comes_from_the_cache(dirty, tmp_path):
    root, _ = dirty
    first = scan.scan_folder(root / "images", cache_dir=tmp_path, progress=False)
    again = scan.scan_folder(root / "images", cache_dir=tmp_path, progress=False)
    assert first.cached == 0 and again.cached == again.total == first.total
    assert again.report()["by_reason"] == first.report()["by_reason"]


def test_too_many_bad_files_stop_with_a_clear_message(dirty, tmp_path):
    root, _ = dirty
    with pytest.raises(PipelineError, match=r"data\.max_bad_fraction=1%.*scan_report\.json"):
        load_folder(path=str(root / "images"), image_size=16, seed=0, cache_dir=str(tmp_path))


def test_leakage_between_train_and_a_val_folder(dirty, tmp_path):
    root, _ = dirty
    val = tmp_path / "val" / "apple"
    val.mkdir(parents=True)
    shutil.copy(root / "images" / "apple" / "good1.jpg", val / "copy_of_train.jpg")
    _picture(50).save(val / "fresh.jpg")
    src = load_folder(
        path=str(root / "images"),
        val_path=str(tmp_path / "val"),
        image_size=16,
        seed=0,
        max_bad_fraction=1.0,
        cache_dir=str(tmp_path / "cache"),
    )
    assert src.val.members == ["apple/fresh.jpg"]
    leaks = src.details["scan"]["leakage"]
    assert [leak["path"] for leak in leaks] == ["apple/copy_of_train.jpg"]


def test_training_on_the_dirty_folder_leaves_every_file_untouched(dirty, tmp_path):
    root, expected = dirty
    before = _digest_tree(root / "images")
    cfg = compose(
        [
            "data=folder",
            f"data.path={root / 'images'}",
            "data.max_bad_fraction=1.0",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.image_size=16",
            "data.batch_size=4",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            "model.width=4",
            "trainer.epochs=1",
            "trainer.verbose=0",
        ]
    )
    metrics = train(cfg, run_dir=tmp_path / "run")
    assert np.isfinite(metrics["test_loss"])
    report = json.loads((tmp_path / "run" / "scan_report.json").read_text())
    assert report["train"]["bad"] == sum(r != "ok" for r in expected.values())
    assert _digest_tree(root / "images") == before  # nothing deleted, moved or rewritten


def test_scan_command_prints_a_summary_and_writes_a_report(dirty, tmp_path):
    root, _ = dirty
    proc = run_module(
        "pipeline.data.scan",
        "data=folder",
        f"data.path={root / 'images'}",
        f"data.cache_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'out'}",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quarantined" in proc.stdout and "label conflict" in proc.stdout
    report = json.loads((tmp_path / "out" / "scan_report.json").read_text())
    assert report["by_reason"]["corrupt or truncated"] == 2
