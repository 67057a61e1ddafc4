"""A sink that keeps nothing: it counts the records of each batch and logs the count.

For trying out a configuration or the pipeline without a store; iam-pump's ``dummy`` type, which
logs ``Writing N records`` at info level for each batch and keeps nothing. This one logs the same
line with the pump's name and also keeps the running total in :attr:`DummyPump.received`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from app.record import AnalyticsRecord
from pumps.base import NoMeta, Pump, WriteResult
from pumps.deadline import Deadline

logger = logging.getLogger(__name__)


class DummyPump(Pump[NoMeta]):
    """Logs how many records each write got, and keeps the total in :attr:`received`."""

    #: Nothing is stored, so no record is too big for it.
    handles_record_size = True

    def __init__(self, name: str, meta: NoMeta, *, timeout_s: float) -> None:
        super().__init__(name, meta, timeout_s=timeout_s)
        self._lock = threading.Lock()
        self._received = 0

    @property
    def received(self) -> int:
        """Records this instance was handed since it was made."""
        return self._received

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Count the records and log the count; an empty batch logs nothing."""
        if records:
            with self._lock:
                self._received += len(records)
            logger.info("pump %s: writing %d records", self.name, len(records))
        return WriteResult()
