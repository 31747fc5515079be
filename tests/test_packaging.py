"""The package as a user installs it: a wheel with conf/, console commands, completion."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

from conftest import REPO

COMMANDS = {  # console command -> what `python -m` runs
    "pipeline-train": "pipeline.train",
    "pipeline-evaluate": "pipeline.evaluate",
    "pipeline-export": "pipeline.export",
    "pipeline-predict": "pipeline.predict",
    "pipeline-bench": "pipeline.bench",
    "pipeline-doctor": "pipeline.doctor",
    "pipeline-scan": "pipeline.data.scan",
    "pipeline-inspect": "pipeline.data.inspect",
    "pipeline-data-service": "pipeline.data.service",
}
TINY_DEBUG = ["debug=fast", "data.image_size=16", "data.batch_size=8", "model.width=4"]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_package_list_names_every_package_and_the_wheel_data_every_config():
    setuptools = _project()["tool"]["setuptools"]
    folders = {
        ".".join(p.parent.relative_to(REPO).parts)
        for top in ("pipeline", "hydra_plugins")
        for p in (REPO / top).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sorted(setuptools["packages"]) == sorted(folders | {"pipeline.conf"})
    assert setuptools["package-dir"] == {"pipeline.conf": "conf"}
    patterns = setuptools["package-data"]["pipeline.conf"]
    configs = {p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml")}
    shipped = {p for pattern in patterns for p in (REPO / "conf").glob(pattern)}
    assert {p.relative_to(REPO / "conf") for p in shipped} == configs


def test_every_console_command_is_the_python_m_command():
    scripts = _project()["project"]["scripts"]
    assert sorted(scripts) == sorted(COMMANDS)
    for command, module in COMMANDS.items():
        assert scripts[command].split(":")[0] == module


def _fresh_venv(tmp_path: Path) -> Path:
    """A new virtual environment that sees this one's dependencies but not its `pipeline`.

    A ``.pth`` line adds this environment's site-packages (TensorFlow and the
    rest: nothing is downloaded); ``.pth`` files there, such as the editable
    install's finder, are not run from a path added this way.
    """
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def _build_wheel(tmp_path: Path) -> Path:
    """Builds the wheel from a copy of the sources (no build/ or egg-info in the checkout)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("pipeline", "conf", "hydra_plugins"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
         str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return wheel


def _run(args: list, cwd: Path, env: dict | None = None, timeout: int = 300):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_the_wheel_installs_and_trains_evaluates_and_completes_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    env = _fresh_venv(tmp_path)
    bin_dir = env / "bin"
    _run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([bin_dir / "python", "-c", "import pipeline; print(pipeline.__file__)"], work)
    assert str(env) in where.stdout  # the installed copy, not the checkout
    for command in COMMANDS:
        assert (bin_dir / command).exists(), command

    run_dir = work / "run"
    _run([bin_dir / "pipeline-train", *TINY_DEBUG, f"hydra.run.dir={run_dir}"], work)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["limit_batches"] == 2
    _run([bin_dir / "pipeline-evaluate", f"run_dir={run_dir}"], work)
    assert (run_dir / "eval" / "report.json").exists()

    line = "pipeline-train model=res"
    script = (
        f'eval "$({bin_dir / "pipeline-train"} -sc install=bash)"; '
        f'COMP_LINE="{line}" COMP_POINT={len(line)} COMP_CWORD=1; hydra_bash_completion; '
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    done = _run(["bash", "-c", script], work, env={**os.environ, "PATH": path})
    assert {"model=resnet20", "model=resnet50"} <= set(done.stdout.split())


@pytest.mark.parametrize("command", ["pipeline.train", "pipeline.evaluate", "pipeline.export"])
def test_help_lists_the_groups_and_keys(command):
    proc = _run([sys.executable, "-m", command, "--help"], REPO, timeout=120)
    assert "Powered by Hydra" not in proc.stdout  # Hydra's own boilerplate
    if command == "pipeline.train":
        assert "model: cnn, fastnet, inception" in proc.stdout and "debug: fast" in proc.stdout
        assert "trainer.limit_batches=N" in proc.stdout and "-sc install=bash" in proc.stdout
    else:
        assert "run_dir=DIR" in proc.stdout
