"""Shared test set-up: the TensorFlow backend, quiet logs, tiny data helpers, tiny runs."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = str(REPO / "conf")
# A run that trains in seconds on two cores: 16 px images, batches of 8, a 4-filter cnn.
TINY = ["data.image_size=16", "data.batch_size=8", "model.width=4", "trainer.verbose=0"]


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


@dataclass(frozen=True)
class TinyRun:
    """A finished tiny run: its directory, what ``train()`` returned, the images it trained on."""

    path: Path
    metrics: dict
    folder: Path | None  # None for a run on another data source

    def copy_to(self, dest: Path) -> "TinyRun":
        """A private copy at ``dest``, for tests that write into the run (eval/, export/, ...)."""
        return replace(self, path=Path(shutil.copytree(self.path, dest)))


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class TinyRuns:
    """Trains each distinct tiny run once per session and hands out the finished run.

    ``tiny_runs("trainer.epochs=2")`` composes ``TINY`` plus the overrides (on the shared
    ``tiny_folder`` unless an override picks ``data=``) and trains in this process; the same
    overrides in the same order return the cached run. The cached run is shared: a test that
    writes into it must take ``.copy_to(tmp_path / "run")`` first. A cached run or the shared
    folder that changed is an error at the next request and at the end of the session.
    """

    def __init__(self, root: Path, folder: Path):
        self.root = root
        self.folder = folder
        self._runs: dict[tuple[str, ...], TinyRun] = {}
        self._listings = {folder: _listing(folder)}

    def __call__(self, *overrides: str) -> TinyRun:
        on_folder = not any(o.startswith("data=") for o in overrides)
        data = ["data=folder", f"data.path={self.folder}"] if on_folder else []
        key = (*data, *TINY, f"data.cache_dir={self.root / 'cache'}", *overrides)
        if key not in self._runs:
            from pipeline.train import train

            path = self.root / f"run{len(self._runs)}"
            metrics = train(compose(list(key)), run_dir=path)
            self._runs[key] = TinyRun(path, metrics, self.folder if on_folder else None)
            self._listings[path] = _listing(path)
        self.check_untouched()
        return self._runs[key]

    def check_untouched(self) -> None:
        for root, listing in self._listings.items():
            now = _listing(root)
            changed = sorted(k for k in listing.keys() | now.keys() if listing.get(k) != now.get(k))
            assert not changed, (
                f"a test wrote into the shared {root} ({', '.join(changed[:5])}); "
                "write into a copy instead: tiny_runs(...).copy_to(tmp_path / 'run')"
            )


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """3 classes x 10 small images in several formats, shared by the session: read only."""
    return write_image_folder(tmp_path_factory.mktemp("tiny") / "images", per_class=10)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_folder):
    """The session's tiny-run factory (see ``TinyRuns``)."""
    runs = TinyRuns(tmp_path_factory.mktemp("tiny_runs"), tiny_folder)
    yield runs
    runs.check_untouched()


@pytest.fixture(scope="module")
def own_tiny_run(tiny_runs, tmp_path_factory) -> TinyRun:
    """This test module's own copy of the shared 2-epoch run, to write eval/ or export/ into."""
    return tiny_runs("trainer.epochs=2").copy_to(tmp_path_factory.mktemp("own") / "run")


def run_module(module: str, *args: str, timeout: int = 300, env=None):
    """``python -m <module> <args>`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=env,
    )


def run_test_split(run_dir: Path, folder: Path, size: int):
    """A finished folder run's test split rebuilt from its manifest: float32 images, labels."""
    import json

    from pipeline.data.quarantine import decode_with_pil
    from pipeline.data.sources import resize_image

    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    names = manifest["data"]["class_names"]
    images, labels = [], []
    for rel in manifest["data"]["splits"]["test"]:
        raw = decode_with_pil(str(folder / rel), size)  # the pipeline's one decoder
        images.append(resize_image(raw, size, "crop").numpy())
        labels.append(names.index(rel.split("/")[0]))
    return np.stack(images).astype("float32"), np.array(labels)
