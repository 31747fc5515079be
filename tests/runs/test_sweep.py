"""Multirun sweeps on tiny data: grids, Optuna, failed jobs, HParams, launcher configs."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from conftest import CONF_DIR, REPO, TINY
from pipeline.runs import sweep

JOB = ["data=folder", *TINY, "trainer.epochs=1", "export.formats=[]"]  # each job of a sweep


def _multirun(sweep_dir, images, *overrides, timeout=240, env=None):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            "-m",
            *JOB,
            f"data.path={images}",
            f"hydra.sweep.dir={sweep_dir}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=env,
    )


def _summary(sweep_dir):
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def _job(sweep_dir, num):
    """Job ``num``'s directory: ``<num>_<overrides that vary>``."""
    (found,) = [p for p in sweep_dir.iterdir() if p.name.split("_")[0] == str(num)]
    return found


def _hparams_event(job_dir):
    """(hparams, final scalars) as TensorBoard's own event reader sees them."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(
        str(job_dir / "tensorboard" / "hparams"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    scalars = {
        tag: float(tensor_util.make_ndarray(acc.Tensors(tag)[-1].tensor_proto))
        for tag in acc.Tags()["tensors"]
        if tag != metadata.SESSION_START_INFO_TAG
    }
    return hparams, scalars


def _experiment(sweep_dir):
    """The HParams experiment (the table's layout) written at the end of the sweep."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    acc = event_accumulator.EventAccumulator(
        str(sweep_dir / "sweep_hparams"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG]
    return plugin_data_pb2.HParamsPluginData.FromString(content).experiment


def test_grid_multirun_summary_and_hparams(tmp_path, tiny_folder):
    proc = _multirun(tmp_path, tiny_folder, "model.width=2,4", "optimizer.lr=0.05,0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if (p / ".hydra").is_dir())
    grid = {0: (2, 0.05), 1: (2, 0.1), 2: (4, 0.05), 3: (4, 0.1)}  # Hydra's job order
    # named by what varies (the constant overrides, data.path among them, left out)
    names = [f"{num}_model.width={w},optimizer.lr={lr}" for num, (w, lr) in grid.items()]
    assert [p.name for p in jobs] == names
    metrics = {p.name: json.loads((p / "metrics.json").read_text()) for p in jobs}
    expected = sorted(metrics, key=lambda job: (-metrics[job]["val_accuracy"], names.index(job)))
    rows = _summary(tmp_path)
    assert [r["job"] for r in rows] == expected
    assert [r["best"] for r in rows] == ["True", "False", "False", "False"]
    for row in rows:
        assert row["status"] == "ok"
        assert float(row["val_accuracy"]) == pytest.approx(metrics[row["job"]]["val_accuracy"])
    assert (
        "model.width=4 optimizer.lr=0.1"
        in rows[[r["job"] for r in rows].index(names[3])]["overrides"]
    )
    table = [line for line in (tmp_path / "summary.md").read_text().splitlines() if line[:1] == "|"]
    assert len(table) == 2 + 4  # header, separator, 4 jobs
    assert "| 1 (best) |" in proc.stdout
    for job, (width, lr) in zip(names, grid.values(), strict=True):
        hparams, scalars = _hparams_event(tmp_path / job)
        assert hparams["model.width"] == width and hparams["optimizer.lr"] == pytest.approx(lr)
        assert hparams["model.arch"] == "cnn" and "trainer.verbose" not in hparams
        assert scalars["result/val_accuracy"] == pytest.approx(metrics[job]["val_accuracy"])
        assert scalars["result/test_accuracy"] == pytest.approx(metrics[job]["test_accuracy"])
    # the sweep's layout: what varies first, the objective's column first
    experiment = _experiment(tmp_path)
    varied = sorted(info.name for info in experiment.hparam_infos if info.differs)
    assert varied == ["model.width", "optimizer.lr"]
    assert experiment.metric_infos[0].name.tag == "result/val_accuracy"


def test_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_folder):
    proc = _multirun(tmp_path, tiny_folder, "optimizer.lr=-1,0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    failure = json.loads((tmp_path / "0_optimizer.lr=-1" / "failed.json").read_text())
    assert failure["error"] == "PipelineError" and "optimizer.lr must be > 0" in failure["reason"]
    assert (tmp_path / "1_optimizer.lr=0.05" / "metrics.json").is_file()
    rows = _summary(tmp_path)
    assert [(r["job"], r["status"], r["best"]) for r in rows] == [
        ("1_optimizer.lr=0.05", "ok", "True"),
        ("0_optimizer.lr=-1", "failed", "False"),
    ]
    assert "optimizer.lr must be > 0" in rows[1]["reason"]


def test_fail_fast_stops_the_sweep(tmp_path, tiny_folder):
    proc = _multirun(tmp_path, tiny_folder, "optimizer.lr=-1,0.05", "sweep.fail_fast=true")
    assert proc.returncode == 2
    assert "optimizer.lr must be > 0" in proc.stderr
    assert not list(tmp_path.glob("1_*")) and not (tmp_path / "summary.csv").exists()


def test_optuna_search_writes_best_parameters(tmp_path, tiny_folder):
    proc = _multirun(tmp_path, tiny_folder, "hparams_search=optuna", "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    # data.batch_size is fixed on the command line, so it leaves the search space
    assert set(results["best_params"]) == {
        "optimizer.lr",
        "optimizer.weight_decay",
        "trainer.label_smoothing",
    }
    values = [json.loads((_job(tmp_path, j) / "metrics.json").read_text()) for j in range(3)]
    # named by the searched parameters, cut to 4 digits; data.batch_size is fixed: left out
    assert _job(tmp_path, 0).name.startswith("0_optimizer.lr=")
    assert "data.batch_size" not in _job(tmp_path, 0).name
    assert results["best_value"] == pytest.approx(max(v["val_accuracy"] for v in values))
    assert "Best parameters" in proc.stdout + proc.stderr
    assert len(_summary(tmp_path)) == 3


def _compose_hydra(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "launcher, target, key, value",
    [
        ("joblib", "pipeline_sweep_launcher.SurvivingJoblibLauncher", "n_jobs", 2),
        ("slurm", "hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "gpus_per_node", 1),
    ],
)
def test_launcher_configs_compose(launcher, target, key, value):
    cfg = _compose_hydra([f"launcher={launcher}", "model=resnet20"])
    assert cfg.hydra.launcher._target_ == f"hydra_plugins.{target}"
    assert cfg.hydra.launcher[key] == value
    assert cfg.model.arch == "resnet20"


def test_optuna_config_composes_with_the_objective():
    cfg = _compose_hydra(["hparams_search=optuna", "objective.direction=minimize"])
    assert cfg.hydra.sweeper.direction == "minimize"
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert cfg.hydra.callbacks.sweep_summary.metric == "val_accuracy"


def test_worst_value_sorts_last():
    assert sweep.worst_value("maximize") == -math.inf
    assert sweep.worst_value("minimize") == math.inf
    with pytest.raises(ValueError, match="got 'up'"):
        sweep.worst_value("up")


def test_parallel_jobs_claim_different_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(sweep, "_GPU_LOCK", None)
    assert sweep.claim_gpu(tmp_path, num_gpus=2) == 0
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pipeline.runs import sweep; "
            f"print(sweep.claim_gpu({str(tmp_path)!r}, num_gpus=2))",
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"},
        timeout=60,
    )
    assert other.stdout.strip() == "1", other.stderr
    sweep._GPU_LOCK.close()


def test_joblib_sweep_survives_a_killed_job(tmp_path, tiny_folder):
    env = {**os.environ, sweep.KILL_JOB_ENV: "1"}  # job 1 SIGKILLs itself, like an OOM kill
    proc = _multirun(
        tmp_path, tiny_folder, "launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1,2", env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = (proc.stdout + proc.stderr).splitlines()
    assert "#1" in next(line for line in output if "re-running job(s)" in line)
    failure = json.loads((tmp_path / "1_seed=1" / "failed.json").read_text())
    assert failure["reason"] == sweep.CRASH_REASON
    rows = {r["job"]: r for r in _summary(tmp_path)}
    jobs = ["0_seed=0", "1_seed=1", "2_seed=2"]
    assert sorted(rows) == jobs
    assert [rows[job]["status"] for job in jobs] == ["ok", "failed", "ok"]
    assert "crashed" in rows["1_seed=1"]["reason"] and rows["1_seed=1"]["best"] == "False"
    for job in ("0_seed=0", "2_seed=2"):
        assert (tmp_path / job / "metrics.json").is_file()
        assert not (tmp_path / job / "failed.json").exists()
