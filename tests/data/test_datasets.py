"""Sources, splits, resizing, statistics and batching."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from pipeline import data
from pipeline.data import augment
from pipeline.data.sources import resize_image
from pipeline.errors import PipelineError


def _digits(seed=0, size=16):
    return data.load_source(
        "digits", image_size=size, seed=seed, test_fraction=0.2, val_fraction=0.1
    )


def test_digits_splits_are_disjoint_stratified_and_seeded():
    src = _digits()
    train, val, test = (set(getattr(src, s).members) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=10)
    assert len(val) == pytest.approx(0.1 * 0.8 * 1797, abs=10)
    labels = np.concatenate([y.numpy() for _, y in src.test.images.batch(1000)])
    assert np.bincount(labels, minlength=10).min() >= 34  # ~36 of each digit
    assert _digits().test.members == src.test.members
    assert _digits(seed=1).test.members != src.test.members


def test_digits_images_are_uint8_rgb_at_size():
    x, y = next(iter(_digits(size=16).train.images.batch(4)))
    assert x.shape == (4, 16, 16, 3) and x.dtype == tf.uint8 and y.dtype == tf.int32
    assert int(tf.reduce_max(x)) > 200  # 0..16 was scaled to 0..255
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey: channels equal


def test_stats_match_numpy():
    src = _digits()
    bundle = data.make_datasets(src, batch_size=32, seed=0)
    pixels = np.concatenate([x.numpy() for x, _ in src.train.images.batch(512)])
    pixels = pixels.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(bundle.mean, pixels.mean(0), atol=1e-3)
    np.testing.assert_allclose(bundle.std, pixels.std(0), atol=1e-3)


def test_limit_batches_takes_fresh_training_batches_and_the_first_of_val_and_test():
    src = _digits()
    full = data.make_datasets(src, batch_size=32, seed=0)
    limited = data.make_datasets(src, batch_size=32, seed=0, limit_batches=2)
    assert limited.steps_per_epoch() == 2 and full.steps_per_epoch() == -(-src.train.count // 32)
    for split in ("train", "val", "test"):
        assert sum(1 for _ in getattr(limited, split)) == 2, split
    first, second = ([y.numpy() for _, y in limited.train] for _ in range(2))
    assert not np.array_equal(first[0], second[0])  # each epoch's two come from a new shuffle
    plain_test = [x.numpy() for x, _ in full.test.take(2)]
    for got, want in zip((x.numpy() for x, _ in limited.test), plain_test, strict=True):
        np.testing.assert_array_equal(got, want)
    assert limited.mean == full.mean  # statistics from the whole training split
    for bad in (0, -1, True):
        with pytest.raises(PipelineError, match=f"trainer.limit_batches .* got {bad!r}"):
            data.make_datasets(src, batch_size=32, seed=0, limit_batches=bad)


def test_batches_are_float_pixels_and_one_hot():
    bundle = data.make_datasets(_digits(), batch_size=32, seed=0, crop_padding=4)
    x, y = next(iter(bundle.train))
    assert x.shape == (32, 16, 16, 3) and x.dtype == tf.float32
    assert float(tf.reduce_max(x)) <= 255.0 and float(tf.reduce_min(x)) >= 0.0
    assert y.shape == (32, 10)
    np.testing.assert_allclose(tf.reduce_sum(y, axis=1), np.ones(32))
    assert bundle.steps_per_epoch() == -(-bundle.counts["train"] // 32)
    val_total = sum(int(x.shape[0]) for x, _ in bundle.val)
    assert val_total == bundle.counts["val"]


def test_crop_padding_shifts_images_and_flip_mirrors():
    image = np.zeros((64, 8, 8, 3), np.uint8)
    image[:, :, :4] = 255  # white left half
    flip = augment.crop_flip_fn(8, crop_padding=0, flip=True)
    flipped = flip(tf.constant(image), tf.zeros([64]))[0].numpy()
    mirrored = flipped[:, 0, 0, 0] == 0
    assert 10 < mirrored.sum() < 54  # a coin per image, not one per batch
    np.testing.assert_array_equal(flipped[mirrored], image[mirrored][:, :, ::-1])
    np.testing.assert_array_equal(flipped[~mirrored], image[~mirrored])
    crop = augment.crop_flip_fn(32, crop_padding=4, flip=False)  # 4 px at 32 px
    big = np.arange(32 * 32, dtype=np.int32).reshape(1, 32, 32, 1).repeat(40, 0) + 1
    crops = crop(tf.constant(big), tf.zeros([40]))[0].numpy()
    assert crops.shape == (40, 32, 32, 1)
    for c in crops:  # each a window of the zero-padded image, offsets up to 4 px each way
        inside = c[c > 0]
        first = int(inside.min()) - 1
        dy, dx = first // 32, first % 32
        assert dy <= 4 and dx <= 4
    offsets = {int(c[c > 0].min()) for c in crops}
    assert len(offsets) > 5  # an offset per image
    assert any((c == 0).any() for c in crops)  # padding showed up in some crops
    assert augment.crop_flip_fn(32, crop_padding=0, flip=False) is None


@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
def test_resize_modes(mode):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = 255  # white left quarter
    out = resize_image(wide, 10, mode).numpy()
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    if mode == "crop":  # centre crop keeps the middle half: no white left
        assert out[:, 0].max() < 128
    if mode == "pad":  # letterboxed: black bands top and bottom
        assert out[0].max() == 0 and out[-1].max() == 0 and out[5, 0].min() == 255
    if mode == "stretch":
        assert out[5, :2].min() > 200 and out[5, -2:].max() == 0


@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
def test_an_image_already_at_size_is_returned_as_resizing_would(mode):
    from pipeline.data.sources import _resized

    image = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    out = resize_image(image, 12, mode).numpy()  # resizing skipped
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(out, _resized(image, 12, mode).numpy())


def test_folder_lists_formats_and_splits_per_class(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    src = data.load_source(
        "folder", path=str(root), image_size=24, seed=0, val_fraction=0.1, test_fraction=0.2
    )
    assert src.class_names == ["cat", "dog", "fox"]
    assert (src.train.count, src.val.count, src.test.count) == (21, 3, 6)
    members = src.train.members + src.val.members + src.test.members
    assert len(set(members)) == 30 and {m.rsplit(".", 1)[1] for m in members} == {
        "png",
        "jpg",
        "bmp",
        "gif",
    }
    for name in ("train", "val", "test"):
        for x, y in getattr(src, name).images:
            assert x.shape == (24, 24, 3) and x.dtype == tf.uint8
            assert int(np.argmax(x.numpy().mean((0, 1)))) == int(y)  # class colour survived


def test_folder_uses_given_val_and_test_folders(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=4)
    val = write_image_folder(tmp_path / "val", classes=("dog",), per_class=2, seed=1)
    src = data.load_source(
        "folder", path=str(root), val_path=str(val), image_size=16, seed=0, test_fraction=0.25
    )
    assert src.val.count == 2 and src.train.count == 9 and src.test.count == 3
    labels = [int(y) for _, y in src.val.images]
    assert labels == [1, 1]  # "dog" is class 1 of the training folder


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "is not a folder"),
        ("no_classes", "has no class subfolders"),
        ("empty_class", "hold no usable images"),
        ("bad_val", "has classes \\['wolf'\\]"),
    ],
)
def test_folder_errors_name_the_problem(tmp_path, setup, message):
    root = tmp_path / "imgs"
    kwargs = {}
    if setup != "missing":
        root.mkdir()
    if setup == "empty_class":
        write_image_folder(root, classes=("a",), per_class=2)
        (root / "b").mkdir()
    if setup == "bad_val":
        write_image_folder(root, classes=("a",), per_class=4)
        kwargs["val_path"] = str(write_image_folder(tmp_path / "v", classes=("wolf",), per_class=1))
    with pytest.raises(PipelineError, match=message):
        data.load_source("folder", path=str(root), image_size=16, seed=0, **kwargs)


def test_tfds_source_through_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        src = data.load_source(
            "tfds",
            name="cifar10",
            image_size=16,
            seed=0,
            cache_dir=str(tmp_path),
            train_split="train[:90%]",
            val_split="train[90%:]",
            test_split="test",
        )
        bundle = data.make_datasets(src, batch_size=4, seed=0)
        x, y = next(iter(bundle.train))
    assert len(src.class_names) == 10 and bundle.num_classes == 10
    assert x.shape == (4, 16, 16, 3) and y.shape == (4, 10)
    assert src.train.members == "train[:90%]"


def test_tfds_unknown_name_is_clear(tmp_path):
    with pytest.raises(PipelineError, match="not a TFDS dataset"):
        data.load_source(
            "tfds", name="no_such_dataset_xyz", image_size=16, seed=0, cache_dir=str(tmp_path)
        )


def test_stats_are_cached_by_fingerprint(tmp_path):
    src = _digits()
    first = data.make_datasets(src, batch_size=32, seed=0, stats_cache_dir=str(tmp_path))
    again = data.make_datasets(src, batch_size=32, seed=0, stats_cache_dir=str(tmp_path))
    assert first.stats["cached"] is False and again.stats["cached"] is True
    assert again.mean == first.mean and again.std == first.std
    counts = first.stats["class_counts"]
    assert sum(counts.values()) == src.train.count and set(counts) == set(src.class_names)
    assert list(tmp_path.glob("stats/*.json"))


def test_class_weights_balance_the_classes():
    weights = data.class_weights({"a": 30, "b": 10}, ["a", "b"])
    assert weights == pytest.approx({0: 40 / 60, 1: 40 / 20})
    assert 30 * weights[0] == pytest.approx(10 * weights[1])
    with pytest.raises(PipelineError, match=r"classes \['c'\] have no training images"):
        data.class_weights({"a": 3}, ["a", "c"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"randaugment": {"num_ops": 2, "factor": 0.5}},
        {"mixup_alpha": 0.4},
        {"cutmix_alpha": 1.0},
        {"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
    ],
    ids=["randaugment", "mixup", "cutmix", "mixup+cutmix"],
)
def test_batch_augmentations_keep_shapes_and_label_mass(kwargs):
    bundle = data.make_datasets(_digits(), batch_size=16, seed=0, crop_padding=4, **kwargs)
    x, y = next(iter(bundle.train))
    assert x.shape == (16, 16, 16, 3) and x.dtype == tf.float32 and y.shape == (16, 10)
    # MixUp's lam * a + (1 - lam) * b can round 255 up by an ulp (255.00002)
    assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 255.0 + 1e-3
    np.testing.assert_allclose(tf.reduce_sum(y, axis=1), np.ones(16), atol=1e-5)
    if "mixup_alpha" in kwargs or "cutmix_alpha" in kwargs:
        assert float(tf.reduce_max(y)) < 1.0 or len(np.unique(y.numpy())) > 2  # labels mixed
    preview, _ = next(iter(bundle.preview))
    assert preview.shape[0] == 32 and preview.shape[1:] == (16, 16, 3)
