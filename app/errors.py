"""Errors of the application side of iam-pump.

::

    IamPumpError                  root of every error raised on purpose by app/
     +-- ConfigError              the YAML file is missing, unreadable or invalid (exit status 2)
     +-- ShipError                the reporter could not hand a batch to the broker or Redis

Pumps have their own root, :class:`pumps.errors.PumpError`.
"""

from __future__ import annotations


class IamPumpError(Exception):
    """Root of the errors app/ raises on purpose."""


class ConfigError(IamPumpError):
    """Raised when a configuration file cannot be read or does not validate.

    ``problems`` holds one ``(key path, message)`` pair per problem, so that every bad key is
    named at once rather than one per start-up attempt.
    """

    def __init__(self, problems: list[tuple[str, str]], *, source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid configuration{where}:"]
        lines += [f"  {path or '<root>'}: {message}" for path, message in problems]
        super().__init__("\n".join(lines))


class ShipError(IamPumpError):
    """Raised by a reporter transport when a batch could not be shipped (it will be retried)."""
