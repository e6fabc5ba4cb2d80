"""Errors a user can fix by changing a config value or a data file.

The CLI catches `DwbenchError` and prints its message without a traceback, so every message has
to stand on its own: name the config field or file at fault and say what to change.
"""

from __future__ import annotations


class DwbenchError(Exception):
    """A problem the user can fix; the CLI prints the message without a traceback."""


class ConfigError(DwbenchError):
    """A config value is missing, unknown or out of range; the message names the field."""


class DataError(DwbenchError):
    """A data file or dataset is missing or malformed; the message names the file or dataset."""
