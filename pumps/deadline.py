"""Deadlines and time budgets: the one place that says how long a pump operation may take.

The caller of a write (the write task) makes a :class:`Deadline` when the write starts, from the
pump's ``timeout``, which is also Celery's soft time limit for it. A pump gives each driver call
:meth:`Deadline.operation_budget_s`: what is left less a margin, so the pump's own error, which
names the cause, arrives before the caller's hard stop, which names only the time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

#: The health check's own deadline, however long the pump's timeout is.
CHECK_TIMEOUT_S = 2.0
#: An operation ends this long before its deadline, so the pump's error arrives first.
TIMEOUT_MARGIN_S = 1.0
#: The shortest budget an operation gets, however little time is left: enough for one answer
#: from a healthy server, so a short deadline gives the sink's error rather than none at all.
MIN_OPERATION_BUDGET_S = 0.5


@dataclass(frozen=True, slots=True)
class Deadline:
    """An instant on the :func:`time.monotonic` clock by which an operation must be over."""

    at_monotonic_s: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """The deadline ``seconds`` from now."""
        return cls(time.monotonic() + seconds)

    def remaining_s(self) -> float:
        """Seconds left until the deadline; 0 once it has passed."""
        return max(0.0, self.at_monotonic_s - time.monotonic())

    @property
    def expired(self) -> bool:
        """True once the deadline has passed."""
        return time.monotonic() >= self.at_monotonic_s

    def operation_budget_s(self) -> float:
        """How long one operation may take: what is left less the margin, at least the minimum."""
        return max(MIN_OPERATION_BUDGET_S, self.remaining_s() - TIMEOUT_MARGIN_S)
