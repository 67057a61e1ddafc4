"""Errors raised by pumps.

::

    PumpError                     root: every error a pump raises on purpose
     +-- PumpTemporaryError       the sink may accept the same write later (network, timeout,
     |                            server busy): the write task retries with backoff
     +-- PumpPermanentError       retrying the same write cannot help (bad credentials, rejected
     |                            data): the batch goes to the dead letters at once
     +-- PumpConfigError          a pump's ``meta`` or type is wrong; raised at start-up
     +-- PumpUnavailableError     an optional driver is missing; names the extra to install

A pump wraps every driver exception in one of these; no driver exception escapes unwrapped.
"""

from __future__ import annotations


class PumpError(Exception):
    """Root of the errors pumps raise on purpose."""


class PumpTemporaryError(PumpError):
    """Raised when a write failed in a way that a later retry may fix."""


class PumpPermanentError(PumpError):
    """Raised when a write failed in a way that a retry cannot fix."""


class PumpConfigError(PumpError):
    """Raised at start-up when a pump's type is unknown or its ``meta`` is invalid.

    ``path`` is the config key path of the problem, relative to the pump's entry.
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class PumpUnavailableError(PumpConfigError):
    """Raised when a pump needs an optional dependency that is not installed."""
