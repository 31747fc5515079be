"""Progress on stderr (``pipeline.progress``); evaluate's for its prediction pass and attacks."""

import io

import pytest

from pipeline import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    """``time.perf_counter`` as seen by pipeline.progress: set ``clock.now`` to move it."""

    class Clock:
        now = 100.0

    monkeypatch.setattr(progress.time, "perf_counter", lambda: Clock.now)
    return Clock


def test_a_log_gets_a_line_every_interval_and_a_closing_line(clock, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 10.0)
    out = io.StringIO()
    with progress.Progress("classifying", 100, stream=out) as bar:
        for _ in range(4):  # 25 images every 4 s: a line once 10 s have passed since the last
            clock.now += 4.0
            bar.advance(25)
    assert out.getvalue().splitlines() == [
        "  classifying 75/100 images (6.2 images/s, 4 s left)",
        "  classifying 100/100 images (6.2 images/s, 16.0 s)",
    ]


def test_a_terminal_line_is_rewritten_in_place_with_the_time_left(clock):
    out = Terminal()
    bar = progress.Progress("evaluating", 50_000, stream=out, detail="tta flip")
    clock.now += 10.0
    bar.advance(1480)
    assert out.getvalue() == (
        "\r  evaluating 1480/50000 images (tta flip; 148 images/s, 5 min 28 s left)\033[K\r"
    )
    bar.advance(20)  # at the same moment: not redrawn
    assert out.getvalue().count("\r  evaluating") == 1


def test_unknown_total_and_nothing_to_do():
    out = io.StringIO()
    with progress.Progress("evaluating", None, stream=out) as bar:
        bar.advance(3)
    assert out.getvalue().startswith("  evaluating 3 images (")
    out = io.StringIO()
    with progress.Progress("classifying", 0, stream=out):
        pass
    assert out.getvalue() == ""


def test_an_error_leaves_no_closing_line(clock):
    out = io.StringIO()
    with pytest.raises(RuntimeError), progress.Progress("evaluating", 10, stream=out) as bar:
        bar.advance(2)
        raise RuntimeError("broken image")
    assert out.getvalue() == ""


def test_timed_is_one_line_per_step(clock):
    out = io.StringIO()
    with progress.timed("onnx", done="exported", stream=out):
        clock.now += 4.25
    assert out.getvalue() == "  onnx: exported in 4.2 s\n"
    with pytest.raises(ValueError), progress.timed("onnx", stream=out):
        raise ValueError("conversion failed")
    assert out.getvalue() == "  onnx: exported in 4.2 s\n"  # the error says what happened


def test_evaluate_shows_its_prediction_pass_and_attacks_on_stderr(own_tiny_run, tmp_path, capsys):
    from pipeline.evaluation.report import evaluate

    report = evaluate(
        own_tiny_run.path,
        checkpoint="final",
        out_dir=tmp_path,
        adversarial=True,
        eps=[0.03],
        pgd_steps=1,
        max_examples=4,
        tta="flip",
    )
    captured = capsys.readouterr()
    count, attacked = report["data"]["count"], report["adversarial"]["count"]  # min(4, count)
    lines = captured.err.splitlines()
    evaluating = f"  evaluating {count}/{count} images (tta flip; "
    attacking = f"  attacking {attacked}/{attacked} images (fgsm and pgd-1 at eps 7.65 /255; "
    assert [line.startswith(evaluating) for line in lines].count(True) == 1, captured.err
    assert [line.startswith(attacking) for line in lines].count(True) == 1, captured.err
    assert "evaluating" not in captured.out and "attacking" not in captured.out
