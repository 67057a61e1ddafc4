"""Task and queue names, shared by the tasks, the Celery settings and the reporter."""

from __future__ import annotations

INGEST_TASK = "iam_pump.ingest"
PURGE_TASK = "iam_pump.purge"
WRITE_TASK = "iam_pump.write"
INGEST_QUEUE = "ingest"
PURGE_QUEUE = "purge"


def pump_queue(pump_name: str) -> str:
    """The queue of one pump's write tasks."""
    return f"pump.{pump_name}"
