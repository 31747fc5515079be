"""Two workers on 127.0.0.1 (MultiWorkerMirroredStrategy) train as one process does.

Each worker is its own process, as on two machines, and so is the one-process
run: two strategies in one process clash. A worker that hangs in a collective
is killed at the timeout, so it never hangs the test run. The SLURM and
TF_CONFIG resolution tests launch nothing.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, write_image_folder
from pipeline.errors import PipelineError
from pipeline.training import devices as trainer
from pipeline.training import distributed

# 3 classes x 10 images leave 24 training images: three global batches of 8, each
# split 4 + 4 across the two workers. The default cnn has BatchNorm: with two
# replicas trainer.sync_batchnorm=auto normalizes over the global batch, so the
# math is one device's.
COMMON = [
    "data=folder",
    "data.image_size=16",
    "data.batch_size=8",
    "data.cache_dir=null",
    "augment=none",
    "model=cnn",
    "model.width=4",
    "model.dropout=0.0",
    "trainer.epochs=1",
    "trainer.verbose=2",
    "trainer.deterministic=true",
    "export.formats=[]",
]
TIMEOUT_S = 240  # per run; a healthy one takes about 20 s on 2 cores
HYDRA_OWN = {".hydra", "train.log"}  # written by Hydra before train() starts, in every process
CLUSTER_VARIABLES = ("TF_CONFIG", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tf_config: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARIABLES}
    env["PIPELINE_LOG_DECODES"] = "1"  # each decoded file: a line on the decoding process's stderr
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _run_all(root: Path, runs: dict[str, tuple[list[str], dict]]) -> dict[str, str]:
    """Starts every run at once, waits for all; kills the rest when one fails or hangs."""
    procs, logs = {}, {}
    try:
        for name, (overrides, env) in runs.items():
            logs[name] = root / f"{name}.log"
            with open(logs[name], "w") as out:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "pipeline.train", *COMMON, *overrides],
                    cwd=REPO,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        for name, proc in procs.items():
            try:
                proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} ran past {TIMEOUT_S} s:\n{logs[name].read_text()[-3000:]}")
            assert proc.returncode == 0, f"{name} failed:\n{logs[name].read_text()[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: path.read_text() for name, path in logs.items()}


def _start(root: Path, name: str, overrides: list[str], env: dict, common=True):
    with open(root / f"{name}.log", "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.train", *(COMMON if common else []), *overrides],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_all(procs: dict[str, subprocess.Popen]) -> dict[str, int]:
    try:
        return {name: proc.wait(timeout=TIMEOUT_S) for name, proc in procs.items()}
    except subprocess.TimeoutExpired:
        pytest.fail(f"a worker ran past {TIMEOUT_S} s")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigterm_to_one_worker_stops_all_with_a_backup_and_a_restart_resumes(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=10)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    run = tmp_path / "run"  # one run dir for both, as on a shared filesystem

    def env(i, **extra):
        return {**_env({"cluster": cluster, "task": {"type": "worker", "index": i}}), **extra}

    common = [f"data.path={folder}", "trainer.strategy=multi_worker", "trainer.epochs=3"]
    first = {
        "w0": _start(tmp_path, "w0", [*common, f"hydra.run.dir={run}"], env(0)),
        "w1": _start(
            tmp_path,
            "w1",
            [*common, f"hydra.run.dir={run}"],
            env(1, PIPELINE_TEST_KILL_AT="2:1:TERM"),
        ),
    }
    codes = _wait_all(first)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in first}
    assert codes == {"w0": 143, "w1": 143}, logs["w0"][-3000:] + logs["w1"][-3000:]
    assert all("stopped by SIGTERM at epoch 2, step 2" in log for log in logs.values())
    assert not (run / "metrics.json").exists()
    (backup,) = [p.name for p in (run / "backup").glob("ckpt-*.npz") if "000000005" in p.name]

    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    again = {  # the run's own config: only resume= and where this launch logs
        f"r{i}": _start(
            tmp_path, f"r{i}", [f"resume={run}", f"hydra.run.dir={tmp_path}/r{i}"], env(i), False
        )
        for i in range(2)
    }
    codes = _wait_all(again)
    assert codes == {"r0": 0, "r1": 0}, (tmp_path / "r1.log").read_text()[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["num_replicas"] == 2
    assert metrics["resumed_from"] == {"backup": backup, "epoch": 1, "step": 2}


def _weights(path: Path) -> dict[str, np.ndarray]:
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: found.update({n: o[()]}) if isinstance(o, h5py.Dataset) else None)
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiworker")
    folder = write_image_folder(root / "images", per_class=10)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    workers = {
        f"worker{i}": (
            [f"data.path={folder}", "trainer.strategy=multi_worker", f"hydra.run.dir={root}/w{i}"],
            _env({"cluster": cluster, "task": {"type": "worker", "index": i}}),
        )
        for i in range(2)
    }
    logs = _run_all(root, workers)
    single = [f"data.path={folder}", "trainer.strategy=default", f"hydra.run.dir={root}/single"]
    logs.update(_run_all(root, {"single": (single, _env())}))
    return root, logs


def test_two_workers_train_as_one_process(runs):
    root, _ = runs
    chief = json.loads((root / "w0" / "metrics.json").read_text())
    single = json.loads((root / "single" / "metrics.json").read_text())
    assert (chief["strategy"], chief["num_replicas"]) == ("multi_worker", 2)
    assert (single["strategy"], single["num_replicas"]) == ("default", 1)
    history = [json.loads((root / r / "history.json").read_text()) for r in ("single", "w0")]
    np.testing.assert_allclose(history[0]["loss"], history[1]["loss"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(history[0]["val_loss"], history[1]["val_loss"], atol=1e-5, rtol=0)
    a, b = (_weights(root / r / "checkpoints" / "last.weights.h5") for r in ("single", "w0"))
    assert a.keys() == b.keys() and len(a) > 10
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert diff <= 1e-5, f"weights differ by up to {diff}"


def test_batchnorm_is_synchronized_across_the_workers_only(runs):
    root, logs = runs
    chief = json.loads((root / "w0" / "metrics.json").read_text())
    single = json.loads((root / "single" / "metrics.json").read_text())
    assert chief["sync_batchnorm"] is True and single["sync_batchnorm"] is False
    assert "trainer.sync_batchnorm auto -> True (2 replica(s))" in logs["worker0"]
    stats = [json.loads((root / r / "stats.json").read_text()) for r in ("single", "w0")]
    np.testing.assert_allclose(stats[1]["mean"], stats[0]["mean"], rtol=1e-12)
    np.testing.assert_allclose(stats[1]["std"], stats[0]["std"], rtol=1e-12)


def _decoded(log: str, tag: str) -> list[str]:
    prefix = f"pipeline-decoded {tag} "
    return [line[len(prefix) :] for line in log.splitlines() if line.startswith(prefix)]


def test_each_worker_decodes_only_its_share(runs):
    """Training and statistics: each worker decodes half the images, the two halves all of them."""
    root, logs = runs
    members = json.loads((root / "w0" / "manifest.json").read_text())["data"]["splits"]["train"]
    train = {str(root / "images" / m) for m in members}
    assert len(train) == 24
    chief = json.loads((root / "w0" / "metrics.json").read_text())
    assert chief["data_shard"] == {"worker": 0, "workers": 2}
    for tag in ("train", "stats"):  # one epoch: each training image once
        halves = [_decoded(logs[f"worker{i}"], tag) for i in range(2)]
        assert [len(h) for h in halves] == [12, 12], tag
        assert set(halves[0]).isdisjoint(halves[1]) and set(halves[0]) | set(halves[1]) == train
    first = [_decoded(logs[f"worker{i}"], "first") for i in range(2)]  # the pre-flight batch
    assert [len(f) for f in first] == [4, 4] and set(first[0]).isdisjoint(first[1])
    assert not _decoded(logs["single"], "train")  # one process: its cached split, decoded once
    assert len(_decoded(logs["single"], "split")) >= 24


def test_only_the_chief_writes_the_run(runs):
    root, logs = runs
    chief = {p.name for p in (root / "w0").iterdir()}
    assert {"metrics.json", "model.keras", "manifest.json", "checkpoints", "tensorboard"} <= chief
    assert {p.name for p in (root / "w1").iterdir()} <= HYDRA_OWN
    scratch = re.search(r"run dir\s+(\S+)", logs["worker1"]).group(1)  # the summary's last row
    assert scratch != str(root / "w1") and not Path(scratch).exists()


def test_every_split_is_sharded_by_batch_not_by_file():
    import tensorflow as tf

    from pipeline import data

    source = data.load_source("digits", image_size=8, seed=0, test_fraction=0.2, val_fraction=0.1)
    bundle = data.make_datasets(source, batch_size=16, seed=0)
    for split in ("train", "first_batch", "val", "test"):
        policy = getattr(bundle, split).options().experimental_distribute.auto_shard_policy
        assert policy == tf.data.experimental.AutoShardPolicy.DATA, split


@pytest.fixture
def no_cluster(monkeypatch):
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _slurm(monkeypatch, *, procid, nodelist, tasks_per_node, tasks=2, job_id=1234):
    monkeypatch.setenv("SLURM_JOB_ID", str(job_id))
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", str(tasks))
    monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", tasks_per_node)


def _auto_strategy() -> tuple[str, list[str]]:
    devices = trainer.Devices(gpus=[], cpus=["/device:CPU:0"])
    plan = trainer.plan(strategy="auto", precision="auto", jit_compile="auto", devices=devices)
    return plan.strategy, plan.reasons


@pytest.mark.parametrize("procid", [0, 1])
def test_slurm_step_of_two_nodes(no_cluster, procid):
    _slurm(no_cluster, procid=procid, nodelist="gpu[07-08]", tasks_per_node="1(x2)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    resolver = distributed.cluster_resolver()
    assert distributed.cluster_source() == "SLURM"
    port = distributed.SLURM_PORT_BASE + 1234
    assert resolver.cluster_spec().as_dict() == {"worker": [f"gpu07:{port}", f"gpu08:{port}"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", procid)
    assert distributed.is_chief() is (procid == 0)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible  # SLURM binds GPUs, not the resolver
    strategy, reasons = _auto_strategy()
    assert strategy == "multi_worker" and "a SLURM step of 2 tasks" in reasons[0]


def test_slurm_tasks_sharing_a_node_get_their_own_ports(no_cluster):
    _slurm(no_cluster, procid=1, nodelist="node01", tasks_per_node="2", job_id=20001)
    spec = distributed.cluster_resolver().cluster_spec().as_dict()
    port = distributed.SLURM_PORT_BASE + 1
    assert spec == {"worker": [f"node01:{port}", f"node01:{port + 1}"]}


def test_one_slurm_task_or_none_trains_alone(no_cluster):
    assert distributed.cluster_source() is None and distributed.is_chief()
    _slurm(no_cluster, procid=0, nodelist="node01", tasks_per_node="1", tasks=1)
    assert distributed.cluster_source() is None and distributed.cluster_resolver() is None
    assert _auto_strategy()[0] == "default"


@pytest.mark.parametrize(
    ("cluster", "task", "chief"),
    [
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True),
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "chief", "index": 0}, True),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "worker", "index": 0}, False),
    ],
)
def test_tf_config_chief(no_cluster, cluster, task, chief):
    _slurm(no_cluster, procid=1, nodelist="node[1-2]", tasks_per_node="1(x2)")  # TF_CONFIG wins
    no_cluster.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert distributed.cluster_source() == "TF_CONFIG"
    assert distributed.is_chief() is chief
    strategy, reasons = _auto_strategy()
    assert strategy == "multi_worker" and "TF_CONFIG is set" in reasons[0]


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG needs"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', "index"),
    ],
)
def test_bad_tf_config_is_named(no_cluster, tf_config, message):
    no_cluster.setenv("TF_CONFIG", tf_config)
    with pytest.raises(PipelineError, match=message):
        distributed.cluster_resolver()
