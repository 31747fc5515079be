"""Progress on standard error for the steps that take a while; standard output stays results.

:class:`Progress` counts items done out of a total with their rate and the time
left: ``  classifying 2048/5392 images (148 images/s, 23 s left)``. On a terminal
the line is rewritten in place; elsewhere (a log file, a pipe) a line every
:data:`LOG_EVERY_S` seconds and one at the end, as the folder scan does
(its first user was the folder scan). :func:`timed` is one line per step with its
seconds (``  onnx: exported in 4.2 s``).

Keras's ``Progbar`` shows the same numbers but writes to standard output,
where ``pipeline.predict`` writes its results.
"""

from __future__ import annotations

import contextlib
import sys
import time

LOG_EVERY_S = 30.0  # seconds between lines when standard error is not a terminal
REFRESH_S = 0.1  # seconds between redraws of the line on a terminal


def _seconds(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``1 h 05 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


class Progress:
    """Items done out of ``total``, their rate and the time left, on standard error.

    Args:
        label: what is being done (``classifying``).
        total: items to do; None when unknown (no time left is shown).
        unit: what an item is, plural (``images``).
        stream: where to write; None: ``sys.stderr`` as it is when a line is written.
        detail: shown after the counts (``tta flip``), or empty.

    Use as a context manager, calling ``advance(n)`` as items get done; the
    closing line (with the total seconds) is written on a normal exit only.
    """

    def __init__(
        self, label: str, total: int | None, *, unit: str = "images", stream=None, detail=""
    ):
        self.label, self.total, self.unit, self.detail = label, total, unit, detail
        self._stream = stream
        self.done = 0.0
        self._start = self._last = time.perf_counter()
        self._terminal = bool(getattr(self.stream, "isatty", lambda: False)())

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        elif self._terminal:
            print(file=self.stream, flush=True)  # leave the partial line; the error goes below

    def advance(self, n: float = 1) -> None:
        """Counts ``n`` more items done (a fraction for a part of an item)."""
        self.done += n
        now = time.perf_counter()
        if now - self._last >= (REFRESH_S if self._terminal else LOG_EVERY_S):
            self._last = now
            self._write(end="\r" if self._terminal else "\n")

    def close(self) -> None:
        """Writes the closing line: items done, their rate, and the seconds it all took.

        Nothing when there was nothing to do (a total of 0).
        """
        if self.total == 0 and not self.done:
            return
        self._write(end="\n", final=True)

    def line(self, *, final: bool = False) -> str:
        """The progress line as it would be written now."""
        elapsed = time.perf_counter() - self._start
        done = int(self.done + 1e-9)
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{done}/{self.total}" if self.total is not None else f"{done}"
        parts = [f"{rate:,.1f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s"]
        if final:
            parts.append(f"{elapsed:.1f} s")
        elif self.total is not None and rate > 0:
            parts.append(f"{_seconds((self.total - self.done) / rate)} left")
        detail = f"{self.detail}; " if self.detail else ""
        return f"  {self.label} {count} {self.unit} ({detail}{', '.join(parts)})"

    def _write(self, *, end: str, final: bool = False) -> None:
        text = self.line(final=final)
        if self._terminal:
            text = f"\r{text}\033[K"  # erase what a longer line left
        print(text, end=end, file=self.stream, flush=True)


@contextlib.contextmanager
def timed(label: str, *, done: str = "done", stream=None):
    """One line on standard error when the step ends: ``  {label}: {done} in 4.2 s``.

    On a terminal ``  {label} ...`` shows while the step runs. Nothing is
    written at the end when the step raises (its error says what happened).
    """
    out = stream if stream is not None else sys.stderr
    terminal = bool(getattr(out, "isatty", lambda: False)())
    if terminal:
        print(f"  {label} ...", end="\r", file=out, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        if terminal:
            print(file=out, flush=True)
        raise
    text = f"  {label}: {done} in {time.perf_counter() - start:.1f} s"
    print(f"\r{text}\033[K" if terminal else text, file=out, flush=True)
