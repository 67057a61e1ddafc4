"""Redis full (``maxmemory`` reached under ``noeviction``, on a redis-server of the test's own):
every write to it fails with OOM. The reporter holds its records and retries (``record_hit``
never blocks), the purge takes nothing off iam's list, the worker's tasks are put back or stay
unacknowledged in kombu's ``unacked`` hash; once memory is freed every record is delivered."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.analytics import Analytics, AnalyticsOptions
from tests.conftest import require
from tests.faults.helpers import await_delivery, make_records, requests_in
from tests.support import (
    REPO,
    KeepFull,
    Proc,
    RedisServer,
    base_config,
    celery_env,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAXMEMORY = 32 * 1024 * 1024


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    require(shutil.which("redis-server") is not None, "redis-server")
    server = RedisServer(
        tmp_path / "redis", maxmemory=str(MAXMEMORY), maxmemory_policy="noeviction"
    )
    yield server
    server.stop()


def oom(client: redis.Redis) -> bool:
    try:
        client.set("probe", b"x" * 64)
    except redis.exceptions.OutOfMemoryError:
        return True
    client.delete("probe")
    return False


def run_purge(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One purge run (``tasks.purge.drain``) in a process of its own, as a worker runs it."""
    return subprocess.run(
        [sys.executable, "-c", "from tasks.purge import drain; print(drain())"],
        env=celery_env(config, **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


#: What the worker log says when it takes each path of a full Redis (counted and printed).
_WORKER_PATHS = {
    "put back": "batch put back",
    "left unacked": "it stays unacknowledged in Redis",
    "fetched and held": "holding it and retrying",
    "counters dropped": "not added, Redis is full",
}


def test_redis_full_holds_everything_and_delivers_it_once_memory_is_freed(
    tmp_path: Path, full_redis: RedisServer, procs: list[Proc], plugin_env: dict[str, str]
) -> None:
    csv_dir = tmp_path / "csv"
    config_data: dict[str, Any] = base_config(
        tmp_path,
        redis_port=full_redis.port,
        db=0,
        pumps={"csv": {"type": "slowcsv", "meta": {"csv_dir": str(csv_dir), "delay_s": 1.0}}},
        analytics={"records-buffer-size": 8000, "pool-size": 8},
        delivery={
            "retry-backoff-base-s": 0.2,
            "retry-backoff-max-s": 1,
            "purge-chunk-size": 500,
            "visibility-timeout-s": 10,
        },
    )
    config = write_config(tmp_path / "c.yaml", config_data)
    options = AnalyticsOptions.from_yaml(str(config))
    client = full_redis.client()

    # iam's list holds records for the purge; the worker has batches in hand when Redis fills.
    listed = make_records("list", 1500)
    with Analytics(dataclasses.replace(options, transport="redis-list")) as lister:
        for record in listed:
            assert lister.record_hit(record)
    assert client.llen(options.analytics_key) == len(listed)
    # One process, slow writes: ingest tasks are still queued behind writes when Redis fills.
    worker = start_worker(
        config, tmp_path / "w.log", concurrency=1, env=celery_env(config, **plugin_env)
    )
    procs.append(worker)
    before = make_records("before", 8000)
    reporter = Analytics(options)
    reporter.start()
    for record in before:
        while not reporter.record_hit(record):
            time.sleep(0.001)
    assert wait_until(lambda: reporter.stats().shipped_records == len(before), 30)
    assert wait_until(lambda: csv_dir.exists() and len(requests_in(csv_dir)) > 0, 30)

    keep_full = KeepFull(full_redis)
    assert oom(client)
    used = client.info("memory")["used_memory"]
    print(f"\n[redis full] {keep_full.keys} ballast keys; used {used}")

    # The purge takes nothing off the list while Redis is full.
    purge = run_purge(config, plugin_env)
    print(f"[redis full] purge: exit {purge.returncode}, {purge.stderr.strip().splitlines()[-1:]}")
    assert client.llen(options.analytics_key) == len(listed)

    # The reporter accepts without blocking and holds what it cannot ship.
    during = make_records("during", 3000)
    costs_s = []
    for record in during:
        started = time.perf_counter()
        assert reporter.record_hit(record)
        costs_s.append(time.perf_counter() - started)
    time.sleep(2)
    stats = reporter.stats()
    print(f"[redis full] record_hit max {max(costs_s) * 1e6:.0f} us; {stats}")
    assert max(costs_s) < 0.05
    assert stats.shipped_records == len(before) and stats.ship_failures > 0
    assert stats.dropped == 0
    written_while_full = len(requests_in(csv_dir))
    time.sleep(2)
    print(f"[redis full] rows while full: {written_while_full} -> {len(requests_in(csv_dir))}")
    assert oom(client)

    keep_full.stop()
    client.config_set("maxmemory", 0)
    stats = reporter.stop(timeout_s=60)
    assert stats.shipped_records == len(before) + len(during), stats
    purge = run_purge(config, plugin_env)
    assert purge.returncode == 0, purge.stderr
    expected = {r.request for r in listed + before + during}
    lost, _duplicated, _ = await_delivery(csv_dir, expected, timeout_s=60, label="redis full")
    log = worker.output()
    seen = {what: log.count(text) for what, text in _WORKER_PATHS.items()}
    print(f"[redis full] worker paths taken while full: {seen}")
    assert worker.popen.poll() is None, "the worker died while Redis was full"
    assert lost == 0
