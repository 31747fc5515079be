"""Errors the user can cause and fix: shown as one clear message, no stack trace."""

import contextlib
import logging
import sys


class PipelineError(Exception):
    """A problem with the user's config, data or files, worded for the user."""

    exit_code = 2  # what the command exits with


@contextlib.contextmanager
def user_errors(log: logging.Logger | None = None):
    """For command entry points: a ``PipelineError`` becomes ``error: ...`` and exit code 2."""
    try:
        yield
    except PipelineError as err:
        if log is not None:
            log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
