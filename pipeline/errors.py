"""Errors the user can cause and fix: shown as one clear message, no stack trace."""

import contextlib
import logging
import sys


class PipelineError(Exception):
    """A problem with the user's config, data or files, worded for the user."""

    exit_code = 2  # what the command exits with


_CARRIED = "pipeline.errors.PipelineError: "  # how TensorFlow quotes one raised in a py function


def carried_user_error(err: BaseException) -> PipelineError | None:
    """``err`` if it is a ``PipelineError``, or the one a TensorFlow error carries, else None.

    A ``PipelineError`` raised inside a ``tf.numpy_function`` (an image file that
    vanished after the scan) reaches the caller as a TensorFlow error whose text
    holds a line ``pipeline.errors.PipelineError: <message>``.
    """
    if isinstance(err, PipelineError):
        return err
    for line in str(err).splitlines():
        if line.startswith(_CARRIED):
            return PipelineError(line[len(_CARRIED) :])
    return None


@contextlib.contextmanager
def user_errors(log: logging.Logger | None = None):
    """For command entry points: a ``PipelineError`` becomes ``error: ...`` and exit code 2.

    So does one carried out of a tf.data function by a TensorFlow error.
    """
    try:
        yield
    except Exception as raised:
        err = carried_user_error(raised)
        if err is None:
            raise
        if log is not None:
            log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
