from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta

import msgpack
import pytest

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from app.transports import MemoryTransport
from tests.support import wait_until


def reporter(transport: MemoryTransport, **options: object) -> Analytics:
    return Analytics(AnalyticsOptions(**options), transport=transport)  # type: ignore[arg-type]


def test_batches_are_cut_by_size() -> None:
    transport = MemoryTransport()
    analytics = reporter(transport, records_buffer_size=1000, pool_size=4, flush_interval_ms=60_000)
    analytics.start()
    for i in range(1000):
        assert analytics.record_hit(AnalyticsRecord(username=str(i)))
    assert wait_until(lambda: len(transport.rows()) == 1000, 5)
    assert {len(rows) for _, rows in transport.batches} == {250}
    analytics.stop()


def test_a_partial_batch_ships_after_the_flush_interval() -> None:
    transport = MemoryTransport()
    analytics = reporter(transport, records_buffer_size=1000, flush_interval_ms=100)
    analytics.start()
    analytics.record_hit(AnalyticsRecord(username="one"))
    started = time.monotonic()
    assert wait_until(lambda: transport.rows(), 2, interval_s=0.01)
    assert time.monotonic() - started < 0.5
    analytics.stop()


def test_a_long_flush_interval_still_ships_at_least_once_a_second() -> None:
    transport = MemoryTransport()
    analytics = reporter(transport, records_buffer_size=1000, flush_interval_ms=60_000)
    analytics.start()
    analytics.record_hit(AnalyticsRecord(username="one"))
    assert not wait_until(lambda: transport.rows(), 0.5, interval_s=0.01)
    assert wait_until(lambda: transport.rows(), 1.5, interval_s=0.01)
    analytics.stop()


def test_stop_ships_everything_and_is_safe_twice() -> None:
    transport = MemoryTransport(delay_s=0.01)
    analytics = reporter(
        transport, records_buffer_size=100_000, pool_size=2, flush_interval_ms=60_000
    )
    analytics.start()
    for i in range(30_000):
        analytics.record_hit(AnalyticsRecord(username=str(i)))
    stats = analytics.stop()
    assert stats.shipped_records == 30_000 and stats.lost_at_stop == 0
    assert sorted(int(row[1]) for row in transport.rows()) == list(range(30_000))
    assert analytics.stop().shipped_records == 30_000
    assert transport.closed


def test_stop_without_start_still_ships_what_was_accepted() -> None:
    transport = MemoryTransport()
    analytics = reporter(transport)
    analytics.record_hit(AnalyticsRecord(username="early"))
    assert analytics.stop().shipped_records == 1


def test_after_stop_records_are_refused_and_counted() -> None:
    analytics = reporter(MemoryTransport())
    analytics.start()
    analytics.stop()
    assert analytics.record_hit(AnalyticsRecord()) is False
    assert analytics.stats().dropped_after_stop == 1


def test_record_hit_racing_stop_never_loses_an_accepted_record() -> None:
    transport = MemoryTransport()
    analytics = reporter(transport, records_buffer_size=1_000_000, pool_size=2)
    analytics.start()
    accepted = [0] * 4
    go = threading.Event()

    def hammer(slot: int) -> None:
        go.wait()
        count = 0
        while True:
            if not analytics.record_hit(AnalyticsRecord(username=f"{slot}-{count}")):
                break
            count += 1
        accepted[slot] = count

    threads = [threading.Thread(target=hammer, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    go.set()
    time.sleep(0.3)
    stats = analytics.stop()
    for thread in threads:
        thread.join()
    assert sum(accepted) > 0
    assert stats.shipped_records == sum(accepted) == len(transport.rows())
    assert stats.lost_at_stop == 0


def test_a_full_buffer_drops_and_counts_without_blocking() -> None:
    transport = MemoryTransport()
    transport.down = True
    analytics = reporter(transport, records_buffer_size=100, pool_size=1)
    analytics.start()
    started = time.perf_counter()
    results = [analytics.record_hit(AnalyticsRecord()) for _ in range(10_000)]
    assert time.perf_counter() - started < 1.0
    stats = analytics.stats()
    assert results.count(False) == stats.dropped_buffer_full > 0
    assert stats.accepted + stats.dropped == 10_000
    transport.down = False
    final = analytics.stop()
    assert final.shipped_records == results.count(True)


def test_shipping_retries_until_the_broker_is_back() -> None:
    transport = MemoryTransport()
    transport.down = True
    analytics = reporter(transport, flush_interval_ms=10)
    analytics.start()
    for _ in range(10):
        analytics.record_hit(AnalyticsRecord())
    assert wait_until(lambda: transport.attempts >= 3, 5)
    assert transport.rows() == []
    transport.down = False
    assert wait_until(lambda: len(transport.rows()) == 10, 10)
    assert analytics.stats().ship_failures >= 3
    analytics.stop()


def test_stop_gives_up_after_its_timeout_and_counts_the_loss() -> None:
    transport = MemoryTransport()
    transport.down = True
    analytics = reporter(transport)
    analytics.start()
    for _ in range(5):
        analytics.record_hit(AnalyticsRecord())
    stats = analytics.stop(timeout_s=0.5)
    assert stats.lost_at_stop == 5 and stats.shipped_records == 0


def test_expiry_is_100_years_ahead_unless_a_record_expiration_time_is_set() -> None:
    transport = MemoryTransport()
    analytics = reporter(transport)
    analytics.start()
    analytics.record_hit(AnalyticsRecord(username="a"))
    analytics.stop()
    (row,) = transport.rows()
    expected = datetime.now(UTC) + timedelta(days=365 * 100)
    assert abs((row[7] - expected).total_seconds()) < 10


def test_expiry_and_detail_settings_apply_when_shipping() -> None:
    transport = MemoryTransport()
    analytics = reporter(transport, record_expiration_s=3600, enable_detailed_recording=False)
    analytics.start()
    explicit = datetime(2030, 1, 1, tzinfo=UTC)
    analytics.record_hit(AnalyticsRecord(username="a", policies="p", deciders="d"))
    analytics.record_hit(AnalyticsRecord(username="b", expire_at=explicit))
    analytics.stop()
    first, second = transport.rows()
    assert (first[5], first[6]) == ("", "")
    expected = datetime.now(UTC) + timedelta(hours=1)
    assert abs((first[7] - expected).total_seconds()) < 10
    assert second[7] == explicit


def test_an_unencodable_record_is_refused_and_the_rest_ship() -> None:
    transport = MemoryTransport()
    analytics = reporter(transport)
    analytics.start()
    analytics.record_hit(AnalyticsRecord(username="ok"))
    analytics.record_hit(AnalyticsRecord(username=object()))  # type: ignore[arg-type]
    stats = analytics.stop()
    assert [row[1] for row in transport.rows()] == ["ok"]
    assert stats.rejected == 1


def test_disabled_analytics_accepts_nothing_and_counts_nothing() -> None:
    analytics = reporter(MemoryTransport(), enable=False)
    analytics.start()
    assert analytics.record_hit(AnalyticsRecord()) is False
    assert analytics.stop().dropped == 0


def test_options_come_from_the_yaml_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "c.yaml"
    path.write_text(
        "redis: {host: 10.1.1.1, port: 6390}\n"
        "analytics: {pool-size: 5, records-buffer-size: 5000, flush-interval: 50,"
        " storage-expiration-time: 1h0m0s, record-expiration-time: 2h, transport: redis-list}\n"
    )
    options = AnalyticsOptions.from_yaml(str(path))
    assert options.batch_size == 1000 and options.flush_interval_ms == 50
    assert options.record_expiration_s == 7200 and options.transport == "redis-list"
    assert options.broker_url == options.redis_url == "redis://10.1.1.1:6390/0"


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        AnalyticsOptions(pool_size=0)


def test_refusals_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    transport = MemoryTransport()
    transport.down = True
    analytics = reporter(transport, records_buffer_size=10, pool_size=1)
    with caplog.at_level("WARNING", logger="app.analytics"):
        analytics.start()
        for _ in range(1000):
            analytics.record_hit(AnalyticsRecord())
        assert wait_until(lambda: "buffer full" in caplog.text, 2, interval_s=0.01)
        time.sleep(0.2)
        for _ in range(1000):
            analytics.record_hit(AnalyticsRecord())
        time.sleep(0.2)
    warnings = [r for r in caplog.records if "buffer full" in r.getMessage()]
    assert len(warnings) == 1
    transport.down = False
    analytics.stop()


def test_records_held_never_exceed_the_bound_while_the_broker_is_away() -> None:
    transport = MemoryTransport()
    transport.down = True
    analytics = reporter(transport, records_buffer_size=1000, pool_size=4, flush_interval_ms=10)
    analytics.start()
    accepted = 0
    for _ in range(20):
        accepted += sum(analytics.record_hit(AnalyticsRecord()) for _ in range(500))
        time.sleep(0.02)
        stats = analytics.stats()
        assert stats.buffered + stats.pending <= 1000
    assert accepted <= 1000
    transport.down = False
    assert analytics.stop().shipped_records == accepted


def test_a_batch_retried_through_an_outage_is_packed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import app.transports as transports
    from app.errors import ShipError
    from tests.support import free_port

    packed: list[str] = []
    real = transports.encode_envelope

    def counting(batch_id: str, rows: list[list[object]]) -> bytes:
        packed.append(batch_id)
        return real(batch_id, rows)

    monkeypatch.setattr(transports, "encode_envelope", counting)
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: every attempt fails
    transport = transports.CeleryTransport(closed, key_prefix="iam-pump")
    row = [1, "u", "allow", "", "r", "", "", datetime(2030, 1, 1, tzinfo=UTC)]
    for _ in range(3):
        with pytest.raises(ShipError, match="b1"):
            transport.ship("b1", [row])
    with pytest.raises(ShipError, match="b2"):
        transport.ship("b2", [row])
    transport.close()
    assert packed == ["b1", "b2"]


def test_the_lock_free_counter_loses_no_count_between_threads() -> None:
    from app.analytics_stats import LockFreeCounter

    counter = LockFreeCounter()
    switch_interval_s = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:

        def bump() -> None:
            for _ in range(50_000):
                next(counter)

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for thread in threads:
            thread.start()
        reads = [counter.value() for _ in range(200)]
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval_s)
    assert reads == sorted(reads)
    assert counter.value() == counter.value() == 200_000


class PausingBuffer(deque[AnalyticsRecord]):
    """The reporter's buffer, able to hold one append between record_hit's check and the append.

    That is where a record_hit racing stop() can be when stop() lowers the limit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pause_next_append = False
        self.paused = threading.Event()
        self.release = threading.Event()

    def append(self, record: AnalyticsRecord) -> None:
        if self.pause_next_append:
            self.pause_next_append = False
            self.paused.set()
            self.release.wait(10)
        super().append(record)


def test_a_record_appended_after_the_last_cut_is_counted_lost_not_silently_dropped() -> None:
    transport = MemoryTransport()
    analytics = reporter(transport, flush_interval_ms=10)
    buffer = PausingBuffer()
    analytics._buffer = buffer
    analytics.start()
    for i in range(100):
        assert analytics.record_hit(AnalyticsRecord(username=str(i)))
    buffer.pause_next_append = True
    late: list[bool] = []
    racer = threading.Thread(
        target=lambda: late.append(analytics.record_hit(AnalyticsRecord(username="late")))
    )
    racer.start()
    assert buffer.paused.wait(5)  # the racer passed the limit check; its append waits
    stats = analytics.stop(timeout_s=5)
    assert stats.shipped_records == 100 and stats.lost_at_stop == 0
    buffer.release.set()
    racer.join()
    assert late == [True]
    after = analytics.stats()
    assert after.shipped_records == 100 and after.lost_at_stop == 1 and after.buffered == 0
    assert after.accepted == 101
    assert analytics.stop().lost_at_stop == 1
    assert "late" not in {row[1] for row in transport.rows()}


def race_stop_against_eight_threads() -> None:
    """Eight threads call record_hit as fast as they can while stop() runs; check the counts."""
    transport = MemoryTransport()
    analytics = reporter(transport, records_buffer_size=10_000, pool_size=4, flush_interval_ms=1)
    analytics.start()
    accepted: list[list[str]] = [[] for _ in range(8)]
    go, done = threading.Event(), threading.Event()

    def hammer(slot: int) -> None:
        go.wait()
        for count in itertools.count():
            if done.is_set():
                return
            name = f"{slot}-{count}"
            if analytics.record_hit(AnalyticsRecord(username=name)):
                accepted[slot].append(name)

    threads = [threading.Thread(target=hammer, args=(slot,)) for slot in range(8)]
    for thread in threads:
        thread.start()
    go.set()
    time.sleep(0.05)
    analytics.stop(timeout_s=10)
    done.set()
    for thread in threads:
        thread.join()
    stats = analytics.stats()
    everyone = {name for names in accepted for name in names}
    shipped = [str(row[1]) for row in transport.rows()]
    assert len(shipped) == len(set(shipped)) == stats.shipped_records
    assert set(shipped) <= everyone
    assert len(everyone) == stats.shipped_records + stats.lost_at_stop + stats.rejected
    assert stats.accepted == len(everyone) and stats.buffered == stats.pending == 0


def test_every_record_accepted_while_stop_runs_is_shipped_or_counted_lost() -> None:
    switch_interval_s = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # many thread switches: record_hit is often cut mid-way
    try:
        for _ in range(10):
            race_stop_against_eight_threads()
    finally:
        sys.setswitchinterval(switch_interval_s)


def test_a_batch_packed_in_steps_is_the_envelope_byte_for_byte() -> None:
    from app.analytics import PACK_STEP, _envelope
    from app.codec import encode_envelope

    for count in (0, 1, 15, 16, 99, 100, 101, 770, 70_000):
        rows = [
            [i, "u", "allow", "c", "r", "p", "d", datetime(2030, 1, 1, tzinfo=UTC)]
            for i in range(count)
        ]
        packer = msgpack.Packer(datetime=True)
        parts = [
            b"".join(map(packer.pack, rows[start : start + PACK_STEP]))
            for start in range(0, count, PACK_STEP)
        ]
        assert _envelope("a" * 32, count, parts) == encode_envelope("a" * 32, rows), count
