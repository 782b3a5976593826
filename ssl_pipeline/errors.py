"""Errors the command line turns into one clear line and a non-zero exit."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's input that no amount of retrying fixes."""


class ConfigError(PipelineError):
    """A bad configuration value; the message names the offending key.

    Parameters
    ----------
    key : str
        The dotted config key (``data.labeled_per_class``) or file at fault.
    message : str
        What is wrong and, where possible, how to fix it.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class DataError(PipelineError):
    """Unusable input data (a missing file, wrong shapes, NaN values, ...)."""


class BackboneLoadError(PipelineError):
    """Backbone weights could not be loaded (offline download, bad checkpoint path)."""
