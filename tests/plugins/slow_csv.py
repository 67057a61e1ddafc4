"""A CSV pump that takes its time: lets a fault test kill a worker in the middle of a write.

Registered for worker subprocesses through a throw-away entry point (see tests/faults/conftest).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydantic import AliasChoices, Field

from app.record import AnalyticsRecord
from pumps.base import WriteResult
from pumps.csv import CSVMeta, CSVPump
from pumps.deadline import Deadline
from pumps.errors import PumpTemporaryError


class SlowCSVMeta(CSVMeta):
    """``meta`` of the slow csv pump: the csv pump's, plus how slow to be."""

    delay_s: float = Field(default=1.0, ge=0)
    #: Sleep the whole delay whatever the deadline and whatever is raised into the sleep (such
    #: as Celery's soft time limit), like a driver stuck in C code. ``ignore_soft_limit`` is the
    #: old name, which fault-test configs still use.
    ignore_deadline: bool = Field(
        default=False, validation_alias=AliasChoices("ignore_deadline", "ignore_soft_limit")
    )


class SlowCSVPump(CSVPump):
    """Sleeps ``delay_s`` before each write, but no later than its deadline, then writes."""

    Meta = SlowCSVMeta
    meta: SlowCSVMeta

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        if self.meta.ignore_deadline:
            self._sleep_through(self.meta.delay_s)
        else:
            # One operation within its budget, as a real pump gives each driver call.
            budget_s = deadline.operation_budget_s()
            time.sleep(min(self.meta.delay_s, budget_s))
            if self.meta.delay_s > budget_s:
                raise PumpTemporaryError(
                    f"write took longer than the pump timeout: its deadline passed after "
                    f"{self.timeout_s}s of a {self.meta.delay_s}s delay"
                )
        return super().write(records, deadline=deadline)

    @staticmethod
    def _sleep_through(delay_s: float) -> None:
        end = time.monotonic() + delay_s
        while (left_s := end - time.monotonic()) > 0:
            # Whatever a signal handler raises in here is ignored, as C code would not see it.
            try:
                time.sleep(left_s)
            except Exception:
                continue
