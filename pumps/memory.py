"""An in-memory pump, the stand-in sink for unit tests of everything around the pumps.

Records are kept per pump name in this process, keyed by record id, so a redelivered batch is
stored once (it upserts). ``meta.fail_times`` makes the first writes fail, to exercise retries.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.record import AnalyticsRecord
from pumps.base import NO_ID_REASON, Pump, WriteResult
from pumps.deadline import Deadline
from pumps.errors import PumpPermanentError, PumpTemporaryError


class MemoryMeta(BaseModel):
    """``meta`` of the memory pump."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fail_times: int = Field(default=0, ge=0)
    fail_kind: Literal["temporary", "permanent"] = "temporary"


class MemoryPump(Pump[MemoryMeta]):
    """Keeps records in a process-wide dict; see :meth:`records` and :meth:`reset`."""

    Meta = MemoryMeta
    upserts = True

    _stores: ClassVar[dict[str, dict[str, AnalyticsRecord]]] = {}
    _writes: ClassVar[dict[str, int]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Store the records by id; fail the first ``meta.fail_times`` writes as told."""
        result = WriteResult()
        with self._lock:
            attempt = self._writes.get(self.name, 0) + 1
            self._writes[self.name] = attempt
            if attempt <= self.meta.fail_times:
                message = f"memory pump {self.name!r}: injected failure {attempt}"
                if self.meta.fail_kind == "permanent":
                    raise PumpPermanentError(message)
                raise PumpTemporaryError(message)
            store = self._stores.setdefault(self.name, {})
            for record in records:
                if record.id:
                    store[record.id] = record
                else:
                    result.rejected.append((record, NO_ID_REASON))
        return result

    @classmethod
    def records(cls, name: str) -> list[AnalyticsRecord]:
        """What pump ``name`` holds, in write order."""
        with cls._lock:
            return list(cls._stores.get(name, {}).values())

    @classmethod
    def reset(cls) -> None:
        """Forget every record and counter."""
        with cls._lock:
            cls._stores.clear()
            cls._writes.clear()
