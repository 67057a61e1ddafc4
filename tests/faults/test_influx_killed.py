"""End to end into a real InfluxDB through real Celery workers, with the pump's worker SIGKILLed
mid-run and a replacement started: every record is one point, none lost, none twice (a
redelivered batch rewrites its own points), counted by record id with InfluxQL."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from app.analytics import AnalyticsRecord
from tests.faults.conftest import fault_config
from tests.faults.helpers import report, start_sweeping_beat, with_quick_sweep
from tests.servers_influx import InfluxServer, point_count
from tests.support import Proc, start_worker, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECORDS = 8000
#: Short, so the killed worker's tasks come back soon on the Redis broker (pump timeout 5 s,
#: hard limit 10 s, backoff at most 2 s: still longer than any task runs or waits).
VISIBILITY_TIMEOUT_S = 20
DELIVERY_TIMEOUT_S = 150


def make_records(count: int) -> list[AnalyticsRecord]:
    """Records of the current second or so, 100 users: many share their second and tags."""
    return [
        AnalyticsRecord(username=f"user-{i % 100}", effect="allow", request=f"influx-{i}")
        for i in range(count)
    ]


def stored(server: InfluxServer, database: str) -> tuple[Counter[str], Counter[str]]:
    """Points per record id and per request, read back with InfluxQL."""
    client = server.client(database)
    try:
        if database not in {entry["name"] for entry in client.get_list_database()}:
            return Counter(), Counter()
        points = list(client.query('SELECT "id", "request" FROM "analytics"').get_points())
    finally:
        client.close()
    return Counter(p["id"] for p in points), Counter(p["request"] for p in points)


def test_pump_worker_killed_mid_run_every_record_is_one_point(
    tmp_path: Path,
    broker: str,
    faults_db: redis.Redis,
    procs: list[Proc],
    influx_server: InfluxServer,
    influx_database: str,
) -> None:
    pump = {
        "type": "influx",
        "timeout": 5,
        "meta": {
            "database_name": influx_database,
            "address": influx_server.url,
            "tags": ["username", "effect"],
        },
    }
    config = write_config(
        tmp_path / "c.yaml",
        with_quick_sweep(
            fault_config(
                tmp_path,
                broker,
                pumps={"influx": pump},
                analytics={"records-buffer-size": 200, "pool-size": 4},
                delivery={
                    "retry-backoff-base-s": 0.2,
                    "retry-backoff-max-s": 2,
                    "visibility-timeout-s": VISIBILITY_TIMEOUT_S,
                },
            )
        ),
    )
    start_sweeping_beat(config, tmp_path, procs)
    records = make_records(RECORDS)
    expected = {record.request for record in records}
    report(records, config)  # 160 batches of 50 wait in the ingest queue
    ingest = start_worker(config, tmp_path / "i.log", queues="ingest", name="ingest")
    procs.append(ingest)

    def ingested() -> int:
        return int(faults_db.hget("iam-pump:stats", "ingested_records") or 0)

    # The whole run waits in the pump's queue before its worker starts, so the kill below
    # lands while it writes, however fast InfluxDB takes the points.
    assert wait_until(lambda: ingested() >= RECORDS, 60)
    first = start_worker(config, tmp_path / "p1.log", queues="pump.influx", name="p1")
    procs.append(first)
    assert wait_until(lambda: point_count(influx_server, influx_database) > 0, 60, interval_s=0.02)
    if not broker:
        # Kill while tasks are held, not in a gap between two fetches (the fault to inject).
        assert wait_until(lambda: faults_db.hlen("unacked") > 0, 30, interval_s=0.005)
    first.kill_group(signal.SIGKILL)
    first.popen.wait(10)
    at_kill = point_count(influx_server, influx_database)
    held = faults_db.hlen("unacked") if not broker else -1
    assert broker or held > 0, "the killed worker held no task: no fault injected"
    procs.append(start_worker(config, tmp_path / "p2.log", queues="pump.influx", name="p2"))
    started = time.monotonic()

    def missing() -> int:
        return len(expected - set(stored(influx_server, influx_database)[1]))

    assert wait_until(lambda: missing() == 0, DELIVERY_TIMEOUT_S, interval_s=1), (
        f"{missing()} of {RECORDS} missing; dead letters: "
        f"{faults_db.hlen('iam-pump:dead-letters:influx')}; stats: "
        f"{faults_db.hgetall('iam-pump:stats')}"
    )

    def written() -> int:
        return int(faults_db.hget("iam-pump:stats", "written_records:influx") or 0)

    # The killed worker's tasks come back even when their write had landed: wait, then count.
    assert wait_until(lambda: written() >= RECORDS, DELIVERY_TIMEOUT_S, interval_s=1)
    by_id, by_request = stored(influx_server, influx_database)
    lost = len(expected - set(by_request))
    duplicated = sum(by_request.values()) - len(by_request)
    points = point_count(influx_server, influx_database)
    print(
        f"\n[influx, pump worker SIGKILL ({'amqp' if broker else 'redis'})] records: {RECORDS}, "
        f"points at the kill: {at_kill}, tasks held: {held}, lost: {lost}, duplicated: "
        f"{duplicated}, points: {points}, records written (incl. redelivered): {written()}, "
        f"{time.monotonic() - started:.1f}s"
    )
    assert lost == 0 and duplicated == 0
    assert points == RECORDS == len(by_id)
    assert set(by_id.values()) == {1}
    assert all(record_id.rpartition("-")[2].isdigit() for record_id in by_id)
