"""The purge of iam's Redis list killed at any point, or run twice at once: nothing lost, and no
record delivered twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from app.codec import encode_go_record
from tests.faults.conftest import FAULTS_REDIS_DB, fault_config
from tests.faults.helpers import await_delivery, make_records
from tests.faults.purge_crasher import CRASH_EXIT_STATUS
from tests.support import REPO, Proc, celery_env, start_beat, start_worker, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIST_KEY = "analytics-iam-system-analytics"


def push(client: redis.Redis, tag: str, count: int) -> set[str]:
    records = make_records(tag, count)
    for start in range(0, count, 1000):
        client.rpush(LIST_KEY, *(encode_go_record(r) for r in records[start : start + 1000]))
    return {r.request for r in records}


def crash_config(tmp_path: Path, broker: str) -> Path:
    """The crash tests' config: the locks a killed purge leaves expire after 3 s; 500-record
    chunks."""
    return write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            broker,
            delivery={"purge-lock-ttl-s": 3, "iam-lock-ttl-s": 3, "purge-chunk-size": 500},
        ),
    )


def crash_purge(config: Path, point: str) -> None:
    """One purge in its own process, killed at ``point`` (see tests/faults/purge_crasher.py)."""
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.faults.purge_crasher", point],
        env=celery_env(config),
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert crashed.returncode == CRASH_EXIT_STATUS, crashed.stderr[-2000:]


@pytest.mark.parametrize("point", ["before-enqueue", "after-enqueue"])
def test_purge_killed_loses_nothing_and_delivers_once(
    tmp_path: Path, broker: str, faults_db: redis.Redis, procs: list[Proc], point: str
) -> None:
    config = crash_config(tmp_path, broker)
    expected = push(faults_db, "purge", 3000)
    crash_purge(config, point)
    assert faults_db.llen(LIST_KEY) == 3000, "a crashed purge must not have removed anything"
    procs.append(start_worker(config, tmp_path / "w.log"))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))
    lost, duplicated, _ = await_delivery(
        tmp_path / "csv",
        expected,
        timeout_s=90,
        label=f"purge killed {point} ({'amqp' if broker else 'redis'})",
    )
    assert lost == 0 and duplicated == 0
    assert faults_db.llen(LIST_KEY) == 0


def test_two_beats_and_two_workers_purge_without_double_delivery(
    tmp_path: Path, broker: str, faults_db: redis.Redis, procs: list[Proc]
) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            broker,
            delivery={"purge-chunk-size": 200},
        ),
    )
    expected = push(faults_db, "twice", 20_000)
    for name in ("a", "b"):
        procs.append(start_worker(config, tmp_path / f"w-{name}.log", name=name))
        beat_dir = tmp_path / f"beat-{name}"
        beat_dir.mkdir()
        procs.append(start_beat(config, tmp_path / f"beat-{name}.log", beat_dir))
    lost, duplicated, _ = await_delivery(
        tmp_path / "csv",
        expected,
        timeout_s=120,
        label=f"two beats, two workers ({'amqp' if broker else 'redis'})",
    )
    assert lost == 0 and duplicated == 0
    assert int(faults_db.get("iam-pump:purge:offset") or 0) == 20_000
    assert faults_db.connection_pool.connection_kwargs["db"] == FAULTS_REDIS_DB


def test_a_chunk_that_grew_after_a_crash_is_a_new_batch_and_loses_nothing(
    tmp_path: Path, broker: str, faults_db: redis.Redis, procs: list[Proc]
) -> None:
    # The first purge reads 300 records (a chunk holds 500), enqueues them and dies before the
    # trim; iam goes on pushing. The next purge reads 500 at the same offset: not the batch
    # already delivered (whose id it would share without the chunk's digest), so the 200 new
    # records are delivered too, and only the first 300 twice.
    config = crash_config(tmp_path, broker)
    first = push(faults_db, "before", 300)
    crash_purge(config, "after-enqueue")
    later = push(faults_db, "after", 300)
    procs.append(start_worker(config, tmp_path / "w.log"))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))
    lost, duplicated, _ = await_delivery(
        tmp_path / "csv",
        first | later,
        timeout_s=90,
        label=f"chunk grew after a purge crash ({'amqp' if broker else 'redis'})",
    )
    assert lost == 0
    assert duplicated <= len(first)
