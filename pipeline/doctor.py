"""Checks that this machine can train as configured: ``python -m pipeline.doctor``.

Prints the versions that matter, whether this TensorFlow was built with CUDA,
the GPUs TensorFlow and ``nvidia-smi`` see, and what ``trainer.strategy``,
``trainer.precision`` and ``trainer.jit_compile`` resolve to here (through
``pipeline.training.devices.plan``, the same code training and the benchmark use). Then it names the
common reasons a GPU goes unused, each with its fix, and exits non-zero when
one of them stands in the way. ``--json`` prints the same report for scripts.

``report()`` only imports TensorFlow and lists physical devices: it sets up no
logical device and no seed, so training can call it before or after
``setup_devices``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

from pipeline.terminal import quiet_tensorflow
from pipeline.training.devices import PRECISIONS, STRATEGIES, Devices, cpu_bfloat16_flags, plan

NVIDIA_SMI_FIELDS = ("name", "driver_version", "memory.total", "compute_cap")
NVIDIA_SMI_TIMEOUT_S = 10
CUDA_INSTALL = 'pip install -e ".[cuda]"'
# Oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA release notes, table 3).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
# Sonames of the math libraries per CUDA major version: they carry their own major versions.
CUDA_MATH_SONAMES = {
    11: ("libcublasLt.so.11", "libcublas.so.11", "libcufft.so.10", "libcusparse.so.11",
         "libcusolver.so.11"),
    12: ("libcublasLt.so.12", "libcublas.so.12", "libcufft.so.11", "libnvJitLink.so.12",
         "libcusparse.so.12", "libcusolver.so.11"),
}  # fmt: skip
# Below these compute capabilities a precision runs without tensor-core support.
MIN_CAPABILITY = {"mixed_bfloat16": (8, 0), "mixed_float16": (7, 0)}
PLAN_KEYS = ("strategy", "precision", "jit_compile")


def _dist_version(name: str) -> str | None:
    """An installed distribution's version, without importing it (TFDS takes seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _parse_capability(text: str) -> list[int] | None:
    try:
        major, minor = text.strip().split(".")
        return [int(major), int(minor)]
    except ValueError:
        return None


def _parse_mib(text: str) -> int | None:
    try:
        return int(text.strip().split()[0])
    except (ValueError, IndexError):
        return None


def nvidia_smi() -> dict:
    """What ``nvidia-smi`` lists, whatever ``CUDA_VISIBLE_DEVICES`` says.

    Returns:
        ``{"path", "gpus", "error"}``: ``path`` is None when nvidia-smi is not on
        the PATH; ``gpus`` holds name, driver_version, memory_mib and
        compute_capability (None where this nvidia-smi cannot report it);
        ``error`` says why nvidia-smi failed, or is None.
    """
    path = shutil.which("nvidia-smi")
    if path is None:
        return {"path": None, "gpus": [], "error": None}
    error = None
    # Drivers before 510 do not know compute_cap: ask again without it.
    for fields in (NVIDIA_SMI_FIELDS, NVIDIA_SMI_FIELDS[:-1]):
        try:
            out = subprocess.run(
                [path, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=NVIDIA_SMI_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return {"path": path, "gpus": [], "error": f"{type(err).__name__}: {err}"}
        if out.returncode == 0:
            return {"path": path, "gpus": _parse_smi(out.stdout, fields), "error": None}
        text = (out.stdout + out.stderr).strip()
        error = (text.splitlines() or [f"exit code {out.returncode}"])[0]
    return {"path": path, "gpus": [], "error": error}


def _parse_smi(stdout: str, fields: tuple[str, ...]) -> list[dict]:
    gpus = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        # A name could hold a comma; the other fields cannot.
        values = [v.strip() for v in line.rsplit(",", len(fields) - 1)]
        row = dict(zip(fields, values, strict=False))
        gpus.append(
            {
                "name": row.get("name", ""),
                "driver_version": row.get("driver_version") or None,
                "memory_mib": _parse_mib(row.get("memory.total", "")),
                "compute_capability": _parse_capability(row.get("compute_cap", "")),
            }
        )
    return gpus


def _visible_indices(cuda_visible_devices: str) -> list[int] | None:
    """The GPU indices CUDA_VISIBLE_DEVICES names; None when it names GPUs by UUID."""
    try:
        return [int(part) for part in cuda_visible_devices.split(",") if part.strip()]
    except ValueError:
        return None


def _tf_gpus(tf, smi_gpus: list[dict]) -> list[dict]:
    """TensorFlow's GPUs with compute capability, and memory from nvidia-smi.

    ``get_device_details`` reports no memory and ``get_memory_info`` would start
    the runtime, so memory comes from the nvidia-smi rows of the same model
    (CUDA's device order and nvidia-smi's can differ).
    """
    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        name = details.get("device_name", "")
        memories = {g["memory_mib"] for g in smi_gpus if g["name"] == name}
        gpus.append(
            {
                "name": device.name,
                "device_name": name,
                "compute_capability": list(details.get("compute_capability", ()) or ()),
                "memory_mib": memories.pop() if len(memories) == 1 else None,
            }
        )
    return gpus


def _cuda_build(tf) -> dict:
    info = dict(tf.sysconfig.get_build_info())
    return {
        "is_cuda_build": bool(info.get("is_cuda_build", False)),
        "cuda_version": info.get("cuda_version"),
        "cudnn_version": info.get("cudnn_version"),
        "compute_capabilities": list(info.get("cuda_compute_capabilities", []) or []),
    }


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def expected_cuda_libraries(cuda_version: str | None, cudnn_version: str | None) -> list[str]:
    """The shared libraries a TensorFlow built for these versions loads, by soname.

    Args:
        cuda_version: from ``tf.sysconfig.get_build_info()``, e.g. ``"12.5.1"``.
        cudnn_version: likewise, e.g. ``"9"``.

    Returns:
        Sonames in load order (the driver's ``libcuda.so.1`` first), e.g.
        ``libcudart.so.12``, ``libcudnn.so.9``; math libraries only for CUDA
        versions whose sonames are known.
    """
    cuda, cudnn = _major(cuda_version), _major(cudnn_version)
    names = ["libcuda.so.1"]
    if cuda is not None:
        names.append(f"libcudart.so.{cuda}")
        names.extend(CUDA_MATH_SONAMES.get(cuda, ()))
    if cudnn is not None:
        names.append(f"libcudnn.so.{cudnn}")
    names.append("libnccl.so.2")
    return names


def _load(soname: str, pip_dirs: list[Path]) -> bool:
    """Whether ``soname`` loads as TensorFlow would find it: system paths, then the
    pip ``nvidia-*`` wheels that TensorFlow's RUNPATH points to."""
    candidates = [soname] + [str(d / soname) for d in pip_dirs if (d / soname).exists()]
    for candidate in candidates:
        try:
            ctypes.CDLL(candidate)
        except OSError:
            continue
        return True
    return False


def failed_cuda_libraries(tf, cuda_build: dict) -> list[str]:
    """Sonames this TensorFlow build expects that cannot be loaded here.

    Loads them with ``ctypes`` (TensorFlow's own "Cannot dlopen" message goes to
    its C++ log, which Python cannot read back).
    """
    site_packages = Path(tf.__file__).resolve().parent.parent
    pip_dirs = sorted(site_packages.glob("nvidia/*/lib"))
    names = expected_cuda_libraries(cuda_build["cuda_version"], cuda_build["cudnn_version"])
    return [name for name in names if not _load(name, pip_dirs)]


def _tf_config() -> dict | None:
    """The cluster TF_CONFIG describes (task and worker count), or None when unset."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
        task = parsed.get("task", {})
        workers = parsed.get("cluster", {}).get("worker", [])
        return {
            "task_type": task.get("type"),
            "task_index": task.get("index"),
            "workers": len(workers),
            "error": None,
        }
    except (ValueError, AttributeError) as err:
        return {"task_type": None, "task_index": None, "workers": 0, "error": str(err)}


def _plan(tf_gpus: list[dict], *, strategy, precision, jit_compile, deterministic) -> dict:
    """Each of strategy, precision and jit_compile: requested, resolved, and why."""
    resolved = plan(
        strategy=strategy,
        precision=precision,
        jit_compile=jit_compile,
        devices=Devices(gpus=tf_gpus, cpus=[]),
        deterministic=deterministic,
    )
    requested = {"strategy": strategy, "precision": precision, "jit_compile": jit_compile}
    result = {}
    for key in PLAN_KEYS:
        reason = next((r for r in resolved.reasons if r.startswith(key + " ")), None)
        if reason and reason.endswith(")") and "(" in reason:
            reason = reason[reason.index("(") + 1 : -1]
        result[key] = {
            "requested": requested[key],
            "resolved": getattr(resolved, key),
            "reason": reason or "set explicitly",
        }
    return result


def report(
    *, strategy: str = "auto", precision: str = "auto", jit_compile="auto", deterministic=False
) -> dict:
    """Everything the doctor knows about this machine, and what stands in the way.

    Args:
        strategy: ``trainer.strategy`` to check (``auto`` or a strategy name).
        precision: ``trainer.precision`` to check.
        jit_compile: ``trainer.jit_compile`` to check: ``"auto"``, True or False.
        deterministic: ``trainer.deterministic`` (it keeps ``auto`` XLA off).

    Returns:
        A JSON-serializable dict: ``versions``, ``keras_backend``,
        ``cuda_build``, ``gpus`` (TensorFlow's), ``nvidia_smi``,
        ``driver_version``, ``cuda_visible_devices``, ``tf_config``,
        ``failed_cuda_libraries`` (None unless checked), ``plan`` (per key:
        requested, resolved, reason), ``problems`` (each ``code``, ``level``
        "error" or "warning", ``message``, ``fix``), ``notes`` and ``ok``
        (no error-level problem).

    Raises:
        PipelineError: an unknown strategy, precision or jit_compile value.
    """
    import keras
    import tensorflow as tf

    cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    smi = nvidia_smi()
    gpus = _tf_gpus(tf, smi["gpus"])
    cuda_build = _cuda_build(tf)
    facts = {
        "versions": _versions(tf, keras),
        "keras_backend": keras.backend.backend(),
        "cuda_build": cuda_build,
        "gpus": gpus,
        "nvidia_smi": smi,
        "driver_version": next((g["driver_version"] for g in smi["gpus"]), None),
        "cuda_visible_devices": cuda_visible_devices,
        "tf_config": _tf_config(),
        "cpu_bfloat16": cpu_bfloat16_flags(),
        "failed_cuda_libraries": None,
        "plan": _plan(
            gpus,
            strategy=strategy,
            precision=precision,
            jit_compile=jit_compile,
            deterministic=deterministic,
        ),
    }
    if smi["gpus"] and not gpus and cuda_build["is_cuda_build"] and not _hides_all(facts):
        facts["failed_cuda_libraries"] = failed_cuda_libraries(tf, cuda_build)
    problems, notes = diagnose(facts)
    return {
        **facts,
        "problems": problems,
        "notes": notes,
        "ok": not any(p["level"] == "error" for p in problems),
    }


def _versions(tf, keras) -> dict:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tensorflow_datasets": _dist_version("tensorflow-datasets"),
        "hydra": _dist_version("hydra-core"),
    }


def _hides_all(facts: dict) -> bool:
    """Whether CUDA_VISIBLE_DEVICES names no GPU that nvidia-smi lists."""
    value = facts["cuda_visible_devices"]
    if value is None:
        return False
    if value.strip() in ("", "-1"):
        return True
    indices = _visible_indices(value)
    # CUDA stops at the first index that does not exist.
    return indices is not None and (not indices or indices[0] >= len(facts["nvidia_smi"]["gpus"]))


def _problem(code: str, message: str, fix: str, level: str = "error") -> dict:
    return {"code": code, "level": level, "message": message, "fix": fix}


def _gpu_problems(facts: dict) -> list[dict]:
    """Why TensorFlow sees none of the GPUs nvidia-smi lists."""
    smi_gpus, build = facts["nvidia_smi"]["gpus"], facts["cuda_build"]
    listed = f"nvidia-smi lists {len(smi_gpus)} GPU(s) ({smi_gpus[0]['name']})"
    if _hides_all(facts):
        return [
            _problem(
                "cuda_visible_devices_hides_gpus",
                f"CUDA_VISIBLE_DEVICES={facts['cuda_visible_devices']!r} hides every GPU: "
                f"{listed} but TensorFlow sees none.",
                "Unset CUDA_VISIBLE_DEVICES (`unset CUDA_VISIBLE_DEVICES`), or set it to the "
                "GPUs to use, e.g. CUDA_VISIBLE_DEVICES=0,1.",
            )
        ]
    if not build["is_cuda_build"]:
        return [
            _problem(
                "cpu_only_tensorflow",
                f"{listed} but this TensorFlow {facts['versions']['tensorflow']} was built "
                "without CUDA (a CPU-only wheel), so it sees no GPU.",
                f"Reinstall TensorFlow with CUDA: `pip uninstall -y tensorflow-cpu tensorflow && "
                f"{CUDA_INSTALL}`.",
            )
        ]
    problems = []
    failed = facts["failed_cuda_libraries"] or []
    pip_libs = [name for name in failed if name != "libcuda.so.1"]
    if "libcuda.so.1" in failed:
        problems.append(
            _problem(
                "driver_library_missing",
                f"{listed} but TensorFlow sees no GPU: the driver's libcuda.so.1 cannot be loaded.",
                "Install the NVIDIA driver's user-space libraries on this machine (in a "
                "container, start it with `--gpus all` or the NVIDIA container toolkit).",
            )
        )
    if pip_libs:
        problems.append(
            _problem(
                "cuda_libraries_missing",
                f"{listed} but TensorFlow sees no GPU: these CUDA libraries failed to load: "
                f"{', '.join(pip_libs)} (this TensorFlow wants CUDA {build['cuda_version']}, "
                f"cuDNN {build['cudnn_version']}).",
                f"`{CUDA_INSTALL}` installs the matching CUDA and cuDNN libraries.",
            )
        )
    problems.extend(_driver_problems(facts))
    if not problems:
        problems.append(
            _problem(
                "tensorflow_sees_no_gpu",
                f"{listed} and the CUDA libraries load, but TensorFlow sees no GPU.",
                f"Reinstall with `{CUDA_INSTALL}`, then run `TF_CPP_MIN_LOG_LEVEL=0 python -m "
                "pipeline.doctor` and read TensorFlow's own messages about the GPU.",
            )
        )
    return problems


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _driver_problems(facts: dict) -> list[dict]:
    cuda = _major(facts["cuda_build"]["cuda_version"])
    driver, minimum = facts["driver_version"], MIN_DRIVER.get(cuda)
    if not driver or not minimum or _version_tuple(driver) >= _version_tuple(minimum):
        return []
    return [
        _problem(
            "driver_too_old",
            f"NVIDIA driver {driver} is too old for CUDA {facts['cuda_build']['cuda_version']} "
            f"(this TensorFlow's build): CUDA {cuda} needs driver {minimum} or newer.",
            f"Upgrade the NVIDIA driver to {minimum} or newer.",
        )
    ]


def _precision_problems(facts: dict) -> list[dict]:
    """A precision the GPUs cannot run fast (TensorFlow's GPUs, else nvidia-smi's)."""
    precision = facts["plan"]["precision"]["resolved"]
    minimum = MIN_CAPABILITY.get(precision)
    if minimum is None:
        return []
    gpus = facts["gpus"] or facts["nvidia_smi"]["gpus"]
    if not gpus and precision == "mixed_bfloat16" and facts.get("cpu_bfloat16"):
        return []  # AVX512_BF16 / AMX: bfloat16 runs faster than float32 on this CPU
    if not gpus:
        return [
            _problem(
                "mixed_precision_on_cpu",
                f"precision {precision} on CPU: no tensor cores"
                + (", no bfloat16 instructions (AVX512_BF16, AMX)" if "bf" in precision else "")
                + ", so it is usually slower than float32 (it still trains).",
                "Use trainer.precision=auto (float32 on CPU).",
                level="warning",
            )
        ]
    caps = [tuple(g["compute_capability"]) for g in gpus if g["compute_capability"]]
    if not caps or min(caps) >= minimum:
        return []
    cap = min(caps)
    return [
        _problem(
            "compute_capability_too_old",
            f"precision {precision} needs compute capability {minimum[0]}.{minimum[1]} or "
            f"newer; this machine's GPU has {cap[0]}.{cap[1]}.",
            "Use trainer.precision=auto (it picks what the GPU supports) or float32.",
        )
    ]


def _setup_problems(facts: dict) -> list[dict]:
    """Keras backend, TF_CONFIG and XLA: choices that fail or slow down training."""
    problems = []
    if facts["keras_backend"] != "tensorflow":
        problems.append(
            _problem(
                "keras_backend",
                f"KERAS_BACKEND is {facts['keras_backend']!r}; this pipeline trains with "
                "tf.distribute and needs the TensorFlow backend.",
                "Unset KERAS_BACKEND or set KERAS_BACKEND=tensorflow.",
            )
        )
    tf_config = facts["tf_config"]
    if tf_config and tf_config["error"]:
        problems.append(
            _problem(
                "tf_config_invalid",
                f"TF_CONFIG is set but cannot be read ({tf_config['error']}).",
                'Set TF_CONFIG to {"cluster": {"worker": [...]}, "task": {"type": "worker", '
                '"index": N}}, or unset it on a single machine.',
            )
        )
    no_gpu = not facts["gpus"] and not facts["nvidia_smi"]["gpus"]
    if facts["plan"]["jit_compile"]["resolved"] and no_gpu:
        problems.append(
            _problem(
                "xla_on_cpu",
                "jit_compile on CPU: XLA compiles slowly and usually runs slower on CPU.",
                "Use trainer.jit_compile=auto (off on CPU).",
                level="warning",
            )
        )
    return problems


def diagnose(facts: dict) -> tuple[list[dict], list[str]]:
    """Problems and notes for a report's facts (everything but problems, notes, ok).

    Args:
        facts: as ``report`` gathers them.

    Returns:
        ``(problems, notes)``: problems as ``{"code", "level", "message", "fix"}``,
        level ``error`` when training cannot run as configured (or would miss
        the GPUs this machine has), ``warning`` when it runs but slowly.
    """
    problems, notes = [], []
    smi = facts["nvidia_smi"]
    if smi["gpus"] and not facts["gpus"]:
        problems.extend(_gpu_problems(facts))
    problems.extend(_precision_problems(facts))
    problems.extend(_setup_problems(facts))
    if smi["error"] and not facts["gpus"]:
        problems.append(
            _problem(
                "nvidia_smi_failed",
                f"nvidia-smi is installed but failed: {smi['error']}",
                "The NVIDIA driver is not running: reinstall it, or reboot after an upgrade.",
                level="warning",
            )
        )
    if not facts["gpus"]:
        notes.append("No GPU is in use: training runs on the CPU.")
    if facts["tf_config"] and not facts["tf_config"]["error"]:
        notes.append(
            f"TF_CONFIG: this is {facts['tf_config']['task_type']} "
            f"{facts['tf_config']['task_index']} of {facts['tf_config']['workers']} worker(s)."
        )
    return problems, notes


def _device_text(gpus: list[dict]) -> str:
    if not gpus:
        return "CPU (no GPU)"
    counts = Counter(
        (g["device_name"] or "GPU", ".".join(map(str, g["compute_capability"]))) for g in gpus
    )
    return " + ".join(f"{n}x {name} (cc {cap})" for (name, cap), n in counts.items())


def _on_off(value) -> str:
    return "on" if value else "off"


def summary_line(report: dict) -> str:
    """One line: device, strategy, precision and XLA.

    Args:
        report: from ``report()``.

    Returns:
        e.g. ``device: CPU (no GPU) | strategy: default | precision: float32 | XLA: off``.
    """
    plan = report["plan"]
    return (
        f"device: {_device_text(report['gpus'])} | strategy: {plan['strategy']['resolved']} | "
        f"precision: {plan['precision']['resolved']} | "
        f"XLA: {_on_off(plan['jit_compile']['resolved'])}"
    )


def _rows(report: dict) -> list[tuple[str, str]]:
    versions, build, smi = report["versions"], report["cuda_build"], report["nvidia_smi"]
    if build["is_cuda_build"]:
        cuda = f"built with CUDA {build['cuda_version']}, cuDNN {build['cudnn_version']}"
    else:
        cuda = "CPU-only build (no CUDA)"
    if smi["path"] is None:
        smi_text = "not found"
    elif smi["error"]:
        smi_text = f"failed: {smi['error']}"
    else:
        smi_text = f"{len(smi['gpus'])} GPU(s): " + ", ".join(g["name"] for g in smi["gpus"])
    cvd = report["cuda_visible_devices"]
    rows = [
        ("python", versions["python"]),
        ("tensorflow", f"{versions['tensorflow']}, {cuda}"),
        ("keras", f"{versions['keras']}, backend {report['keras_backend']}"),
        ("tensorflow-datasets", str(versions["tensorflow_datasets"])),
        ("hydra-core", str(versions["hydra"])),
        ("nvidia-smi", smi_text),
        ("driver", report["driver_version"] or "-"),
        ("CUDA_VISIBLE_DEVICES", "(unset)" if cvd is None else repr(cvd)),
    ]
    if not report["gpus"]:
        rows.append(("TensorFlow GPUs", "none"))
    for gpu in report["gpus"]:
        memory = f", {gpu['memory_mib'] / 1024:.0f} GiB" if gpu["memory_mib"] else ""
        cap = ".".join(map(str, gpu["compute_capability"])) or "?"
        name = gpu["name"].replace("/physical_device:", "")
        rows.append((name, f"{gpu['device_name']} (compute capability {cap}{memory})"))
    for key in PLAN_KEYS:
        entry = report["plan"][key]
        requested = str(entry["requested"]).lower()
        resolved = entry["resolved"]
        shown = _on_off(resolved) if key == "jit_compile" else resolved
        rows.append((f"{key}={requested}", f"{shown} ({entry['reason']})"))
    return rows


def format_report(report: dict) -> str:
    """The human-readable report: a table, problems with fixes, notes, a verdict."""
    rows = _rows(report)
    width = max(len(label) for label, _ in rows)
    lines = [f"{label.ljust(width)}  {value}" for label, value in rows]
    for problem in report["problems"]:
        lines += ["", f"{problem['level'].upper()} [{problem['code']}] {problem['message']}"]
        lines.append(f"  fix: {problem['fix']}")
    if report["notes"]:
        lines.append("")
        lines += [f"note: {note}" for note in report["notes"]]
    errors = sum(p["level"] == "error" for p in report["problems"])
    lines.append("")
    if errors:
        lines.append(f"NOT READY ({errors} problem(s) above): {summary_line(report)}")
    else:
        lines.append(f"READY: {summary_line(report)}")
    return "\n".join(lines)


def _jit_choice(text: str):
    choices = {"auto": "auto", "true": True, "false": False}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"must be auto, true or false, got {text!r}")
    return choices[text.lower()]


def main(argv: list[str] | None = None) -> int:
    """Prints the report; returns 0 when the machine can train as configured, else 1."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.doctor",
        description="Check that TensorFlow sees the GPUs and show what `auto` chooses here.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--strategy",
        default="auto",
        choices=STRATEGIES,
        help="trainer.strategy to check (default: auto)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="trainer.precision to check (default: auto)",
    )
    parser.add_argument(
        "--jit-compile",
        default="auto",
        type=_jit_choice,
        metavar="{auto,true,false}",
        help="trainer.jit_compile to check: auto, true or false (default: auto)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="as trainer.deterministic=true (auto keeps XLA off)",
    )
    args = parser.parse_args(argv)
    quiet_tensorflow()  # TensorFlow's C++ start-up lines (not when TF_CPP_MIN_LOG_LEVEL is set)
    try:
        result = report(
            strategy=args.strategy,
            precision=args.precision,
            jit_compile=args.jit_compile,
            deterministic=args.deterministic,
        )
    except ImportError as err:  # a broken install: say so instead of a traceback
        print(
            f"TensorFlow or Keras cannot be imported ({err}). Fix: reinstall with "
            f"`pip install -e .`, or `{CUDA_INSTALL}` on a CUDA machine."
        )
        return 1
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
