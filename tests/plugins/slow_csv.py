"""A CSV pump that takes its time: lets a fault test kill a worker in the middle of a write.

Registered for worker subprocesses through a throw-away entry point (see tests/faults/conftest).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydantic import Field

from app.record import AnalyticsRecord
from pumps.csv import CSVMeta, CSVPump


class SlowCSVMeta(CSVMeta):
    delay_s: float = Field(default=1.0, ge=0)


class SlowCSVPump(CSVPump):
    Meta = SlowCSVMeta

    def write(self, records: Sequence[AnalyticsRecord]) -> None:
        assert isinstance(self.meta, SlowCSVMeta)
        time.sleep(self.meta.delay_s)
        super().write(records)
