"""`python -m pipeline.bench` on a tiny folder; window timing and ratios without TensorFlow work."""

import json
import statistics

import pytest
from omegaconf import OmegaConf

from conftest import REPO, TINY, run_module
from pipeline import bench
from pipeline.errors import PipelineError

QUICK = ["model=cnn", *TINY, "bench.warmup_steps=1", "bench.steps=2", "bench.windows=2"]


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("bench")
    run_dir = root / "run"
    proc = run_module(
        "pipeline.bench",
        "data=folder",
        f"data.path={tiny_folder}",  # 24 training images: 3 steps
        f"data.cache_dir={root / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *QUICK,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "bench.json").read_text()), proc.stdout, run_dir


def test_every_measurement_is_a_positive_median_of_its_windows(tiny_bench):
    result, _, _ = tiny_bench
    assert list(result["images_per_sec"]) == list(bench.MEASUREMENTS)
    for name, rates in result["windows"].items():
        assert len(rates) == 2 and all(r > 0 for r in rates), name
        assert result["images_per_sec"][name] == pytest.approx(statistics.median(rates))


def test_ratios_are_the_ratios_of_the_medians(tiny_bench):
    result, _, _ = tiny_bench
    rates = result["images_per_sec"]
    assert set(result["ratios"]) == set(bench.RATIOS)
    for name, (top, bottom, _) in bench.RATIOS.items():
        assert result["ratios"][name] > 0
        assert result["ratios"][name] == pytest.approx(rates[top] / rates[bottom])


def test_report_names_the_plan_and_data_and_prints_the_path(tiny_bench):
    result, stdout, run_dir = tiny_bench
    assert result["plan"]["strategy"] == "default" and result["plan"]["num_replicas"] == 1
    assert result["plan"]["precision"] == "float32" and result["plan"]["jit_compile"] is False
    assert result["data"]["source"] == "folder" and result["data"]["image_shape"] == [16, 16, 3]
    assert result["data"]["train_images"] == 24 and result["data"]["steps_per_epoch"] == 3
    assert result["settings"]["keras_fit_images"] == 24
    assert f"bench.json: {run_dir / 'bench.json'}" in stdout
    assert "end_to_end/synthetic" in stdout and "window 2/2" in stdout


class _Model:
    stop_training = False


@pytest.mark.parametrize(
    ("calls", "steps_per_execution", "rates"),
    [
        # the warm-up step, then windows of 8 + 2 and 8 + 8 images, one clock tick a call
        ([0, 1, 2, 0, 1], 1, [5.0, 8.0]),
        # two steps a call; an epoch's second call runs its one short batch only
        ([0, 2, 0, 2], 2, [9.0, 2.0]),
    ],
)
def test_windows_count_the_images_of_the_steps_that_ran(
    monkeypatch, calls, steps_per_execution, rates
):
    clock = iter(range(100))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    timer = bench._window_timer(
        warmup_steps=steps_per_execution,
        steps=2,
        windows=2,
        images_of=bench.images_per_step(8, steps_per_epoch=3, count=18),  # 8 + 8 + 2 images
        label="test",
    )
    timer.set_model(_Model())
    timer.on_train_begin()
    for begin in calls:
        timer.on_train_batch_begin(begin)
        timer.on_train_batch_end(begin + steps_per_execution - 1)
    assert timer.rates == rates
    assert timer.model.stop_training


def test_summarize_leaves_out_ratios_of_missing_measurements():
    result = bench.summarize({"pipeline": [30.0, 10.0, 20.0], "end_to_end": [4.0, 6.0]})
    assert result["images_per_sec"] == {"pipeline": 20.0, "end_to_end": 5.0}
    assert result["ratios"] == {
        "end_to_end/synthetic": None,
        "end_to_end/keras_fit": None,
        "pipeline/synthetic": None,
    }


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("steps", 0, "bench.steps must be >= 1, got 0"),
        ("warmup_steps", -1, "bench.warmup_steps must be >= 0, got -1"),
        ("which", ["pipeline", "fit"], "bench.which must list some of"),
    ],
)
def test_bad_bench_settings_name_the_key_and_value(key, value, message):
    cfg = OmegaConf.load(REPO / "conf" / "bench.yaml").bench
    cfg[key] = value
    with pytest.raises(PipelineError, match=message.replace("[", r"\[")) as err:
        bench.check_bench(cfg)
    if key == "which":
        assert "'fit'" in str(err.value)
