"""What the terminal shows: TensorFlow's start-up noise filtered, and what to run next."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

LOG_LEVEL_ENV = "TF_CPP_MIN_LOG_LEVEL"
QUIET_LEVEL = "2"  # TensorFlow's C++ log: errors only (0 all, 1 no info, 2 no warnings)
# Lines TensorFlow's C++ side writes while it loads and looks for GPUs, before its
# log level applies (absl logs everything until it is initialised): facts about the
# build and a missing CUDA driver, which the doctor's one line already says.
START_UP_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^[IW]\d{4} "),  # info and warning lines of absl's format
    re.compile(r"^E\d{4} .*(failed call to cuInit|Unable to register cu\w+ factory)"),
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow"),
)


def quiet_tensorflow() -> None:
    """Imports TensorFlow and finds its devices, its C++ start-up noise left out.

    Unless ``TF_CPP_MIN_LOG_LEVEL`` is set (then TensorFlow logs as asked), it is
    set to 2 (errors only), and the lines TensorFlow writes to stderr while it
    loads and looks for GPUs are held back and replayed without
    :data:`START_UP_NOISE`. Does nothing once TensorFlow is imported.
    """
    if "tensorflow" in sys.modules or LOG_LEVEL_ENV in os.environ:
        return
    os.environ[LOG_LEVEL_ENV] = QUIET_LEVEL
    with _stderr_filtered(START_UP_NOISE):
        try:
            import tensorflow as tf
        except ImportError:  # a JAX-only machine: the command says what it lacks, if anything
            return
        tf.config.list_physical_devices()  # the CUDA driver is looked for here


@contextlib.contextmanager
def _stderr_filtered(noise: tuple[re.Pattern, ...]):
    """Holds back what is written to file descriptor 2, then writes the lines not in ``noise``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            kept = [line for line in text.splitlines() if not any(p.search(line) for p in noise)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def next_steps(run_dir: str | os.PathLike, *, loggers: tuple[str, ...] = ("tensorboard",)) -> str:
    """The commands a user runs after training, for the end of a run.

    Args:
        run_dir: the finished run.
        loggers: the run's loggers (``logger=[...]``): TensorBoard's and MLflow's
            viewers are named for the ones it wrote to.
    """
    run_dir = Path(run_dir)
    lines = []
    if "tensorboard" in loggers:
        lines.append(f"  tensorboard --logdir {run_dir}")
    if "mlflow" in loggers:
        lines.append(
            "  mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db  (the local store; "
            "with a server: its web page)"
        )
    lines.append(f"  python -m pipeline.evaluate run_dir={run_dir}")
    lines.append(f"  python -m pipeline.predict {run_dir} <image or folder>")
    return "next:\n" + "\n".join(lines)
