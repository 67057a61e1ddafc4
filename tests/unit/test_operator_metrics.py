"""The metrics operators read: write durations, lag of the Redis list and of each queue, the
reporter's collector, the consumers census, and the command line's progress bar."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord, ReporterCollector
from app.codec import encode_go_record
from app.config import parse_settings
from app.health import PumpMetrics
from app.messages import SENT_AT_HEADER, BatchRef, Sender, waiting_since
from app.progress import progress
from app.queue_consumers import QueueConsumers
from app.stores.stats import WRITE_DURATION_BUCKETS_S, Stats, write_duration
from app.transports import MemoryTransport
from tests.conftest import require
from tests.support import REDIS_HOST, REDIS_PORT, TEST_REDIS_DB, base_config, free_port, port_open


@pytest.fixture
def db() -> Iterator[redis.Redis]:
    require(port_open(REDIS_HOST, REDIS_PORT), f"Redis on {REDIS_HOST}:{REDIS_PORT}")
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=TEST_REDIS_DB)
    client.flushdb()
    yield client
    client.close()


def scrape(collector: object) -> str:
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def sample(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in:\n{text}")


def test_write_durations_make_a_cumulative_histogram_per_pump(
    tmp_path: Path, db: redis.Redis
) -> None:
    settings = parse_settings(json.dumps(base_config(tmp_path)))
    stats = Stats(db, settings)
    for seconds in (0.001, 0.02, 0.02, 3.0, 500.0):
        stats.add(write_duration("csv", seconds))
    stats.add({**write_duration("mongo", 0.2), "written_records:mongo": 7})
    histograms = stats.read().write_durations()
    csv = histograms["csv"]
    assert len(csv.buckets) == len(WRITE_DURATION_BUCKETS_S) + 1
    assert dict(csv.buckets)[0.005] == 1
    assert dict(csv.buckets)[0.025] == 3
    assert dict(csv.buckets)[5.0] == 4
    assert csv.buckets[-1] == (float("inf"), 5) and csv.count == 5
    assert csv.sum_s == pytest.approx(503.041)
    assert histograms["mongo"].count == 1
    text = scrape(PumpMetrics(settings, db))
    assert sample(text, 'iam_pump_write_duration_seconds_bucket{le="0.025",pump="csv"}') == 3
    assert sample(text, 'iam_pump_write_duration_seconds_bucket{le="+Inf",pump="csv"}') == 5
    assert sample(text, 'iam_pump_write_duration_seconds_count{pump="mongo"}') == 1
    assert sample(text, 'iam_pump_written_records_total{pump="mongo"}') == 7


def test_the_redis_list_age_is_the_first_records_timestamp_read_without_taking_it(
    tmp_path: Path, db: redis.Redis
) -> None:
    settings = parse_settings(json.dumps(base_config(tmp_path)))
    metrics = PumpMetrics(settings, db)
    assert sample(scrape(metrics), "iam_pump_redis_list_oldest_age_seconds") == 0
    old = AnalyticsRecord(username="old", timestamp=int(time.time()) - 120)
    new = AnalyticsRecord(username="new", timestamp=int(time.time()))
    db.rpush(settings.analytics_key, encode_go_record(old), encode_go_record(new))
    age = sample(scrape(metrics), "iam_pump_redis_list_oldest_age_seconds")
    assert 119 <= age <= 130
    assert db.llen(settings.analytics_key) == 2
    # An undecodable first record has no age to tell: no sample rather than a wrong one.
    db.lpush(settings.analytics_key, b"\xc1 not msgpack")
    assert "iam_pump_redis_list_oldest_age_seconds " not in scrape(metrics)


def test_a_queues_age_is_how_long_its_oldest_task_has_been_due(
    tmp_path: Path, db: redis.Redis
) -> None:
    settings = parse_settings(json.dumps(base_config(tmp_path)))
    celery = Celery("probe", broker=settings.redis.url, set_as_current=False)
    celery.conf.task_serializer = "msgpack"
    sender = Sender(celery, pumps=settings.pumps)
    try:
        sender.send_write("csv", BatchRef(inline=b"first"))
        time.sleep(1.2)
        sender.send_write("csv", BatchRef(inline=b"second"))
        oldest = db.lindex("pump.csv", -1)
        assert oldest is not None and SENT_AT_HEADER in json.loads(oldest)["headers"]
        text = scrape(PumpMetrics(settings, db))
        assert 1.1 <= sample(text, 'iam_pump_queue_oldest_age_seconds{queue="pump.csv"}') < 10
        assert sample(text, 'iam_pump_queue_oldest_age_seconds{queue="ingest"}') == 0
    finally:
        celery.close()


def test_waiting_since_prefers_the_eta_then_the_sent_header() -> None:
    eta = datetime.now(UTC) - timedelta(seconds=30)
    with_eta = {"headers": {"eta": eta.isoformat(), SENT_AT_HEADER: 1.0}}
    assert waiting_since(json.dumps(with_eta)) == pytest.approx(eta.timestamp())
    sent = {"headers": {"eta": None, SENT_AT_HEADER: 1234.5}}
    assert waiting_since(json.dumps(sent)) == 1234.5
    assert waiting_since(json.dumps({"headers": {}})) is None
    assert waiting_since(b"not json") is None
    assert waiting_since(json.dumps({"headers": {SENT_AT_HEADER: True}})) is None


def test_the_reporter_collector_goes_into_the_hosts_own_registry() -> None:
    transport = MemoryTransport()
    transport.down = True  # nothing ships: what is accepted stays in the buffer
    analytics = Analytics(
        AnalyticsOptions(records_buffer_size=10, pool_size=1, flush_interval_ms=60_000),
        transport=transport,
    )
    registry = CollectorRegistry()
    registry.register(ReporterCollector(analytics))
    analytics.start()
    try:
        accepted = sum(analytics.record_hit(AnalyticsRecord(username=str(i))) for i in range(15))
        text = generate_latest(registry).decode()
    finally:
        transport.down = False
        analytics.stop(timeout_s=5)
    assert accepted == 10
    assert sample(text, "iam_pump_reporter_records_accepted_total") == 10
    assert sample(text, "iam_pump_reporter_records_dropped_total") == 5
    assert sample(text, "iam_pump_reporter_records_shipped_total") == 0
    assert sample(text, "iam_pump_reporter_buffer_fill_ratio") == 1.0
    after = generate_latest(registry).decode()
    assert sample(after, "iam_pump_reporter_records_shipped_total") == 10
    assert sample(after, "iam_pump_reporter_buffer_fill_ratio") == 0.0


def test_the_census_says_the_broker_did_not_answer_quickly_and_caches_nothing_stale() -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    celery = Celery("probe", broker=down, set_as_current=False)
    consumers = QueueConsumers(celery, ["ingest", "pump.csv"], broker_url=down, cache_s=0.0)
    started = time.monotonic()
    census = consumers.census()
    assert time.monotonic() - started < 10
    assert census.error is not None and "did not answer" in census.error
    assert census.without_consumer() == []
    consumers.close()
    celery.close()


def test_the_census_counts_nothing_for_queues_nobody_consumes(db: redis.Redis) -> None:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{TEST_REDIS_DB}"
    # The app only lends its serializer: the question goes to broker_url, whatever the app's
    # own broker (a process configured from another file).
    celery = Celery("probe", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    consumers = QueueConsumers(celery, ["ingest", "pump.csv"], broker_url=url)
    census = consumers.census()
    assert census.error is None, census.error
    assert census.consumers == {"ingest": 0, "pump.csv": 0}
    assert census.without_consumer() == ["ingest", "pump.csv"]
    assert consumers.census() is census  # cached
    consumers.close()
    celery.close()


def test_the_progress_bar_is_quiet_off_a_terminal() -> None:
    out = io.StringIO()
    with progress("replaying", 3, out=out) as steps:
        for index in range(3):
            steps.advance()
            steps.say(f"entry {index}")
    assert out.getvalue() == "entry 0\nentry 1\nentry 2\n"


def test_the_progress_bar_draws_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with progress("replaying", 2, out=out) as steps:
        steps.advance(2)
        steps.say("entry 0")
    assert "entry 0" in out.getvalue()
    assert "2/2" in out.getvalue() or "replaying" in out.getvalue()
