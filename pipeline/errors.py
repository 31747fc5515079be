"""Errors the user can cause and fix: shown as one clear message, no stack trace."""


class PipelineError(Exception):
    """A problem with the user's config, data or files, worded for the user."""
