"""A tf.data service on 127.0.0.1: a dispatcher and two workers, each its own process.

A tiny run trains through them (``data.service=grpc://127.0.0.1:P``); every
process prints each file it decodes (``PIPELINE_LOG_DECODES``), so the test
sees that the workers decoded every training image once per epoch and the
trainer none. A second fleet loses a worker mid-epoch. Every process is killed
at the end, whatever happens.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from pipeline.data import remote as service
from pipeline.errors import PipelineError

TIMEOUT_S = 240
TINY = [
    "data=folder",
    "data.image_size=16",
    "data.batch_size=8",
    "data.cache_dir=null",
    "augment=none",
    "model.width=4",
    "trainer.verbose=2",
    "export.formats=[]",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "PIPELINE_LOG_DECODES": "1"}


def plain_folder(root: Path, per_class: int, classes=("cat", "dog", "fox")) -> Path:
    """8-bit RGB PNGs and JPEGs only: what a service worker decodes with TensorFlow's ops."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 40, (20, 20, 3), dtype=np.uint8)
            pixels[..., c] += 200
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(root / name / f"img{i}.{ext}")
    return root


class Fleet:
    """A dispatcher and ``workers`` workers on 127.0.0.1, logging to ``root``."""

    def __init__(self, root: Path, workers: int = 2):
        self.root, self.port, self.procs = root, _free_port(), {}
        self._start(
            "dispatcher",
            "dispatcher",
            "--port",
            str(self.port),
            "--work-dir",
            str(root / "journal"),
        )
        self._wait_listening()
        for i in range(workers):
            self._start(
                f"worker{i}",
                "worker",
                "--dispatcher",
                f"127.0.0.1:{self.port}",
                "--address",
                "127.0.0.1",
            )

    @property
    def address(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def _start(self, name: str, *args: str) -> None:
        with open(self.root / f"{name}.log", "w") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "pipeline.data.service", *args],
                cwd=REPO,
                env=_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                service.check_reachable(self.address, timeout=1.0)
                return
            except PipelineError:
                time.sleep(0.5)
        pytest.fail(f"the dispatcher did not listen:\n{self.log('dispatcher')}")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def decoded(self, tag: str) -> list[str]:
        prefix = f"pipeline-decoded {tag} "
        lines = [self.log(n).splitlines() for n in self.procs if n.startswith("worker")]
        return [line[len(prefix) :] for log in lines for line in log if line.startswith(prefix)]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def fleet(tmp_path):
    started = Fleet(tmp_path)
    yield started
    started.close()


def _train(root: Path, folder: Path, address: str, *overrides: str) -> subprocess.Popen:
    out = open(root / "trainer.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            *TINY,
            f"data.path={folder}",
            f"data.service={address}",
            f"hydra.run.dir={root / 'run'}",
            *overrides,
        ],
        cwd=REPO,
        env=_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def _trainer_decoded(root: Path) -> list[str]:
    log = (root / "trainer.log").read_text()
    return [line for line in log.splitlines() if line.startswith("pipeline-decoded")]


def test_a_run_trains_on_batches_the_service_workers_decode(fleet, tmp_path):
    folder = plain_folder(tmp_path / "images", per_class=10)  # 24 train, 3 val, 3 test
    trainer = _train(tmp_path, folder, fleet.address, "trainer.epochs=2")
    try:
        code = trainer.wait(timeout=TIMEOUT_S)
    finally:
        trainer.kill()
    log = (tmp_path / "trainer.log").read_text()
    assert code == 0, log[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    members = json.loads((tmp_path / "run" / "manifest.json").read_text())["data"]["splits"]
    train = sorted(str(folder / m) for m in members["train"])
    assert len(train) == 24
    for epoch in range(2):  # batches are numbered over the run; the log names their epoch
        assert sorted(fleet.decoded(f"train:{epoch}")) == train  # each image once per epoch
    assert set(fleet.decoded("train:2")) <= set(train)  # the spare epoch, made ahead (in part)
    assert sorted(fleet.decoded("stats")) == train  # the statistics pass, on the workers
    assert len(fleet.decoded("first")) == 8
    # The trainer decodes only its validation and test images (3 + 3, cached), no training image.
    mine = _trainer_decoded(tmp_path)
    assert all(line.startswith("pipeline-decoded split ") for line in mine), mine[:5]
    assert not {line.split(" ", 2)[2] for line in mine} & set(train)


def test_epochs_are_permutations_that_change_with_the_epoch():
    import tensorflow as tf

    count, batch, steps = 50, 8, 7
    epochs = []
    for epoch in range(3):
        ks = tf.range(epoch * steps, (epoch + 1) * steps, dtype=tf.int64)
        order = np.concatenate(
            [
                service._batch_indices(
                    k, steps=steps, batch_size=batch, count=count, seed=4
                ).numpy()
                for k in ks
            ]
        )
        assert sorted(order) == list(range(count))
        epochs.append(order)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_losing_a_worker_mid_run_keeps_the_run_and_what_it_wrote(tmp_path):
    fleet = Fleet(tmp_path)
    folder = plain_folder(tmp_path / "images", per_class=60)  # 144 train: 18 batches an epoch
    trainer = _train(tmp_path, folder, fleet.address, "trainer.epochs=6")
    backups = tmp_path / "run" / "backup"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not list(backups.glob("ckpt-*.npz")) and trainer.poll() is None:  # epoch 1 done
            assert time.monotonic() < deadline, (tmp_path / "trainer.log").read_text()[-3000:]
            time.sleep(0.1)
        fleet.procs["worker1"].send_signal(signal.SIGKILL)
        killed_after = len(fleet.decoded("train:5"))
        code = trainer.wait(timeout=TIMEOUT_S)
    finally:
        trainer.kill()
        fleet.close()
    log = (tmp_path / "trainer.log").read_text()
    run = tmp_path / "run"
    if code == 0:  # the other worker made the rest
        assert json.loads((run / "metrics.json").read_text())["epochs"] == 6
        assert len(fleet.decoded("train:5")) > killed_after  # the last epoch: after the loss
    else:  # one line naming the service, and the backups kept
        last = log.strip().splitlines()[-1]
        assert "data.service" in last or "tf.data service" in last, log[-3000:]
        assert list(backups.glob("ckpt-*.npz"))
    assert list((run / "checkpoints").glob("*.weights.h5"))


def test_no_dispatcher_is_one_line_naming_the_command():
    port = _free_port()
    with pytest.raises(PipelineError) as err:
        service.check_reachable(f"grpc://127.0.0.1:{port}", timeout=1.0)
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "\n" not in message
    assert f"python -m pipeline.data.service dispatcher --port {port}" in message


@pytest.mark.parametrize("bad", ["127.0.0.1", "http://host:1", "grpc://:5050"])
def test_a_bad_address_is_refused(bad):
    with pytest.raises(PipelineError, match="grpc://host:port"):
        service.address(bad)


def test_a_folder_with_images_only_pillow_decodes_is_refused_before_training(tmp_path):
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "images", per_class=10)  # bmp and gif among them
    address = f"grpc://127.0.0.1:{_free_port()}"  # refused before any dispatcher is asked
    trainer = _train(tmp_path, folder, address, "trainer.epochs=1")
    code = trainer.wait(timeout=TIMEOUT_S)
    log = (tmp_path / "trainer.log").read_text()
    assert code != 0
    assert "need Pillow to decode" in log and "Convert them to RGB JPEG or PNG" in log


def test_bench_measures_the_input_through_the_service(fleet, tmp_path):
    folder = plain_folder(tmp_path / "images", per_class=10)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.bench",
            "data=folder",
            f"data.path={folder}",
            "data.image_size=16",
            "data.batch_size=8",
            "data.cache_dir=null",
            "model.width=4",
            f"data.service={fleet.address}",
            "bench.which=[pipeline,end_to_end]",
            "bench.warmup_steps=1",
            "bench.steps=2",
            "bench.windows=2",
            f"hydra.run.dir={tmp_path / 'bench'}",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert result["settings"]["service"] == fleet.address
    rates = result["images_per_sec"]
    assert rates["pipeline"] > 0 and rates["end_to_end"] > 0
    assert fleet.decoded("train:0")  # the service's workers made the batches
    assert not any(line.startswith("pipeline-decoded train") for line in proc.stderr.splitlines())
