"""logger=mlflow against a real `mlflow server`, logger=csv, and where the tracking goes.

The server runs once for the module on 127.0.0.1 (SQLite store and artifacts under a
temporary folder); runs are read back through ``MlflowClient``, as a user would.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import open_dict

from conftest import TINY, compose, run_module
from pipeline import config
from pipeline.errors import PipelineError
from pipeline.runs import tracking
from pipeline.train import train

SERVER_START_S = 120  # an mlflow server sets up its SQLite store before it answers
PER_EPOCH_ONLY = ("loss", "accuracy", "learning_rate")  # no final metric has these names


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(uri: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer in {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """The URI of a real ``mlflow server`` for this module; stopped at its end."""
    root = tmp_path_factory.mktemp("mlflow_server")
    log = root / "server.log"
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
        *("--port", str(_free_port()), "--workers", "1"),
        *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--artifacts-destination", str(root / "artifacts")),
    ]
    uri = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    with log.open("w") as out:  # its own process group, to stop its workers with it
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
        )
    try:
        _wait_until_up(uri, server, log)
        yield uri
    finally:
        # the whole group (mlflow's CLI and its uvicorn workers), at once: on SIGTERM uvicorn
        # would wait for the test's idle keep-alive connections, and its store is thrown away
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([found.experiment_id])


@pytest.fixture(scope="module")
def tracked(mlflow_server, tiny_folder, tmp_path_factory):
    """A tiny run with logger=[tensorboard,mlflow,csv]: 1 epoch, then resumed to 2."""
    root = tmp_path_factory.mktemp("tracked")
    overrides = [
        *("data=folder", f"data.path={tiny_folder}", f"data.cache_dir={root / 'cache'}", *TINY),
        "export.formats=[]",
        "logger=[tensorboard,mlflow,csv]",
        f"logger.mlflow.tracking_uri={mlflow_server}",
        "logger.mlflow.experiment=tracked",
    ]
    run_dir = root / "run"
    train(compose([*overrides, "trainer.epochs=1"]), run_dir=run_dir)
    metrics = train(compose([*overrides, "trainer.epochs=2"]), run_dir=run_dir)  # resumes it
    client = _client(mlflow_server)
    runs = _runs(client, "tracked")
    return SimpleNamespace(dir=run_dir, metrics=metrics, client=client, runs=runs, run=runs[0])


def test_a_resumed_run_continues_its_mlflow_run(tracked):
    assert len(tracked.runs) == 1
    recorded = json.loads((tracked.dir / tracking.RUN_FILE).read_text())
    assert recorded["run_id"] == tracked.run.info.run_id
    assert tracked.run.info.status == "FINISHED"


def test_params_are_the_config_and_a_resume_changes_are_tags(tracked):
    params, tags = tracked.run.data.params, tracked.run.data.tags
    assert params["model.arch"] == "cnn"
    assert params["data.image_size"] == "16" and params["data.batch_size"] == "8"
    assert params["trainer.label_smoothing"] == "0.1"
    assert params["trainer.epochs"] == "1"  # MLflow keeps a param's first value ...
    assert tags[tracking.RESUMED_TAG + "trainer.epochs"] == "2"  # ... the resume's is a tag
    assert not any(key.startswith("logger") for key in params)  # where it goes, not what
    assert tags["pipeline.run_dir"] == str(tracked.dir)


def test_every_epoch_is_logged_at_its_epoch(tracked):
    history = json.loads((tracked.dir / "history.json").read_text())
    run_id = tracked.run.info.run_id
    for key in PER_EPOCH_ONLY:
        logged = sorted(tracked.client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in logged] == [0, 1], key
        assert [m.value for m in logged] == pytest.approx(history[key], rel=1e-6), key
    # val_* share their names with final metrics (logged at step = epochs, 1 before the resume)
    val = tracked.client.get_metric_history(run_id, "val_accuracy")
    for epoch, value in enumerate(history["val_accuracy"]):
        assert any(m.value == pytest.approx(value) for m in val if m.step == epoch), epoch


def test_final_metrics_equal_metrics_json(tracked):
    saved = json.loads((tracked.dir / "metrics.json").read_text())
    expected = tracking.numbers(saved)
    assert {"test_accuracy", "val_loss", "best_val_accuracy", "epochs"} <= set(expected)
    logged = tracked.run.data.metrics  # each key's latest value
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-9), key
    assert logged["epochs"] == 2


def test_artifacts_hold_the_model_records_and_a_confusion_matrix(tracked, tmp_path):
    run_id = tracked.run.info.run_id
    listed = {a.path for a in tracked.client.list_artifacts(run_id)}
    assert {"model.keras", "manifest.json", "metrics.json", "history.json"} <= listed
    images = {a.path for a in tracked.client.list_artifacts(run_id, tracking.IMAGES_DIR)}
    assert images == {"images/confusion_matrix_test.png"}
    got = Path(tracked.client.download_artifacts(run_id, "metrics.json", str(tmp_path)))
    assert json.loads(got.read_text()) == json.loads((tracked.dir / "metrics.json").read_text())
    png = Path(tracked.client.download_artifacts(run_id, images.pop(), str(tmp_path)))
    assert png.read_bytes().startswith(b"\x89PNG")


def test_tensorboard_still_logs_beside_mlflow(tracked):
    assert list((tracked.dir / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert (tracked.dir / "tensorboard" / "hparams").is_dir()


def test_csv_logger_writes_a_row_per_epoch_and_appends_on_resume(tracked):
    with (tracked.dir / config.CSV_FILE).open() as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["0", "1"]  # the resume appended, one header
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(rows[0])
    history = json.loads((tracked.dir / "history.json").read_text())
    assert [float(row["val_accuracy"]) for row in rows] == pytest.approx(history["val_accuracy"])


def test_a_sweep_is_one_experiment_of_runs_named_and_tagged_by_job(
    mlflow_server, tiny_folder, tmp_path
):
    sweep_dir = tmp_path / "sweep"
    proc = run_module(
        "pipeline.train",
        "-m",
        *("debug=fast", "data=folder", f"data.path={tiny_folder}", *TINY),
        f"data.cache_dir={tmp_path / 'cache'}",
        "logger=mlflow",
        f"logger.mlflow.tracking_uri={mlflow_server}",
        "logger.mlflow.experiment=sweep",
        "seed=0,1",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(_client(mlflow_server), "sweep")
    by_job = {run.data.tags["pipeline.job"]: run for run in runs}
    assert sorted(by_job) == ["0", "1"]
    for job, run in by_job.items():
        assert run.data.tags["pipeline.sweep_dir"] == str(sweep_dir)
        assert f"seed={job}" in run.info.run_name.split(",")
        assert run.data.params["seed"] == job
        assert run.info.status == "FINISHED"
        job_dir = Path(run.data.tags["pipeline.run_dir"])
        assert job_dir.parent == sweep_dir and (job_dir / "metrics.json").is_file()
        assert not (job_dir / "tensorboard").exists()  # logger=mlflow: MLflow only


def test_an_unreachable_server_is_one_line_before_training(tiny_folder, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    cfg = compose(
        [
            *("data=folder", f"data.path={tiny_folder}", *TINY),
            "logger=[tensorboard,mlflow]",
            f"logger.mlflow.tracking_uri={uri}",
        ]
    )
    started = time.monotonic()
    with pytest.raises(PipelineError, match="cannot reach the MLflow server") as err:
        train(cfg, run_dir=tmp_path / "run")
    message = str(err.value)
    assert uri in message and "logger.mlflow.tracking_uri" in message and "\n" not in message
    assert not (tmp_path / "run" / "backup").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert time.monotonic() - started < 30  # MLflow's own client would retry for minutes


def test_the_store_is_the_config_then_the_environment_then_mlruns(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = config.tracking_settings(compose(["logger=mlflow"]), tmp_path / "run")
    assert local.tracking_uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert local.artifact_location == (tmp_path / "mlruns" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    from_env = config.tracking_settings(compose(["logger=mlflow"]), tmp_path / "run")
    assert (from_env.tracking_uri, from_env.uri_from) == (
        "http://tracking.example:5000",
        "MLFLOW_TRACKING_URI",
    )
    chosen = config.tracking_settings(
        compose(["logger=mlflow", "logger.mlflow.tracking_uri=http://other:5000"]), tmp_path
    )
    assert chosen.tracking_uri == "http://other:5000"
    assert config.tracking_settings(compose([]), tmp_path) is None  # tensorboard only


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ("tensorboard",)),
        (["logger=mlflow"], ("mlflow",)),
        (["logger=[tensorboard,mlflow,csv]"], ("tensorboard", "mlflow", "csv")),
        (["logger=[]"], ()),
    ],
)
def test_logger_group_picks_any_of_the_loggers(overrides, expected):
    assert config.loggers(compose(overrides)) == expected


def test_a_run_from_before_the_logger_group_logs_to_tensorboard():
    cfg = compose([])
    with open_dict(cfg):
        del cfg["logger"]
    assert config.loggers(cfg) == ("tensorboard",)


def test_passwords_stay_out_of_messages():
    assert tracking.shown_uri("https://ana:s3cret@mlflow.example/x") == (
        "https://ana:***@mlflow.example/x"
    )
