"""The reporter's shipping process (app/analytics_helper.py): killed, it loses nothing.

Real Redis, a real ``celery worker`` writing CSV, the real helper process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import redis

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from tests.integration.test_pipeline import count_by_request, kept_bytes, make_record
from tests.support import (
    Proc,
    RedisServer,
    base_config,
    free_port,
    read_csv_rows,
    redis_url,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration


def offer(analytics: Analytics, records: list[AnalyticsRecord]) -> None:
    for record in records:
        while not analytics.record_hit(record):
            time.sleep(0.001)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose.
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        return handle.read().split(") ")[1][0] != "Z"


def test_a_killed_shipping_process_is_restarted_and_every_record_lands_once(
    tmp_path: Path,
    redis_db: redis.Redis,
    procs: list[Proc],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = write_config(
        tmp_path / "c.yaml", base_config(tmp_path, analytics={"flush-interval": 20})
    )
    procs.append(start_worker(config, tmp_path / "worker.log"))
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    analytics.start()
    records = [make_record("helper", i) for i in range(9000)]
    offer(analytics, records[:3000])
    assert wait_until(lambda: analytics.stats().shipped_records == 3000, 30)
    assert analytics._helper is not None
    first = analytics._helper.pid
    assert first is not None
    # Frozen, the helper takes batches into its pipe and ships none: they are in flight when
    # it is killed, and must be handed to the next one.
    os.kill(first, signal.SIGSTOP)
    offer(analytics, records[3000:6000])
    assert wait_until(lambda: analytics.stats().pending == 3000, 30), analytics.stats()
    with caplog.at_level(logging.WARNING, logger="app.analytics"):
        os.kill(first, signal.SIGKILL)
        offer(analytics, records[6000:])
        stats = analytics.stop(timeout_s=60)
    assert analytics._helper.starts == 2 and analytics._helper.pid != first
    assert "shipping process ended unexpectedly" in caplog.text
    assert stats.shipped_records == len(records) and stats.lost_at_stop == 0, stats
    assert stats.pending == stats.buffered == 0
    csv_dir = tmp_path / "csv"
    assert wait_until(lambda: len(read_csv_rows(csv_dir)) >= len(records), 120)
    time.sleep(1)
    counts = count_by_request(read_csv_rows(csv_dir))
    assert set(counts) == {r.request for r in records}
    assert max(counts.values()) == 1, "a batch handed over twice was stored twice"
    assert wait_until(lambda: kept_bytes(redis_db) == 0, 30)
    assert not alive(analytics._helper.pid or 0)


def test_stop_gives_up_at_its_timeout_stops_the_helper_and_counts_the_loss(
    tmp_path: Path,
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    analytics = Analytics(
        AnalyticsOptions(broker_url=nowhere, redis_url=nowhere, flush_interval_ms=10)
    )
    analytics.start()
    offer(analytics, [make_record("down", i) for i in range(500)])
    assert wait_until(lambda: analytics.stats().ship_failures > 0, 30)
    assert analytics._helper is not None and analytics._helper.pid is not None
    helper = analytics._helper.pid
    started = time.monotonic()
    stats = analytics.stop(timeout_s=1)
    assert time.monotonic() - started < 10
    assert stats.lost_at_stop == 500 and stats.shipped_records == 0
    assert stats.pending == stats.buffered == 0
    assert not alive(helper)


def test_stop_without_start_ships_through_a_helper(redis_db: redis.Redis) -> None:
    broker = redis_url()  # with the environment's login, when there is one
    analytics = Analytics(AnalyticsOptions(broker_url=broker, redis_url=broker))
    offer(analytics, [make_record("late", i) for i in range(100)])
    stats = analytics.stop(timeout_s=30)
    assert stats.shipped_records == 100 and stats.lost_at_stop == 0
    assert redis_db.llen("ingest") == 1


APP_THAT_DIES = """
import os, signal, sys, time
import msgpack
from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
url = sys.argv[1]
analytics = Analytics(AnalyticsOptions(broker_url=url, redis_url=url, flush_interval_ms=10))
analytics.start()
while analytics._helper.pid is None:  # the cutter thread starts it
    time.sleep(0.01)
helper = analytics._helper.pid
# Records count as pending once cut, a moment before their batch is in the pipe: count what
# the pipe was given.
in_pipe = []
send = analytics._helper.send
def counted_send(batch_id, payload):
    sent = send(batch_id, payload)
    in_pipe.append(len(msgpack.unpackb(payload)["records"]) if sent else 0)
    return sent
analytics._helper.send = counted_send
os.kill(helper, signal.SIGSTOP)
for i in range(1000):
    analytics.record_hit(AnalyticsRecord(username=f"orphan-{i}"))
while sum(in_pipe) < 1000:
    time.sleep(0.01)
print(helper, flush=True)
time.sleep(60)
"""


class DyingApp:
    """APP_THAT_DIES in a process of its own, its helper frozen with 1000 records in the pipe."""

    def __init__(self, tmp_path: Path, broker: str) -> None:
        script = tmp_path / "dying_app.py"
        script.write_text(APP_THAT_DIES, encoding="utf-8")
        self.log = tmp_path / "app.log"  # the helper inherits the application's stderr
        with self.log.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), broker],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self.proc.stdout is not None
        self.helper = int(self.proc.stdout.readline())

    def die(self) -> None:
        """SIGKILL the application; its helper is left frozen with batches nobody shipped."""
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        self.die()
        if alive(self.helper):
            os.kill(self.helper, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def shipped_values(client: redis.Redis, column: int = 1) -> list[str]:
    """One column of every row in the envelopes in Redis, sorted (1: username, 4: request)."""
    rows = [
        row
        for key in client.scan_iter("iam-pump:envelope:*")
        for row in msgpack.unpackb(client.get(key), timestamp=3)["records"]
    ]
    return sorted(row[column] for row in rows)


ORPHANS = sorted(f"orphan-{i}" for i in range(1000))


def test_when_the_application_dies_the_helper_ships_what_it_received_and_exits(
    redis_db: redis.Redis, tmp_path: Path
) -> None:
    app = DyingApp(tmp_path, redis_url())  # with the environment's login, when there is one
    try:
        app.die()
        assert redis_db.llen("ingest") == 0
        os.kill(app.helper, signal.SIGCONT)
        assert wait_until(lambda: not alive(app.helper), 30), "the orphaned helper did not exit"
        assert wait_until(lambda: redis_db.llen("ingest") >= 1, 10), app.log.read_text()
        assert shipped_values(redis_db) == ORPHANS
    finally:
        app.close()


def test_an_orphaned_helper_retries_through_a_short_redis_outage(tmp_path: Path) -> None:
    """The application dies while Redis is down: its helper keeps what it received and ships it
    when Redis is back (within ORPHAN_GRACE_S), instead of giving up at the first failure."""
    server = RedisServer(tmp_path / "redis")
    app = DyingApp(tmp_path, f"redis://127.0.0.1:{server.port}/0")
    try:
        server.stop()
        app.die()
        os.kill(app.helper, signal.SIGCONT)
        assert wait_until(lambda: "shipping failed" in app.log.read_text(), 30)
        time.sleep(3)  # more failed attempts, past the first backoffs
        assert alive(app.helper), app.log.read_text()
        server = RedisServer(tmp_path / "redis", port=server.port)
        assert wait_until(lambda: not alive(app.helper), 30), "the orphaned helper did not exit"
        assert shipped_values(server.client()) == ORPHANS, app.log.read_text()
        assert "not shipped" not in app.log.read_text()
    finally:
        app.close()
        server.stop()


def helper_children() -> set[str]:
    """The pids of this process's children that run the reporter's helper."""
    found = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "app.analytics_helper"],
        capture_output=True,
        text=True,
        check=False,
    )
    return set(found.stdout.split())


def test_helper_process_off_ships_from_this_process(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    """``analytics.helper-process: false`` (an embedded interpreter): no child process, the
    application's own threads publish, and every record lands once."""
    config = write_config(
        tmp_path / "c.yaml", base_config(tmp_path, analytics={"helper-process": False})
    )
    procs.append(start_worker(config, tmp_path / "worker.log"))
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    assert analytics.options.helper_process is False
    before = helper_children()
    analytics.start()
    assert analytics._helper is None
    records = [make_record("inproc", i) for i in range(2000)]
    offer(analytics, records)
    assert wait_until(lambda: analytics.stats().shipped_records == len(records), 30)
    # While it runs (a helper would be alive now): no new child process runs the helper (other
    # tests' reporters in this process may have left theirs).
    assert helper_children() <= before, "a helper process was started"
    stats = analytics.stop(timeout_s=30)
    assert stats.shipped_records == len(records) and stats.lost_at_stop == 0, stats
    csv_dir = tmp_path / "csv"
    assert wait_until(lambda: len(read_csv_rows(csv_dir)) >= len(records), 60)
    time.sleep(0.5)
    counts = count_by_request(read_csv_rows(csv_dir))
    assert set(counts) == {r.request for r in records} and max(counts.values()) == 1


def test_the_helpers_command_line_shows_no_password(redis_db: redis.Redis) -> None:
    """Every user of the machine can read a command line (`ps`): the broker URL with its
    password reaches the helper through its pipe instead."""
    secret = "s3cret-not-for-ps"
    url = f"redis://:{secret}@127.0.0.1:{free_port()}/0"  # nothing listens: nothing ships
    analytics = Analytics(AnalyticsOptions(broker_url=url, redis_url=url, flush_interval_ms=10))
    analytics.start()
    try:
        offer(analytics, [make_record("ps", 0)])
        assert wait_until(lambda: analytics._helper is not None and analytics._helper.alive(), 10)
        assert analytics._helper is not None and analytics._helper.pid is not None
        with open(f"/proc/{analytics._helper.pid}/cmdline", "rb") as handle:
            command_line = handle.read()
        assert b"app.analytics_helper" in command_line
        assert secret.encode() not in command_line
    finally:
        analytics.stop(timeout_s=1)


def test_waiting_records_are_packed_within_the_pack_interval_and_ship_as_one_batch(
    redis_db: redis.Redis,
) -> None:
    """With a helper process, records do not wait in the buffer for the whole flush interval:
    they are packed into the open batch within PACK_EVERY_S (so the objects die young), and
    the batch still goes out whole when the interval is up."""
    broker = redis_url()
    analytics = Analytics(
        AnalyticsOptions(broker_url=broker, redis_url=broker, flush_interval_ms=1500)
    )
    analytics.start()
    try:
        time.sleep(0.3)  # the cutter has started and is waiting
        offer(analytics, [make_record("young", i) for i in range(300)])
        taken = time.monotonic()
        # PACK_EVERY_S is 20 ms; a third of the flush interval leaves room for a loaded machine.
        assert wait_until(lambda: analytics.stats().buffered == 0, 0.5, 0.005)
        waited = time.monotonic() - taken
        stats = analytics.stats()
        assert stats.pending == 300 and stats.shipped_records == 0, stats
        assert redis_db.llen("ingest") == 0, "a batch went out before its flush interval"
        assert wait_until(lambda: analytics.stats().shipped_records == 300, 10)
        assert redis_db.llen("ingest") == 1, "the records went out in more than one batch"
        assert shipped_values(redis_db, 4) == sorted(f"young-{i}" for i in range(300))
        print(f"packed within {waited * 1000:.0f} ms")
    finally:
        analytics.stop(timeout_s=10)
