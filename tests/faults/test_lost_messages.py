"""Task messages lost by the broker: the ledger sweep sends them again (Redis broker).

Messages are deleted behind the workers' back (the queues and kombu's ``unacked`` hash), which is
what kombu's BRPOP-then-record window, a broker restarted without persistence or an operator's
purge do; Redis itself is SIGKILLed and restarted again and again. The batch bytes and their
claims are still kept, so nothing may be lost.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from app.analytics import Analytics, AnalyticsOptions
from app.codec import encode_go_record
from tests.faults.conftest import OwnRedis, fault_config
from tests.faults.helpers import await_delivery, make_records, report, requests_in
from tests.support import Proc, celery_env, start_beat, start_worker, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WINDOW_S = 15
SWEEP_S = 2
LIST_KEY = "analytics-iam-system-analytics"


def _config(tmp_path: Path, *, redis_port: int | None = None, **meta: object) -> Path:
    csv_dir = tmp_path / "csv"
    extra = {"redis_port": redis_port, "db": 0} if redis_port else {}
    return write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            "",
            pumps={
                "csv": {
                    "type": "slowcsv",
                    "timeout": 60,
                    "meta": {"csv_dir": str(csv_dir), "delay_s": 0.0, **meta},
                }
            },
            analytics={"records-buffer-size": 500, "pool-size": 2},
            delivery={
                "retry-backoff-base-s": 0.2,
                "retry-backoff-max-s": 2,
                "redelivery-window-s": WINDOW_S,
                "sweep-interval-s": SWEEP_S,
                # A purge cut off by a Redis kill leaves iam's lock behind until it expires.
                "iam-lock-ttl-s": 5,
            },
            **extra,
        ),
    )


def _stat(client: redis.Redis, name: str) -> int:
    return int(client.hget("iam-pump:stats", name) or 0)


def test_task_messages_deleted_from_queues_and_unacked_are_sent_again(
    tmp_path: Path, faults_db: redis.Redis, procs: list[Proc], plugin_env: dict[str, str]
) -> None:
    config = _config(tmp_path, delay_s=2.0)
    env = celery_env(config, **plugin_env)
    # 1. Ingest messages deleted from their queue before any worker saw them.
    lost_ingest = make_records("lost-ingest", 2_500)
    report(lost_ingest, config)
    assert faults_db.llen("ingest") == 10
    faults_db.delete("ingest")
    # 2. Write messages: fanned out, then deleted from their queue and from unacked while a
    #    killed worker held some of them.
    lost_write = make_records("lost-write", 2_500)
    report(lost_write, config)
    ingest = start_worker(config, tmp_path / "i.log", queues="ingest", name="i", env=env)
    procs.append(ingest)
    assert wait_until(lambda: faults_db.llen("pump.csv") == 10, 30)
    ingest.stop()
    pump = start_worker(
        config, tmp_path / "p.log", queues="pump.csv", name="p", concurrency=1, env=env
    )
    procs.append(pump)
    assert wait_until(lambda: faults_db.hlen("unacked") > 0, 30, interval_s=0.01)
    pump.kill_group(signal.SIGKILL)
    pump.popen.wait(10)
    held = faults_db.hlen("unacked")
    faults_db.delete("pump.csv", "unacked", "unacked_index")
    print(f"\ndeleted 10 ingest messages, 10 write messages of which {held} were unacked")
    assert held > 0
    owed = faults_db.zcard("iam-pump:ledger")
    assert owed == 20, f"the ledger owes {owed} claims, expected 20"
    # 3. A fresh worker and beat: the sweep finds the claims and sends their tasks again.
    started = time.monotonic()
    procs.append(start_worker(config, tmp_path / "w.log", name="w", env=env))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path, env=env))
    expected = {r.request for r in lost_ingest + lost_write}
    limit_s = WINDOW_S + SWEEP_S + 20 * 2.0 + 30  # window, one sweep, 20 two-second writes, slack
    lost, duplicated, _ = await_delivery(
        tmp_path / "csv", expected, timeout_s=limit_s, label="task messages deleted"
    )
    elapsed = time.monotonic() - started
    resent = _stat(faults_db, "resent_tasks")
    print(f"all delivered {elapsed:.1f}s after a worker came back; tasks sent again: {resent}")
    assert lost == 0
    assert duplicated == 0  # the killed write died in its 2 s delay, before writing a row
    assert resent >= 20
    assert faults_db.zcard("iam-pump:ledger") == 0


def test_a_write_slower_than_the_window_is_never_sent_again(
    tmp_path: Path, faults_db: redis.Redis, procs: list[Proc], plugin_env: dict[str, str]
) -> None:
    config = _config(tmp_path, delay_s=WINDOW_S * 2)
    env = celery_env(config, **plugin_env)
    records = make_records("slow", 250)
    report(records, config)
    procs.append(start_worker(config, tmp_path / "w.log", name="w", concurrency=1, env=env))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path, env=env))
    assert wait_until(lambda: faults_db.hlen("unacked") > 0, 30, interval_s=0.05)
    # Only the heartbeat says the write is alive: its message is gone from unacked.
    deadline = time.monotonic() + WINDOW_S * 2
    while time.monotonic() < deadline and not requests_in(tmp_path / "csv"):
        faults_db.delete("unacked", "unacked_index")
        time.sleep(0.5)
    lost, duplicated, _ = await_delivery(
        tmp_path / "csv", {r.request for r in records}, timeout_s=60, label="slow write"
    )
    time.sleep(SWEEP_S * 2)  # a sweep after the write would still find nothing owed
    resent = _stat(faults_db, "resent_tasks")
    print(f"tasks sent again: {resent}")
    assert lost == 0 and duplicated == 0
    assert resent == 0
    assert faults_db.zcard("iam-pump:ledger") == 0


def test_redis_sigkilled_and_restarted_again_and_again_loses_nothing(
    tmp_path: Path, own_redis: OwnRedis, procs: list[Proc], plugin_env: dict[str, str]
) -> None:
    """Redis with AOF ``appendfsync always`` SIGKILLed and restarted 3 s later, several times,
    while a worker drains iam's list and a reporter ships records (``IAM_PUMP_SOAK_LOOPS``
    loops; ``make soak`` runs many)."""
    loops = int(os.environ.get("IAM_PUMP_SOAK_LOOPS", "3"))
    config = _config(tmp_path, redis_port=own_redis.port)
    env = celery_env(config, **plugin_env)
    client = redis.Redis(port=own_redis.port)
    listed = make_records("list", 20_000)
    for start in range(0, len(listed), 1_000):
        client.rpush(LIST_KEY, *(encode_go_record(r) for r in listed[start : start + 1_000]))
    client.close()
    procs.append(start_worker(config, tmp_path / "w.log", env=env))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path, env=env))
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    analytics.start()
    accepted: set[str] = set()
    for loop in range(loops):
        for record in make_records(f"hit{loop}", 2_000):
            if analytics.record_hit(record):
                accepted.add(record.request)
            time.sleep(0.0005)
        own_redis.kill()
        time.sleep(3)
        own_redis.start()
        print(f"\nloop {loop + 1}: Redis SIGKILLed and restarted")
    stats = analytics.stop(timeout_s=120)
    assert stats.shipped_records == len(accepted), stats
    expected = accepted | {r.request for r in listed}
    lost, duplicated, _ = await_delivery(
        tmp_path / "csv",
        expected,
        timeout_s=WINDOW_S * 4 + 120,
        label=f"Redis SIGKILL x{loops} (AOF always)",
    )
    assert lost == 0
    client = redis.Redis(port=own_redis.port)
    # A write whose release met the dead Redis stays in kombu's unacked hash (the sweep sees it
    # there and leaves it to kombu), so its claim settles once kombu restores it: within the
    # visibility timeout (the pump's 60 s limit + 5 + 2 backoff + 30 s margin) + 10 s.
    settle_s = 60 + 5 + 2 + 30 + 10 + WINDOW_S
    assert wait_until(lambda: client.zcard("iam-pump:ledger") == 0, settle_s)
    resent = _stat(client, "resent_tasks")
    print(f"duplicated rows: {duplicated} (CSV: at-least-once); tasks sent again: {resent}")
    client.close()
