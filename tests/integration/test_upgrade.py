"""A rolling upgrade loses nothing: tasks and dead letters in the previous version's form are
still delivered by this version's workers.

The previous version published ``ingest(<bytes>)``, ``ingest(stored=<envelope key>)``,
``write(<pump>, <bytes>)`` and ``write(<pump>, stored=<batch id>)``; dead-letter entries are
stored in the same msgpack form as before.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from app.codec import encode_clean_batch, encode_envelope, record_to_row
from app.config import load_settings
from app.record import AnalyticsRecord
from app.stores.dead_letters import DeadLetter
from tests.support import (
    Proc,
    base_config,
    read_csv_rows,
    run_cli,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration


def _records(tag: str, count: int) -> list[AnalyticsRecord]:
    return [
        AnalyticsRecord(timestamp=1_700_000_000 + i, username=f"u{i}", request=f"{tag}-{i}")
        for i in range(count)
    ]


def _clean(batch_id: str, records: list[AnalyticsRecord]) -> bytes:
    return encode_clean_batch(
        batch_id, [[position, *record_to_row(r)] for position, r in enumerate(records)]
    )


def test_tasks_and_dead_letters_of_the_previous_version_are_delivered(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    config = write_config(tmp_path / "c.yaml", base_config(tmp_path))
    url = load_settings(config).broker  # the test's Redis database, logged in as the pump
    old = Celery("previous-version", broker=url, set_as_current=False)
    old.conf.update(task_serializer="msgpack", accept_content=["msgpack"])
    batches = {tag: _records(tag, 50) for tag in ("inline", "kept", "w-inline", "w-kept", "dl")}

    rows = [record_to_row(r) for r in batches["inline"]]
    old.send_task("iam_pump.ingest", args=(encode_envelope("up-inline", rows),), queue="ingest")
    envelope_key = "iam-pump:envelope:up-kept"
    rows = [record_to_row(r) for r in batches["kept"]]
    redis_db.set(envelope_key, encode_envelope("up-kept", rows))
    old.send_task("iam_pump.ingest", kwargs={"stored": envelope_key}, queue="ingest")
    clean = _clean("up-w-inline", batches["w-inline"])
    old.send_task("iam_pump.write", args=("csv", clean), queue="pump.csv")
    redis_db.hset(
        "iam-pump:batch:up-w-kept",
        mapping={"data": _clean("up-w-kept", batches["w-kept"]), "pump:csv": 1},
    )
    old.send_task("iam_pump.write", args=("csv",), kwargs={"stored": "up-w-kept"}, queue="pump.csv")
    entry = DeadLetter(
        id="up-dl:write",
        group="csv",
        stage="write",
        batch_id="up-dl",
        error="sink down",
        failed_at=time.time(),
        record_count=50,
        attempts=9,
        payload=_clean("up-dl", batches["dl"]),
    )
    redis_db.sadd("iam-pump:dead-letters", "csv")
    redis_db.hset("iam-pump:dead-letters:csv", entry.id, entry.pack())
    old.close()

    procs.append(start_worker(config, tmp_path / "worker.log"))
    replay = run_cli("dead-letters", "replay", "csv", "--all", "--config", str(config))
    assert replay.returncode == 0, replay.stdout + replay.stderr
    expected = sorted(r.request for records in batches.values() for r in records)
    assert wait_until(lambda: len(read_csv_rows(tmp_path / "csv")) >= len(expected), 60), procs[
        0
    ].output()[-3000:]
    time.sleep(1)
    delivered = sorted(row["Request"] for row in read_csv_rows(tmp_path / "csv"))
    print(f"\nrecords: {len(expected)}, delivered: {len(delivered)}")
    assert delivered == expected, "every record once, none lost"
    assert redis_db.get(envelope_key) == b"", "the kept envelope is released once fanned out"
    assert redis_db.hget("iam-pump:batch:up-w-kept", "data") is None, "the kept batch is released"
