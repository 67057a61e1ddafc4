"""A CSV pump that takes its time: lets a fault test kill a worker in the middle of a write.

Registered for worker subprocesses through a throw-away entry point (see tests/faults/conftest).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import Field

from app.record import AnalyticsRecord
from pumps.csv import CSVMeta, CSVPump


class SlowCSVMeta(CSVMeta):
    delay_s: float = Field(default=1.0, ge=0)
    #: Keep sleeping through the soft time limit, like a driver stuck in C code.
    ignore_soft_limit: bool = False


class SlowCSVPump(CSVPump):
    Meta = SlowCSVMeta

    def write(self, records: Sequence[AnalyticsRecord]) -> None:
        assert isinstance(self.meta, SlowCSVMeta)
        deadline = time.monotonic() + self.meta.delay_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                time.sleep(left)
            except SoftTimeLimitExceeded:
                if not self.meta.ignore_soft_limit:
                    raise
        super().write(records)
