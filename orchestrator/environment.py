"""The ``WBSWEEP_*`` environment variables that set durations (docs/cli.md lists them); tests shorten
the waits with them."""

from __future__ import annotations

import os


def env_seconds(name: str, default: float) -> float:
    """A duration in seconds from the environment variable ``name``, else ``default`` (also when it
    is not a number)."""
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default
