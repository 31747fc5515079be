"""What a run leaves behind to describe itself: manifest.json and metrics.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "pipeline-cnn-trainer",
    "tensorflow",
    "keras",
    "tensorflow-datasets",
    "hydra-core",
    "omegaconf",
    "numpy",
    "tensorboard",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a run's result."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (this package by default)."""
    where = Path(path or Path(__file__).resolve().parent)
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Writes JSON atomically (write to a temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def manifest(
    *,
    devices: dict,
    plan: dict,
    data: dict,
    command: list[str] | None = None,
) -> dict:
    """Assembles the run manifest.

    Args:
        devices: GPUs and CPUs seen.
        plan: resolved strategy, precision, XLA and why.
        data: dataset name, fingerprint, class names, image size,
            normalization statistics, split sizes and members.
        command: the command line (defaults to ``sys.argv``).

    Returns:
        The manifest as a dict.
    """
    return {
        "command": command if command is not None else sys.argv,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "platform": platform.platform(),
        "devices": devices,
        "plan": plan,
        "data": data,
    }
