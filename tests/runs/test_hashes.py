"""A run's artifact hashes (pipeline.runs.hashes) on a hand-made run directory: no training."""

import hashlib
import json
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline.errors import PipelineError
from pipeline.runs import hashes


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with a manifest, a model file and a SavedModel-like folder."""
    run = tmp_path / "run"
    (run / "export" / "saved_model" / "variables").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"data": {"class_names": ["a", "b"]}}))
    (run / "model.keras").write_bytes(b"model bytes")
    (run / "export" / "saved_model" / "saved_model.pb").write_bytes(b"graph")
    (run / "export" / "saved_model" / "variables" / "v.data").write_bytes(b"weights")
    return run


def test_record_then_verify_and_a_changed_file_is_refused(run_dir):
    recorded = hashes.record_artifacts(run_dir, [run_dir / "model.keras", "export/saved_model"])
    assert recorded == {
        "model.keras": hashlib.sha256(b"model bytes").hexdigest(),
        "export/saved_model": hashes.sha256_tree(run_dir / "export" / "saved_model"),
    }
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["artifacts"] == recorded and manifest["data"] == {"class_names": ["a", "b"]}
    assert hashes.verify_artifact(run_dir, run_dir / "model.keras") is True
    assert hashes.verify_artifact(run_dir, "export/saved_model") is True
    (run_dir / "export" / "saved_model" / "variables" / "v.data").write_bytes(b"other")
    with pytest.raises(PipelineError, match=r"export/saved_model was modified after training"):
        hashes.verify_artifact(run_dir, run_dir / "export" / "saved_model")


def test_unrecorded_files_load_unchecked_and_outside_files_are_refused(run_dir, tmp_path):
    assert hashes.verify_artifact(run_dir, run_dir / "model.keras") is False  # no hashes yet
    hashes.record_artifacts(run_dir, [run_dir / "model.keras"])
    assert hashes.verify_artifact(run_dir, "export/saved_model") is False  # not listed
    (tmp_path / "elsewhere.keras").write_bytes(b"x")
    with pytest.raises(PipelineError, match=r"elsewhere\.keras is not inside the run directory"):
        hashes.record_artifacts(run_dir, [tmp_path / "elsewhere.keras"])
    with pytest.raises(PipelineError, match=r"cannot record .*missing\.h5: no such file"):
        hashes.record_artifacts(run_dir, ["missing.h5"])
    with pytest.raises(PipelineError, match=r"has no manifest\.json"):
        hashes.record_artifacts(tmp_path, [tmp_path / "elsewhere.keras"])


def test_find_run_dir_and_verify_in_run(run_dir, tmp_path):
    saved_model = run_dir / "export" / "saved_model"
    assert hashes.find_run_dir(run_dir) == run_dir
    assert hashes.find_run_dir(saved_model) == run_dir  # two levels up
    assert hashes.find_run_dir(saved_model / "variables") is None  # three: too far
    assert hashes.find_run_dir(tmp_path) is None
    hashes.record_artifacts(run_dir, [run_dir / "model.keras"])
    hashes.verify_in_run(run_dir / "model.keras")
    (run_dir / "model.keras").write_bytes(b"tampered")
    with pytest.raises(PipelineError, match=r"model\.keras was modified after training"):
        hashes.verify_in_run(run_dir / "model.keras")


def test_import_leaves_tensorflow_and_keras_alone():
    code = (
        "import sys, pipeline.runs.hashes, pipeline.security; "
        "assert not {'tensorflow', 'keras'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
