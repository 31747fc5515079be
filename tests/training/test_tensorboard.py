"""TensorBoard as a user sees it: tags and steps of the curves, legible pictures, profiler steps,
the HParams table's layout and the sweep's run names."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from pipeline.evaluation import plots
from pipeline.runs import hparams, sweep
from pipeline.training.callbacks import (
    EpochStats,
    EvaluateEachEpoch,
    StepProfiler,
    TrainingCurves,
)
from pipeline.training.schedules import WarmupSchedule

BATCHES = 12  # per epoch, of 4 examples


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * BATCHES, 4)).astype("float32")
    y = keras.utils.to_categorical(np.arange(4 * BATCHES) % 3, 3)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


def _fit(callbacks, learning_rate, epochs=2):
    data = _data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    model.fit(
        data,
        validation_data=data.take(2),
        epochs=epochs,
        verbose=0,
        shuffle=False,
        callbacks=callbacks,
    )
    return model, data


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the float scalars in one TensorBoard run folder."""
    found: dict[str, dict[int, float]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                tensor = value.tensor
                if tensor.dtype == tf.float32.as_datatype_enum and not tensor.tensor_shape.dim:
                    found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(tensor))
    return found


def test_curves_are_grouped_by_epoch_and_step_with_the_warmup_visible(tmp_path):
    schedule = WarmupSchedule(peak_lr=0.1, total_steps=2 * BATCHES, warmup_steps=8, kind="constant")
    curves = TrainingCurves(tmp_path, every_steps=5)
    _fit([EpochStats(4 * BATCHES), EvaluateEachEpoch(_data().take(1)), curves], schedule)
    train, validation, test = (_scalars(tmp_path / run) for run in ("train", "validation", "test"))
    epoch_tags = {"epoch/loss", "epoch/accuracy"}
    assert set(train) == epoch_tags | {
        "epoch/lr",
        "epoch/train_images_per_sec",
        "batch/loss",
        "batch/lr",
    }
    assert set(validation) == set(test) == epoch_tags  # no evaluation_*_vs_iterations
    for run in (train, validation, test):
        assert sorted(run["epoch/loss"]) == [0, 1]
    # every 5 optimizer steps, across the epoch boundary (12 steps each)
    assert sorted(train["batch/lr"]) == [5, 10, 15, 20]
    for step, lr in train["batch/lr"].items():
        assert lr == pytest.approx(float(schedule(step)), rel=1e-6)
    warmup = [train["batch/lr"][s] for s in (5, 10)]
    assert warmup[0] < warmup[1] == pytest.approx(0.1, rel=0.02)  # warming up, then at the peak


def test_step_loss_is_the_mean_loss_of_the_batches_since_the_last_point(tmp_path):
    model, data = _fit([TrainingCurves(tmp_path, every_steps=5)], learning_rate=0.0)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    per_batch = [float(loss(y, model(x))) for x, y in data]  # the weights never moved
    expected = {
        5: np.mean(per_batch[0:5]),
        10: np.mean(per_batch[5:10]),
        15: np.mean(per_batch[0:3]),  # epoch 2 starts at step 12
        20: np.mean(per_batch[3:8]),
    }
    got = _scalars(tmp_path / "train")["batch/loss"]
    assert got == pytest.approx(expected, rel=1e-5)


def test_no_step_curves_when_off(tmp_path):
    _fit([TrainingCurves(tmp_path, every_steps=None)], learning_rate=0.01, epochs=1)
    assert set(_scalars(tmp_path / "train")) == {
        "epoch/loss",
        "epoch/accuracy",
        "epoch/lr",
    }
    with pytest.raises(ValueError, match="every_steps must be >= 0, got -1"):
        TrainingCurves(tmp_path, every_steps=-1)


def _step_markers(trace_dir: Path) -> set[int]:
    """The step numbers of the ``train`` step markers in a profiler trace (XSpace)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    steps = set()
    for path in trace_dir.glob("plugins/profile/*/*.xplane.pb"):
        space = xplane_pb2.XSpace.FromString(path.read_bytes())
        for plane in space.planes:
            stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
            for line in plane.lines:
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    if name.split("#")[0] != "train":
                        continue
                    stats = {stat_names.get(s.metadata_id): s for s in event.stats}
                    if "step_num" in stats and "_r" in stats:
                        step = stats["step_num"]
                        steps.add(int(getattr(step, step.WhichOneof("value"))))
                    elif "#step_num=" in name:  # not parsed into stats
                        steps.add(int(name.split("step_num=")[1].split(",")[0].split("#")[0]))
    return steps


def test_profiled_batches_are_steps_of_the_trace(tmp_path):
    _fit([StepProfiler(tmp_path / "train", 3, 4)], learning_rate=0.01, epochs=1)
    assert list((tmp_path / "train").glob("plugins/profile/*/*.xplane.pb"))
    assert _step_markers(tmp_path / "train") == {3, 4}
    with pytest.raises(ValueError, match=r"need 1 <= first <= last, got \[4, 2\]"):
        StepProfiler(tmp_path, 4, 2)


def _ink(image: np.ndarray, box) -> np.ndarray:
    """Dark pixels (text on a light cell) inside ``box`` = (left, top, width, height)."""
    left, top, width, height = box
    return image[top : top + height, left : left + width].mean(-1) < 110


def test_a_10_class_matrix_fits_a_card_with_text_at_the_font_size():
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "y"]
    cm = np.zeros((10, 10), int)
    cm[np.arange(10), np.arange(10)] = 50
    cm[0, :2] = [36, 64]  # 36% of row 0 in a light cell
    cm[1, :2] = [30, 70]  # 30% of row 1 in a light cell
    image = plots.render_confusion_matrix(cm, names)
    # TensorBoard's card shows about 205 x 390 px: fitting it, the picture is never shrunk
    assert image.shape[0] <= plots.CARD_HEIGHT and image.shape[1] <= 390
    layout = plots.matrix_layout(cm, names)
    (cell_w, cell_h), left, top = layout["cell"], layout["left"], layout["top"]
    thirty_six = _ink(image, (left, top, cell_w, cell_h))
    thirty = _ink(image, (left, top + cell_h, cell_w, cell_h))
    _, top_, _, bottom = plots.font().getbbox("0123456789")
    rows = np.flatnonzero(thirty_six.any(1))
    assert bottom - top_ >= 9  # digits 9 px tall or more (the old bitmap font: 7)
    assert rows.max() - rows.min() + 1 >= bottom - top_ - 1  # the cell's text is drawn at that
    assert (thirty_six != thirty).sum() >= 8  # "36" and "30" differ, pixel for pixel
    assert layout["columns"] == [str(i) for i in range(10)]  # names too wide: numbers
    assert layout["rows"][1] == "automobile 1"


def test_few_classes_show_names_percent_and_count_and_many_a_heat_map():
    small = plots.matrix_layout(np.array([[8, 2], [0, 10]]), ["cat", "dog"])
    assert small["lines"] == 2 and small["columns"] == ["cat", "dog"]
    many = plots.matrix_layout(np.eye(300, dtype=int), [str(i) for i in range(300)])
    assert many["lines"] == 0 and many["cell"] == (2, 2)  # colours only


def test_mistakes_come_in_pages_a_card_shows_legibly():
    images = [np.full((32, 32, 3), i * 10, np.uint8) for i in range(11)]
    captions = [("automobile", "airplane 93%")] * 11
    pages = plots.mistake_pages(images, captions)
    assert pages.shape[0] == 2 and pages.dtype == np.uint8  # 8 per page
    assert pages.shape[1] <= plots.CARD_HEIGHT and pages.shape[2] <= 390
    whole = plots.render_mistakes(images, captions)
    assert whole.shape[0] > pages.shape[1]  # the PNG holds every row


def test_a_run_logs_its_hparams_and_only_the_key_final_metrics(tmp_path):
    run = tmp_path / "2026-11-27" / "10-00-00-abc123"
    metrics = {"val_accuracy": 0.9, "val_loss": 0.3, "test_accuracy": 0.8, "wall_time_s": 5.0}
    metrics |= {"num_replicas": 1, "epochs": 3, "strategy": "default"}
    hparams.log_run(run, {"optimizer.lr": 0.1, "model.arch": "cnn"}, metrics, objective="val_loss")
    params, tags = hparams.read_session(run / "tensorboard" / "hparams")
    assert params == {"optimizer.lr": pytest.approx(0.1), "model.arch": "cnn"}
    assert tags == ["result/val_loss", "result/val_accuracy", "result/test_accuracy"]
    assert _group_name(run / "tensorboard" / "hparams") == "10-00-00-abc123 (2026-11-27)"


def _group_name(logdir: Path) -> str:
    from tensorboard.plugins.hparams import plugin_data_pb2

    for events in logdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                if value.tag == hparams.SESSION_TAG:
                    content = value.metadata.plugin_data.content
                    return plugin_data_pb2.HParamsPluginData.FromString(
                        content
                    ).session_start_info.group_name
    return ""


def _experiment(sweep_dir: Path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    (events,) = (sweep_dir / hparams.SWEEP_HPARAMS_DIR).glob("events.out.tfevents.*")
    for event in tf.compat.v1.train.summary_iterator(str(events)):
        for value in event.summary.value:
            if value.tag.endswith("_hparams_/experiment"):
                content = value.metadata.plugin_data.content
                return plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    raise AssertionError("no experiment summary")


def test_sweep_layout_lists_varied_hparams_first_and_the_objective_first(tmp_path):
    for job, lr in enumerate((0.05, 0.1, 0.2)):
        params = {"optimizer.lr": lr, "model.arch": "cnn", "seed": 0}
        metrics = {"val_accuracy": 0.5 + lr, "val_loss": 1 - lr, "test_loss": 1.0, "epochs": 2}
        hparams.log_run(tmp_path / f"{job}_optimizer.lr={lr}", params, metrics, "val_loss")
    assert hparams.log_sweep(tmp_path, objective="val_loss") == tmp_path / "sweep_hparams"
    experiment = _experiment(tmp_path)
    differs = {info.name: info.differs for info in experiment.hparam_infos}
    assert differs == {"optimizer.lr": True}  # model.arch and seed: every job's, left out
    lr = next(info for info in experiment.hparam_infos if info.name == "optimizer.lr")
    assert [v.number_value for v in lr.domain_discrete.values] == [0.05, 0.1, 0.2]
    metrics = [(m.name.tag, m.display_name) for m in experiment.metric_infos]
    assert metrics[0] == ("result/val_loss", "val_loss (objective)")
    assert metrics[1:] == [
        ("result/val_accuracy", "val_accuracy"),
        ("result/test_loss", "test_loss"),
    ]
    assert hparams.log_sweep(tmp_path / "empty", objective="val_loss") is None
    one = tmp_path / "one_job"  # nothing differs: every hyperparameter stays, not an empty table
    hparams.log_run(one / "0", {"optimizer.lr": 0.1, "seed": 0}, {"val_loss": 0.5}, "val_loss")
    hparams.log_sweep(one, objective="val_loss")
    assert sorted(info.name for info in _experiment(one).hparam_infos) == ["optimizer.lr", "seed"]


def test_job_dirs_are_named_by_their_overrides_safely():
    assert sweep.job_dirname(3, "model=resnet20,optimizer.lr=0.1") == (
        "3_model=resnet20,optimizer.lr=0.1"
    )
    assert sweep.job_dirname(0, "optimizer.lr=0.0123456789,data.path=/a b") == (
        "0_optimizer.lr=0.01235,data.path=_a_b"
    )
    assert sweep.job_dirname(7, "") == "7"
    assert len(sweep.job_dirname(12, "x" * 500)) == sweep.MAX_JOB_DIR


def test_a_multirun_leaves_its_constant_overrides_out_of_the_job_names(tmp_path):
    task = ["data=folder", "model.width=8", "model.width=2,4", "trainer.epochs=1", "seed=range(2)"]
    cfg = OmegaConf.create(
        {
            "hydra": {
                "overrides": {"task": task, "hydra": ["hydra.sweep.dir=x"]},
                "job": {"config": {"override_dirname": {"exclude_keys": ["resume"]}}},
            }
        }
    )
    sweep.SweepSummary(str(tmp_path), "val_accuracy", "maximize").on_multirun_start(cfg)
    assert list(cfg.hydra.overrides.hydra) == [
        "hydra.sweep.dir=x",
        "hydra.job.config.override_dirname.exclude_keys=['resume','data','trainer.epochs']",
    ]


def test_tensorboard_settings_are_checked_before_training():
    from pipeline.errors import PipelineError
    from pipeline.training import loop

    assert loop._profile_range(OmegaConf.create([10, 20])) == (10, 20)
    assert loop._profile_range(5) == (5, 5)
    for bad in ([0, 3], [20, 10], [1, 2, 3], "ten"):
        with pytest.raises(PipelineError, match="trainer.profile_batches must be"):
            loop._profile_range(bad)
    with pytest.raises(PipelineError, match="trainer.log_every_steps must be >= 0"):
        loop._tensorboard(Path("unused"), None, loop.ReportSettings(log_every_steps=-1))
    assert loop._tensorboard(Path("unused"), None, loop.ReportSettings(tensorboard=False)) == []
