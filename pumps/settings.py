"""The configuration as the worker and the command line load it: every pump's ``meta`` checked.

:func:`app.config.load_settings` validates the common keys only, so that the reporter, which
runs inside other people's applications, imports no sink driver. Processes that run or check
pumps load through here, and a bad ``meta`` key is reported with its path together with every
other problem of the file.
"""

from __future__ import annotations

import os

from app.config import Settings, load_settings, parse_settings
from pumps.registry import meta_problems


def load_pump_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """:func:`app.config.load_settings`, with each pump's ``meta`` validated by its class."""
    return load_settings(path, meta_problems=meta_problems)


def parse_pump_settings(text: str, *, source: str = "") -> Settings:
    """:func:`app.config.parse_settings`, with each pump's ``meta`` validated by its class."""
    return parse_settings(text, source=source, meta_problems=meta_problems)
