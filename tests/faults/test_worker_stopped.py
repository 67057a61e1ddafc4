"""Worker stopped with SIGTERM, and SIGTERM then SIGKILL after a grace period (an orchestrator).

Unfinished tasks come back at once: the worker's soft shutdown lets running writes go on for
``delivery.soft-shutdown-timeout-s``, then requeues what is left before it exits, well inside the
grace period; nothing waits for the visibility timeout.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.faults.conftest import slow_csv_config
from tests.faults.helpers import await_delivery, make_records, report, requests_in
from tests.support import Proc, celery_env, start_worker, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GRACE_PERIOD_S = 8.0
SOFT_SHUTDOWN_S = 2.0


def test_sigterm_then_sigkill_after_grace_requeues_at_once(
    tmp_path: Path,
    broker: str,
    faults_db: redis.Redis,
    procs: list[Proc],
    plugin_env: dict[str, str],
) -> None:
    config, csv_dir = slow_csv_config(
        tmp_path,
        broker,
        delay_s=4.0,
        delivery={
            "retry-backoff-base-s": 0.2,
            "retry-backoff-max-s": 2,
            "soft-shutdown-timeout-s": SOFT_SHUTDOWN_S,
        },
    )
    env = celery_env(config, **plugin_env)
    worker = start_worker(config, tmp_path / "w1.log", env=env)
    procs.append(worker)
    records = make_records("term", 4000)
    report(records, config)
    time.sleep(1.0)  # two 4 s writes are running now
    assert not requests_in(csv_dir)
    worker.send(signal.SIGTERM)
    try:
        worker.popen.wait(GRACE_PERIOD_S)
        exited_in_grace = True
    except subprocess.TimeoutExpired:
        worker.kill_group(signal.SIGKILL)
        exited_in_grace = False
    assert exited_in_grace, worker.output()[-3000:]
    if not broker:
        assert faults_db.hlen("unacked") == 0, "unfinished tasks were left to the timeout"
    replacement = start_worker(config, tmp_path / "w2.log", name="w2", env=env)
    procs.append(replacement)
    lost, _duplicated, elapsed = await_delivery(
        csv_dir,
        {r.request for r in records},
        timeout_s=60,
        label=f"SIGTERM + SIGKILL after {GRACE_PERIOD_S:.0f}s ({'amqp' if broker else 'redis'})",
    )
    assert lost == 0
    assert elapsed < 30, "requeued work should come back at once, not after a timeout"


def test_plain_sigterm_finishes_running_writes_and_requeues_the_rest(
    tmp_path: Path,
    broker: str,
    faults_db: redis.Redis,
    procs: list[Proc],
    plugin_env: dict[str, str],
) -> None:
    config, csv_dir = slow_csv_config(
        tmp_path,
        broker,
        delay_s=0.5,
        delivery={"soft-shutdown-timeout-s": 3.0},
    )
    env = celery_env(config, **plugin_env)
    worker = start_worker(config, tmp_path / "w1.log", env=env)
    procs.append(worker)
    records = make_records("plain", 10_000)
    report(records, config)
    assert wait_until(lambda: requests_in(csv_dir), 30)
    worker.send(signal.SIGTERM)
    try:
        exit_code = worker.popen.wait(45)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker did not exit 45 s after SIGTERM:\n" + worker.output()[-6000:])
    assert exit_code == 0, worker.output()[-3000:]
    written = len(requests_in(csv_dir))
    assert 0 < written < len(records)
    procs.append(start_worker(config, tmp_path / "w2.log", name="w2", env=env))
    lost, _, elapsed = await_delivery(
        csv_dir,
        {r.request for r in records},
        timeout_s=60,
        label=f"SIGTERM ({'amqp' if broker else 'redis'})",
    )
    assert lost == 0 and elapsed < 30
