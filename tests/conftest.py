"""Shared test set-up: the TensorFlow backend, quiet logs, tiny data helpers."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")


def compose(overrides: list[str] | None = None):
    """The config `python -m pipeline.train <overrides>` would get."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])


def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=6, size=20, seed=0):
    """Writes small class-per-folder images in several formats; returns the root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("bmp", "BMP"), ("gif", "GIF")]
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size + 4 * (i % 3), 3), np.uint8)
            base[..., c % 3] = 200  # a class colour the model can learn
            noise = rng.integers(0, 40, base.shape, dtype=np.uint8)
            ext, fmt = formats[i % len(formats)]
            Image.fromarray(base + noise).save(folder / f"img{i}.{ext}", format=fmt)
    return root


def png_header_only(path: Path, width: int, height: int) -> None:
    """Writes a PNG whose header claims width x height and that holds no pixel data."""
    import struct
    import zlib

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "images")


def run_test_split(run_dir: Path, folder: Path, size: int):
    """A finished folder run's test split rebuilt from its manifest: float32 images, labels."""
    import json

    import tensorflow as tf

    from pipeline.data.sources import resize_image

    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    names = manifest["data"]["class_names"]
    images, labels = [], []
    for rel in manifest["data"]["splits"]["test"]:
        raw = tf.io.decode_image(tf.io.read_file(str(folder / rel)), 3, expand_animations=False)
        images.append(resize_image(raw, size, "crop").numpy())
        labels.append(names.index(rel.split("/")[0]))
    return np.stack(images).astype("float32"), np.array(labels)
