"""A pump that overruns its ``timeout``: the soft limit turns into a retry; a write that ignores it
is killed by the hard limit and its batch is kept as a dead letter, not acknowledged away."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.faults.conftest import fault_config
from tests.faults.helpers import make_records, report, requests_in
from tests.support import Proc, celery_env, start_worker, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("ignore_soft_limit", [False, True])
def test_overrunning_write(
    tmp_path: Path,
    faults_db: redis.Redis,
    procs: list[Proc],
    plugin_env: dict[str, str],
    ignore_soft_limit: bool,
) -> None:
    csv_dir = tmp_path / "csv"
    config = write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            "",
            pumps={
                "slow": {
                    "type": "slowcsv",
                    "timeout": 1,
                    "max-retries": 1,
                    "meta": {
                        "csv_dir": str(csv_dir),
                        "delay_s": 30,
                        "ignore_soft_limit": ignore_soft_limit,
                    },
                }
            },
        ),
    )
    worker = start_worker(config, tmp_path / "w.log", env=celery_env(config, **plugin_env))
    procs.append(worker)
    report(make_records("limit", 10), config)
    assert wait_until(lambda: faults_db.hlen("iam-pump:dead-letters:slow") == 1, 60), (
        worker.output()[-3000:]
    )
    [raw] = faults_db.hvals("iam-pump:dead-letters:slow")
    from app.stores.dead_letters import DeadLetter

    entry = DeadLetter.unpack(raw)
    assert entry.record_count == 10
    if ignore_soft_limit:
        assert "hard time limit" in entry.error
    else:
        assert "longer than the pump timeout" in entry.error
        assert int(faults_db.hget("iam-pump:stats", "retries:slow") or 0) == 1
    assert not requests_in(csv_dir)
