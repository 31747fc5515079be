"""What the terminal shows: TensorFlow's start-up noise held back, everything else kept."""

import os
import sys

from pipeline import terminal

START_UP = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796062687.948352    6747 port.cc:153] oneDNN custom operations are on.\n"
    b"I0000 00:00:1796062687.948781    6747 cudart_stub.cc:31] Could not find cuda drivers\n"
    b"E0000 00:00:1796062691.860253    6747 cuda_platform.cc:52] failed call to cuInit: "
    b"INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild "
    b"TensorFlow with the appropriate compiler flags.\n"
)
KEPT = (
    "E0000 00:00:1796062691.9 1 cuda_dnn.cc:1] Could not load cuDNN: a real error\n"
    "Traceback (most recent call last): a Python error while importing\n"
)


def test_start_up_noise_is_held_back_and_every_other_line_replayed(capfd):
    with terminal._stderr_filtered(terminal.START_UP_NOISE):
        os.write(2, START_UP[:60])  # lines arrive in pieces
        os.write(2, START_UP[60:] + KEPT.encode())
    assert capfd.readouterr().err == KEPT


def test_nothing_is_filtered_once_the_user_chose_a_log_level(monkeypatch):
    monkeypatch.setenv(terminal.LOG_LEVEL_ENV, "0")
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    held = []
    monkeypatch.setattr(terminal, "_stderr_filtered", lambda noise: held.append(noise))
    terminal.quiet_tensorflow()
    assert held == [] and os.environ[terminal.LOG_LEVEL_ENV] == "0"
