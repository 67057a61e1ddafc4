"""Worker killed with SIGKILL in the middle of a batch: everything it held is delivered again."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from tests.faults.conftest import fault_config, slow_csv_config
from tests.faults.helpers import await_delivery, make_records, report, requests_in
from tests.support import Proc, celery_env, start_beat, start_worker, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The promise: with the default config, a killed worker's batches are back within this.
REDELIVERY_PROMISE_S = 120


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def test_pool_process_killed_mid_write_is_requeued_at_once(
    tmp_path: Path,
    broker: str,
    faults_db: redis.Redis,
    procs: list[Proc],
    plugin_env: dict[str, str],
) -> None:
    config, csv_dir = slow_csv_config(tmp_path, broker, delay_s=1.0)
    worker = start_worker(config, tmp_path / "w.log", env=celery_env(config, **plugin_env))
    procs.append(worker)
    records = make_records("child", 6000)
    report(records, config)
    time.sleep(1.5)  # both pool processes are inside a 1 s write now or soon
    killed = children(worker.pid)
    for pid in killed:
        Proc.kill_pid(pid)
    lost, _duplicated, elapsed = await_delivery(
        csv_dir, {r.request for r in records}, timeout_s=60, label="pool process SIGKILL"
    )
    assert lost == 0
    assert "WorkerLostError" in worker.output() or "exited with 'signal 9" in worker.output()
    assert elapsed < 60


@pytest.mark.parametrize("role", ["ingest", "pump"])
def test_whole_worker_killed_is_redelivered_within_two_minutes(
    tmp_path: Path,
    broker: str,
    faults_db: redis.Redis,
    procs: list[Proc],
    plugin_env: dict[str, str],
    role: str,
) -> None:
    """Separate ingest and pump workers; SIGKILL the whole process group of one of them.

    Beat runs, as in any deployment: with the Redis broker a worker killed between kombu's BRPOP
    of a task and its record of it in ``unacked`` takes that message with it, and the ledger
    sweep sends it again (here after a 15 s window instead of the default 120 s, so that it
    lands inside the promise; one run in CI lost a 50-record batch this way without beat).
    """
    csv_dir = tmp_path / "csv"
    delay_s = 1.0 if role == "pump" else 0.0
    config = write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            broker,
            pumps={
                "csv": {"type": "slowcsv", "meta": {"csv_dir": str(csv_dir), "delay_s": delay_s}}
            },
            analytics={"records-buffer-size": 200, "pool-size": 4},
            delivery={
                "retry-backoff-base-s": 0.2,
                "retry-backoff-max-s": 2,
                "redelivery-window-s": 15,
                "sweep-interval-s": 5,
            },
        ),
    )
    env = celery_env(config, **plugin_env)
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path, env=env))
    # 400 small batches for the ingest role (it is fast); 80 one-second writes for the pump role.
    records = make_records(role, 20_000 if role == "ingest" else 4_000)
    report(records, config)
    pump = start_worker(config, tmp_path / "pump.log", queues="pump.csv", name="pump", env=env)
    ingest = start_worker(
        config, tmp_path / "ingest.log", queues="ingest,purge", name="ingest", env=env
    )
    procs += [ingest, pump]
    victim = ingest if role == "ingest" else pump
    assert wait_until(lambda: requests_in(csv_dir), 30)
    if not broker:
        # Kill while tasks are held, not in a gap between two fetches (the fault to inject).
        assert wait_until(lambda: faults_db.hlen("unacked") > 0, 30, interval_s=0.01)
    victim.kill_group(signal.SIGKILL)
    victim.popen.wait(10)
    if not broker:
        held = faults_db.hlen("unacked")
        print(f"\n{held} task(s) held by the killed {role} worker")
        assert held > 0, "the killed worker held no task: no fault injected"
    replacement = start_worker(
        config,
        tmp_path / f"{role}2.log",
        queues="ingest,purge" if role == "ingest" else "pump.csv",
        name=f"{role}2",
        env=env,
    )
    procs.append(replacement)
    lost, _duplicated, elapsed = await_delivery(
        csv_dir,
        {r.request for r in records},
        timeout_s=REDELIVERY_PROMISE_S + 30,
        label=f"{role} worker SIGKILL ({'amqp' if broker else 'redis'})",
    )
    assert lost == 0
    assert elapsed < REDELIVERY_PROMISE_S
