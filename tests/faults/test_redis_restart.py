"""Redis restarted (a server of the test's own, never the shared one) while the reporter and
the workers run: ``record_hit`` stays non-blocking, the reporter holds what it can and ships after
Redis returns, drops beyond its bound are counted, and every accepted record is delivered."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from app.analytics import Analytics, AnalyticsOptions
from tests.faults.conftest import OwnRedis, fault_config
from tests.faults.helpers import await_delivery, make_records
from tests.support import Proc, start_beat, start_worker, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("buffer_size", [200_000, 2_000])
def test_redis_killed_and_restarted_loses_no_accepted_record(
    tmp_path: Path, broker: str, own_redis: OwnRedis, procs: list[Proc], buffer_size: int
) -> None:
    config_data = fault_config(
        tmp_path,
        broker,
        redis_port=own_redis.port,
        db=0,
        analytics={"records-buffer-size": buffer_size, "pool-size": 4},
    )
    config = write_config(tmp_path / "c.yaml", config_data)
    procs.append(start_worker(config, tmp_path / "w.log"))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    analytics.start()
    records = make_records(f"restart{buffer_size}", 30_000)
    accepted: set[str] = set()
    costs_s: list[float] = []
    killed_at = restarted_at = None
    started = time.monotonic()
    for index, record in enumerate(records):
        before = time.perf_counter()
        ok = analytics.record_hit(record)
        costs_s.append(time.perf_counter() - before)
        if ok:
            accepted.add(record.request)
        if index == 5_000:
            own_redis.kill()
            killed_at = time.monotonic()
        if killed_at and not restarted_at and time.monotonic() - killed_at > 4:
            own_redis.start()
            restarted_at = time.monotonic()
        time.sleep(0.0002)  # ~ a few thousand records a second
    if not restarted_at:
        time.sleep(max(0.0, 4 - (time.monotonic() - (killed_at or started))))
        own_redis.start()
    stats = analytics.stop(timeout_s=120)
    costs_s.sort()
    p99_us = costs_s[int(len(costs_s) * 0.99)] * 1e6
    print(
        f"\nrecord_hit during the outage: median {statistics.median(costs_s) * 1e6:.1f} us, "
        f"p99 {p99_us:.1f} us, max {costs_s[-1] * 1e6:.0f} us; {stats}"
    )
    assert costs_s[-1] < 0.05, "record_hit blocked"
    assert stats.dropped_buffer_full == len(records) - len(accepted)
    assert stats.shipped_records == len(accepted) and stats.lost_at_stop == 0
    if buffer_size < 10_000 and not broker:
        # The reporter ships to Redis here, so its small buffer overflows during the outage.
        assert stats.dropped_buffer_full > 0, "the small buffer should have overflowed"
    lost, _duplicated, _ = await_delivery(
        tmp_path / "csv",
        accepted,
        timeout_s=150,
        label=f"Redis restart, buffer {buffer_size} ({'amqp' if broker else 'redis'})",
    )
    assert lost == 0
