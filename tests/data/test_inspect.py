"""`inspect_data(cfg)` on a written folder: counts, sizes, statistics and the sample grid."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import compose, write_image_folder
from pipeline.data import inspect
from pipeline.data.quarantine import decode_with_pil
from pipeline.data.sources import load_folder, resize_image
from pipeline.errors import PipelineError

CLASSES = ("cat", "dog", "fox")
PER_CLASS = 10
REMOVED = ("fox/img8.png", "fox/img9.jpg")  # fox keeps 8 of 10: an imbalance of 1.25
SAMPLES = 3


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    folder = write_image_folder(root / "images", classes=CLASSES, per_class=PER_CLASS)
    for rel in REMOVED:
        (folder / rel).unlink()
    cfg = compose(
        [
            "data=folder",
            f"data.path={folder}",
            f"data.cache_dir={root / 'cache'}",
            "data.image_size=16",
            f"+inspect.samples_per_class={SAMPLES}",
        ]
    )
    report = inspect.inspect_data(cfg, run_dir=root / "run")
    return report, folder, root / "run"


def test_counts_equal_the_files_written(inspected):
    report, folder, run_dir = inspected
    written = {c: len(list((folder / c).iterdir())) for c in CLASSES}
    assert written == {"cat": 10, "dog": 10, "fox": 8}
    assert report["counts"]["total"] == written
    for name in CLASSES:
        per_split = [report["counts"][s][name] for s in ("train", "val", "test")]
        assert sum(per_split) == written[name] and min(per_split) >= 1
    assert report["split_sizes"]["total"] == 28
    assert report["imbalance_ratio"]["total"] == pytest.approx(10 / 8)
    assert json.loads((run_dir / "inspect.json").read_text()) == report


def test_sizes_come_from_the_scan(inspected):
    sizes = inspected[0]["original_sizes"]
    # write_image_folder: 20 px high, 20, 24 or 28 px wide
    assert sizes["count"] == 28 and sizes["fixed"] is False and sizes["distinct"] == 3
    assert sizes["width"]["min"] == 20 and sizes["width"]["max"] == 28
    assert sizes["height"] == {"min": 20, "median": 20.0, "max": 20}
    assert sizes["non_square"] == 17 and sizes["smaller_than_image_size"] == 0
    assert sum(c["count"] for c in sizes["most_common"]) == 28


def test_channel_stats_match_numpy(inspected):
    report, folder, _ = inspected
    # the statistics are of the training split: the same seed gives the same split
    source = load_folder(path=str(folder), image_size=16, seed=0, cache_dir=None)
    assert len(source.train.members) == report["split_sizes"]["train"]

    def decode(rel):  # as the pipeline decodes: TensorFlow's JPEG decoder differs by a level or so
        return decode_with_pil(str(folder / rel), 16)

    images = [resize_image(decode(rel), 16, "crop") for rel in source.train.members]
    pixels = np.stack(images).reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(report["mean"], pixels.mean(0), atol=1e-3)
    np.testing.assert_allclose(report["std"], pixels.std(0), atol=1e-3)


def test_grid_has_one_row_per_class(inspected):
    report, _, run_dir = inspected
    grid = Image.open(run_dir / "inspect.png")
    tile = inspect.tile_size(16)
    assert tile == 64
    assert grid.height == len(CLASSES) * (tile + inspect.GAP) + inspect.GAP
    assert grid.width > SAMPLES * (tile + inspect.GAP)
    assert report["samples_per_class"] == SAMPLES


def test_grid_leaves_missing_samples_white():
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    grid = inspect.render_grid([[red, red], []], ["a", "b"])
    tile = inspect.tile_size(8)
    assert grid.shape[0] == 2 * (tile + inspect.GAP) + inspect.GAP
    right = grid[:, -tile - inspect.GAP : -inspect.GAP]  # last column of tiles
    top, bottom = right[inspect.GAP : inspect.GAP + tile], right[-tile - inspect.GAP :]
    assert (top == [255, 0, 0]).all() and (bottom == 255).all()


def test_zero_samples_per_class_is_refused_with_the_value(tmp_path):
    cfg = compose(["+inspect.samples_per_class=0"])
    with pytest.raises(PipelineError, match="inspect.samples_per_class must be >= 1, got 0"):
        inspect.inspect_data(cfg, run_dir=tmp_path)
