"""``python -m pipeline.doctor``: the CPU report, the GPU failures it names, ``--json``.

Each doctor run is its own process, with the environment under test: no
TF_CONFIG, and no real ``nvidia-smi`` on the PATH (a fake one where a test
wants one). ``diagnose`` is also checked in-process on hand-made GPU facts,
which this CPU machine cannot produce.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline import doctor
from pipeline.training import devices

FAKE_GPU_LINE = "NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB, 9.0"
# On a machine with a real GPU, hiding nvidia-smi is not enough: hide the GPU from CUDA too.
REAL_NVIDIA_SMI = shutil.which("nvidia-smi")
PART_ONE_KEYS = {
    "versions",
    "keras_backend",
    "cuda_build",
    "gpus",
    "nvidia_smi",
    "driver_version",
    "cuda_visible_devices",
    "plan",
    "problems",
    "notes",
    "ok",
}


def _env(*, fake_smi_dir=None, cuda_visible_devices=None) -> dict:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d]
    path = [d for d in path if not os.path.exists(os.path.join(d, "nvidia-smi"))]
    if fake_smi_dir is not None:
        path.insert(0, str(fake_smi_dir))
    env["PATH"] = os.pathsep.join(path)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    elif REAL_NVIDIA_SMI and fake_smi_dir is None:
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


def _doctor(*args, **env_kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.doctor", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(**env_kwargs),
        timeout=120,
    )


@pytest.fixture
def fake_smi(tmp_path):
    """A directory holding an ``nvidia-smi`` that lists one H100."""
    script = tmp_path / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "{FAKE_GPU_LINE}"\n')
    script.chmod(0o755)
    return tmp_path


@pytest.fixture(scope="module")
def cpu_json():
    proc = _doctor("--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_cpu_machine_reports_no_gpu_and_cpu_choices():
    proc = _doctor()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    out = proc.stdout
    assert "CPU (no GPU)" in out
    assert "nvidia-smi            not found" in out
    assert "strategy=auto         default (no GPUs)" in out
    assert "precision=auto        float32 (no GPU)" in out
    assert "jit_compile=auto      off (CPU only)" in out
    assert "training runs on the CPU" in out
    assert "ERROR" not in out
    assert out.strip().splitlines()[-1] == (
        "READY: device: CPU (no GPU) | strategy: default | precision: float32 | XLA: off"
    )


def test_json_holds_every_field(cpu_json):
    import hydra
    import keras
    import tensorflow as tf

    assert PART_ONE_KEYS - set(cpu_json) == set()
    versions = cpu_json["versions"]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["tensorflow"] == tf.__version__
    assert versions["keras"] == keras.__version__
    assert versions["hydra"] == hydra.__version__
    assert versions["tensorflow_datasets"]
    assert cpu_json["keras_backend"] == "tensorflow"
    build = tf.sysconfig.get_build_info()
    assert cpu_json["cuda_build"]["is_cuda_build"] == build["is_cuda_build"]
    assert cpu_json["cuda_build"]["cuda_version"] == build.get("cuda_version")
    assert cpu_json["cuda_build"]["cudnn_version"] == build.get("cudnn_version")
    assert cpu_json["gpus"] == []
    assert cpu_json["nvidia_smi"] == {"path": None, "gpus": [], "error": None}
    assert cpu_json["driver_version"] is None
    assert cpu_json["plan"] == {
        "strategy": {"requested": "auto", "resolved": "default", "reason": "no GPUs"},
        "precision": {"requested": "auto", "resolved": "float32", "reason": "no GPU"},
        "jit_compile": {"requested": "auto", "resolved": False, "reason": "CPU only"},
    }
    assert cpu_json["problems"] == []
    assert cpu_json["ok"] is True


def test_summary_line_for_cpu(cpu_json):
    assert doctor.summary_line(cpu_json) == (
        "device: CPU (no GPU) | strategy: default | precision: float32 | XLA: off"
    )


def test_report_leaves_devices_unconfigured():
    """The trainer may call report() before setup_devices: logical CPUs must still apply."""
    code = (
        "from pipeline import doctor\nfrom pipeline.training import devices as trainer\n"
        "doctor.report()\n"
        "devices = trainer.setup_devices(logical_cpus=2, deterministic=False, seed=0)\n"
        "print(len(devices.cpus))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2"]


def test_cuda_visible_devices_hiding_the_gpu(fake_smi):
    proc = _doctor("--json", fake_smi_dir=fake_smi, cuda_visible_devices="")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert report["driver_version"] == "550.54.15"
    assert report["nvidia_smi"]["gpus"] == [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "driver_version": "550.54.15",
            "memory_mib": 81559,
            "compute_capability": [9, 0],
        }
    ]
    [problem] = [p for p in report["problems"] if p["level"] == "error"]
    assert problem["code"] == "cuda_visible_devices_hides_gpus"
    assert "CUDA_VISIBLE_DEVICES=''" in problem["message"]
    assert "NVIDIA H100 80GB HBM3" in problem["message"]
    assert "unset CUDA_VISIBLE_DEVICES" in problem["fix"]

    human = doctor.format_report(report)  # what the run without --json prints
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in human
    assert "fix: Unset CUDA_VISIBLE_DEVICES" in human
    assert human.splitlines()[-1].startswith("NOT READY (1 problem(s) above): device: CPU")


@pytest.mark.skipif(bool(REAL_NVIDIA_SMI), reason="TensorFlow sees the real GPU here")
def test_nvidia_smi_sees_a_gpu_tensorflow_does_not(fake_smi):
    proc = _doctor(fake_smi_dir=fake_smi)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    out = proc.stdout
    assert "nvidia-smi lists 1 GPU(s) (NVIDIA H100 80GB HBM3) but TensorFlow sees no GPU" in out
    assert 'pip install -e ".[cuda]"' in out
    import tensorflow as tf

    if tf.sysconfig.get_build_info()["is_cuda_build"]:
        # No CUDA runtime here: the libraries this build wants are named.
        cuda_major = tf.sysconfig.get_build_info()["cuda_version"].split(".")[0]
        assert f"libcudart.so.{cuda_major}" in out
        assert "[cuda_libraries_missing]" in out
    else:
        assert "[cpu_only_tensorflow]" in out


def test_mixed_float16_on_cpu_is_a_warning():
    """Mixed precision on a CPU trains, only slowly: a warning, exit code 0."""
    proc = _doctor("--json", "--precision", "mixed_float16")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert report["plan"]["precision"] == {
        "requested": "mixed_float16",
        "resolved": "mixed_float16",
        "reason": "set explicitly",
    }
    assert [(p["code"], p["level"]) for p in report["problems"]] == [
        ("mixed_precision_on_cpu", "warning")
    ]
    assert "trainer.precision=auto" in report["problems"][0]["fix"]


def _gpu_facts(*, gpus, precision, smi_gpus=None, driver="550.54.15", failed=None) -> dict:
    """The facts report() gathers, for machines this test machine is not."""
    return {
        "versions": {"tensorflow": "2.21.0"},
        "keras_backend": "tensorflow",
        "cuda_build": {
            "is_cuda_build": True,
            "cuda_version": "12.5.1",
            "cudnn_version": "9",
            "compute_capabilities": [],
        },
        "gpus": gpus,
        "nvidia_smi": {"path": "/usr/bin/nvidia-smi", "gpus": smi_gpus or [], "error": None},
        "driver_version": driver,
        "cuda_visible_devices": None,
        "tf_config": None,
        "failed_cuda_libraries": failed,
        "plan": {
            "strategy": {"requested": "auto", "resolved": "mirrored", "reason": "2 GPUs"},
            "precision": {"requested": precision, "resolved": precision, "reason": "x"},
            "jit_compile": {"requested": "auto", "resolved": True, "reason": "GPU"},
        },
    }


def _tf_gpu(cap):
    return {
        "name": "/physical_device:GPU:0",
        "device_name": "Tesla V100-SXM2-16GB" if cap == [7, 0] else "Tesla P100-PCIE-16GB",
        "compute_capability": cap,
        "memory_mib": 16384,
    }


@pytest.mark.parametrize(
    "cap, precision, too_old",
    [
        ([7, 0], "mixed_bfloat16", True),
        ([7, 0], "mixed_float16", False),
        ([6, 0], "mixed_float16", True),
        ([6, 0], "float32", False),
    ],
)
def test_precision_needs_the_compute_capability(cap, precision, too_old):
    problems, _ = doctor.diagnose(_gpu_facts(gpus=[_tf_gpu(cap)] * 2, precision=precision))
    codes = [p["code"] for p in problems]
    assert codes == (["compute_capability_too_old"] if too_old else [])
    if too_old:
        assert f"{cap[0]}.{cap[1]}" in problems[0]["message"]
        assert precision in problems[0]["message"]


def test_old_driver_is_named():
    smi = [{"name": "Tesla V100", "driver_version": "470.82.01", "memory_mib": 16384}]
    problems, _ = doctor.diagnose(
        _gpu_facts(gpus=[], smi_gpus=smi, precision="float32", driver="470.82.01", failed=[])
    )
    assert [p["code"] for p in problems] == ["driver_too_old"]
    assert "470.82.01" in problems[0]["message"]
    assert "525.60.13" in problems[0]["fix"]


def test_summary_line_for_gpus():
    facts = _gpu_facts(gpus=[_tf_gpu([7, 0])] * 2, precision="mixed_float16")
    assert doctor.summary_line(facts) == (
        "device: 2x Tesla V100-SXM2-16GB (cc 7.0) | strategy: mirrored | "
        "precision: mixed_float16 | XLA: on"
    )


def test_doctor_plans_as_training_does_with_deterministic(monkeypatch):
    """One plan() answers for train and doctor: trainer.deterministic keeps auto XLA off."""
    gpu = [{"name": "GPU:0", "compute_capability": [9, 0]}]
    plain = doctor._plan(
        gpu, strategy="auto", precision="auto", jit_compile="auto", deterministic=False
    )
    fixed = doctor._plan(
        gpu, strategy="auto", precision="auto", jit_compile="auto", deterministic=True
    )
    assert plain["jit_compile"]["resolved"] is True
    assert fixed["jit_compile"] == {
        "requested": "auto",
        "resolved": False,
        "reason": "trainer.deterministic",
    }
    assert fixed["precision"]["resolved"] == "mixed_bfloat16"


def test_expected_cuda_libraries():
    names = doctor.expected_cuda_libraries("12.5.1", "9")
    for name in ("libcudart.so.12", "libcudnn.so.9", "libcublas.so.12", "libcufft.so.11"):
        assert name in names
    assert {"libcusparse.so.12", "libcusolver.so.11", "libnccl.so.2"} <= set(names)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu sse avx512f avx512_bf16 avx512_vnni", ["avx512_bf16"]),
        ("fpu avx512f amx_bf16 amx_tile avx512_bf16", ["avx512_bf16", "amx_bf16"]),
        ("fpu sse avx2 avx512f", []),
    ],
)
def test_cpu_bfloat16_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert devices.cpu_bfloat16_flags(str(cpuinfo)) == expected
    assert devices.cpu_bfloat16_flags(str(tmp_path / "missing")) == []


@pytest.mark.parametrize("flags", [["avx512_bf16"], []])
def test_mixed_bfloat16_on_a_cpu_warns_only_without_bfloat16_instructions(monkeypatch, flags):
    """bfloat16 in hardware (AVX512_BF16, AMX) makes it pay on a CPU: no warning there."""
    monkeypatch.setattr(devices, "cpu_bfloat16_flags", lambda: flags)
    planned = devices.plan(
        strategy="default",
        precision="mixed_bfloat16",
        jit_compile=False,
        devices=devices.Devices(gpus=[], cpus=["/device:CPU:0"]),
    )
    assert planned.precision == "mixed_bfloat16"
    (reason,) = [r for r in planned.reasons if r.startswith("precision ")]
    assert ("in hardware" in reason) == bool(flags)
    assert ("usually slower than float32" in reason) == (not flags)
    facts = _gpu_facts(gpus=[], precision="mixed_bfloat16")
    facts["cpu_bfloat16"] = flags
    problems, _ = doctor.diagnose(facts)
    assert [p["code"] for p in problems if "precision" in p["code"]] == (
        [] if flags else ["mixed_precision_on_cpu"]
    )
    if not flags:
        (problem,) = [p for p in problems if p["code"] == "mixed_precision_on_cpu"]
        assert "no bfloat16 instructions" in problem["message"]
