"""The user-facing error type: reported as one line, never as a traceback."""
from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration problem: reported as one line, never as a traceback."""
