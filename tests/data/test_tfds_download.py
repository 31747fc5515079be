"""TFDS's real download-and-prepare path, offline: a tiny builder served from 127.0.0.1."""

import functools
import http.server
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.sources import load_source
from pipeline.errors import PipelineError

tfds = pytest.importorskip("tensorflow_datasets")

CLASSES = ["dark", "light"]
PER_CLASS = 4  # images of each class in the served file


class TinyDownloaded(tfds.core.GeneratorBasedBuilder):
    """Eight 8x8 images in one .npz, fetched through ``dl_manager`` from ``URL``."""

    VERSION = tfds.core.Version("1.0.0")
    URL = "http://127.0.0.1:9/unset.npz"  # set by each test
    pkg_dir_path = Path(__file__).parent  # TFDS looks for README/CITATIONS here (none): no package

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(names=CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        path = dl_manager.download(self.URL)
        return {"train": self._generate_examples(path), "test": self._generate_examples(path)}

    def _generate_examples(self, path):
        with open(path, "rb") as f:
            data = np.load(io.BytesIO(f.read()))
            images, labels = data["images"], data["labels"]
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


def _served_file(folder):
    labels = np.repeat(np.arange(len(CLASSES)), PER_CLASS)
    images = np.stack([np.full((8, 8, 3), 40 + 160 * label, np.uint8) for label in labels])
    np.savez(folder / "tiny.npz", images=images, labels=labels)
    return labels


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "served"``; yields its URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _load(cache_dir, **options):
    return load_source(
        "tfds",
        name="tiny_downloaded",
        image_size=16,
        seed=0,
        cache_dir=str(cache_dir),
        val_split="train[:25%]",
        **options,
    )


def test_a_tfds_dataset_is_downloaded_prepared_and_read(server, tmp_path, monkeypatch):
    served, url = server
    labels = _served_file(served)
    monkeypatch.setattr(TinyDownloaded, "URL", f"{url}/tiny.npz")
    source = _load(tmp_path / "cache")
    assert source.class_names == CLASSES
    assert source.test.count == len(labels) and source.val.count == 2
    images, got = zip(*source.test.images.as_numpy_iterator(), strict=True)
    assert np.stack(images).shape == (len(labels), 16, 16, 3)
    assert sorted(got) == sorted(labels)
    assert (tmp_path / "cache" / "tiny_downloaded" / "1.0.0").is_dir()
    monkeypatch.setattr(TinyDownloaded, "URL", f"{url}/gone.npz")  # prepared: no download
    assert _load(tmp_path / "cache", download=False).test.count == len(labels)
    assert _load(tmp_path / "cache").test.count == len(labels)


def _refused_port() -> int:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_is_one_line_naming_the_dataset_the_url_and_the_offline_ways(
    tmp_path, monkeypatch
):
    from tensorflow_datasets.core.download import downloader

    url = f"http://127.0.0.1:{_refused_port()}/tiny.npz"
    monkeypatch.setattr(TinyDownloaded, "URL", url)
    started = time.perf_counter()
    with pytest.raises(PipelineError) as err:
        _load(tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot download the TFDS dataset 'tiny_downloaded'")
    assert url in message
    assert f"data.cache_dir={tmp_path / 'cache'}" in message and "data=folder" in message
    assert time.perf_counter() - started < 20  # TFDS's own retries alone wait ~3.5 minutes
    assert downloader.MAX_RETRIES == 10  # TFDS's setting, back as it was


def test_cifar10_goes_through_tfds_real_download_path(tmp_path, monkeypatch):
    """`data=cifar10` (a README command): its builder, checksums and download code, offline.

    TFDS's builder code imports ``importlib_resources`` on this path (a declared
    dependency); the download goes to a port where nothing listens.
    """
    from tensorflow_datasets.image_classification import cifar

    url = f"http://127.0.0.1:{_refused_port()}/cifar-10-binary.tar.gz"
    real = cifar.Cifar10._cifar_info
    monkeypatch.setattr(
        cifar.Cifar10, "_cifar_info", property(lambda self: real.fget(self)._replace(url=url))
    )
    with pytest.raises(PipelineError) as err:
        load_source("tfds", name="cifar10", image_size=32, seed=0, cache_dir=str(tmp_path))
    assert str(err.value).startswith(f"cannot download the TFDS dataset 'cifar10' from {url} (")
    assert "no network" in str(err.value)


def test_the_package_tfds_downloads_need_is_declared():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert any(d.startswith("importlib-resources") for d in project["project"]["dependencies"])


def test_download_false_without_a_prepared_copy_names_the_cache_dir(tmp_path):
    with pytest.raises(PipelineError, match=r"'tiny_downloaded' is not prepared under .*cache"):
        _load(tmp_path / "cache", download=False)
