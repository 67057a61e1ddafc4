"""The naive design e2e_csv.py compares against: one Celery task per record, straight to CSV.

A Celery app of its own on the benchmarks' Redis database (``BENCH_BROKER_URL``, default
database 12) with its own queue, and the same delivery settings as iam-pump (msgpack, late acks,
one prefetched task per process), so the comparison is about batching, not about reliability::

    BENCH_CSV_DIR=/tmp/x celery -A naive_app worker -Q bench.naive   (PYTHONPATH=bench)

Each task writes its one record through ``pumps.csv.CSVPump`` (opened once per process).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from app.record import AnalyticsRecord
from pumps.csv import CSVPump
from pumps.deadline import Deadline

#: The naive design's write gets as long as the pump's default timeout.
NAIVE_WRITE_TIMEOUT_S = 30.0

NAIVE_QUEUE = "bench.naive"
NAIVE_TASK = "bench.naive.write_one"
BENCH_BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")

app = Celery("iam_pump_bench_naive", broker=BENCH_BROKER_URL)
app.conf.update(
    task_serializer="msgpack",
    accept_content=["msgpack"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=NAIVE_QUEUE,
    broker_connection_retry_on_startup=True,
)

_pump: list[Any] = []


def _csv_pump() -> Any:
    if not _pump:
        pump = CSVPump.create("naive", {"csv_dir": os.environ["BENCH_CSV_DIR"]}, timeout_s=30.0)
        pump.open()
        _pump.append(pump)
    return _pump[0]


def row_of(record: AnalyticsRecord) -> list[Any]:
    """What one task carries: the record's fields, ``expire_at`` as Unix seconds."""
    expire_at = record.expire_at.timestamp() if record.expire_at else 0.0
    return [
        record.timestamp,
        record.username,
        record.effect,
        record.conclusion,
        record.request,
        record.policies,
        record.deciders,
        expire_at,
    ]


@app.task(name=NAIVE_TASK)
def write_one(row: list[Any]) -> None:
    """Write one record to the CSV pump."""
    *fields, expire_s = row
    record = AnalyticsRecord(*fields, expire_at=datetime.fromtimestamp(expire_s, UTC))
    _csv_pump().write([record], deadline=Deadline.after(NAIVE_WRITE_TIMEOUT_S))
