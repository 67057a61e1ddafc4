"""A real worker takes ``IAM_PUMP_`` environment overrides over its config file."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from tests.support import (
    Proc,
    base_config,
    celery_env,
    read_csv_rows,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

RECORDS = 500


def test_a_worker_writes_where_an_environment_variable_says(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    config = write_config(tmp_path / "c.yaml", base_config(tmp_path))  # csv_dir: tmp_path/csv
    env_dir = tmp_path / "from-env"
    env = celery_env(config, IAM_PUMP_PUMPS_CSV_META_CSV_DIR=str(env_dir))
    procs.append(start_worker(config, tmp_path / "worker.log", env=env))

    # The reporter reads the file alone: the override is the worker's.
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    analytics.start()
    expire_at = datetime(2030, 1, 1, tzinfo=UTC)
    for index in range(RECORDS):
        record = AnalyticsRecord(
            timestamp=1_700_000_000 + index,
            username="env",
            effect="allow",
            conclusion="",
            request=f"env-{index}",
            policies="",
            deciders="",
            expire_at=expire_at,
        )
        while not analytics.record_hit(record):
            time.sleep(0.001)
    assert analytics.stop().shipped_records == RECORDS

    assert wait_until(lambda: len(read_csv_rows(env_dir)) >= RECORDS, 60), procs[0].output()[-3000:]
    time.sleep(0.5)
    requests = [row["Request"] for row in read_csv_rows(env_dir)]
    lost = {f"env-{index}" for index in range(RECORDS)} - set(requests)
    duplicated = len(requests) - len(set(requests))
    print(f"\nrecords: {RECORDS}, lost: {len(lost)}, duplicated: {duplicated}")
    assert not lost and not duplicated
    assert read_csv_rows(tmp_path / "csv") == []  # the file's directory got nothing
