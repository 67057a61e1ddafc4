"""End to end into a real Kafka broker through real Celery workers, counted by record id.

A worker SIGKILLed mid-run, and the broker stopped for 20 s and started again: every record
reaches the topic; copies are allowed (Kafka is at-least-once here) and all carry their
record's id as key, so a consumer keeping the first message per key sees each record once.
"""

from __future__ import annotations

import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import redis

from app.analytics import AnalyticsRecord
from tests.faults.conftest import fault_config
from tests.faults.helpers import (
    make_records,
    report,
    start_sweeping_beat,
    with_quick_sweep,
)
from tests.servers_kafka import BROKER_VERSION, KafkaServer, read_topic, topic_size
from tests.support import Proc, start_worker, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: A killed worker's tasks come back within the visibility timeout (derived from the pump's
#: timeout: 10 + 5 + 2 + 30 s here) plus kombu's restore interval; with room for a busy machine.
REDELIVERY_TIMEOUT_S = 180
BROKER_DOWN_S = 20


def kafka_config(
    tmp_path: Path,
    broker_url: str,
    server: KafkaServer,
    topic: str,
    *,
    timeout_s: int,
    buffer_records: int = 400,
) -> Path:
    pump = {
        "type": "kafka",
        "timeout": timeout_s,
        "meta": {"broker": [server.bootstrap], "topic": topic, "broker_version": BROKER_VERSION},
    }
    config = with_quick_sweep(
        fault_config(
            tmp_path,
            broker_url,
            pumps={"kafka": pump},
            analytics={"records-buffer-size": buffer_records, "pool-size": 4},
        )
    )
    return write_config(tmp_path / "c.yaml", config)


def count_by_id(
    server: KafkaServer, topic: str, records: list[AnalyticsRecord], label: str
) -> tuple[int, int]:
    """Read the topic; print and return (lost, duplicated). Every request must have one id."""
    messages = read_topic(server.bootstrap, topic, timeout_s=60)
    ids_by_request: dict[str, set[str]] = defaultdict(set)
    for key, value in messages:
        ids_by_request[value["request"]].add(key)
    per_id = Counter(key for key, _ in messages)
    expected = {record.request for record in records}
    lost = len(expected - set(ids_by_request))
    duplicated = sum(n - 1 for n in per_id.values())
    print(
        f"\n[{label}] records: {len(records)}, messages: {len(messages)}, lost: {lost}, "
        f"duplicated (same id again): {duplicated}"
    )
    assert all(len(ids) == 1 and "" not in ids for ids in ids_by_request.values()), (
        "a record reached Kafka under two ids or none"
    )
    assert len(per_id) == len(ids_by_request)
    return lost, duplicated


def test_worker_sigkilled_mid_run_loses_nothing(
    tmp_path: Path,
    broker: str,
    faults_db: redis.Redis,
    procs: list[Proc],
    kafka_server: KafkaServer,
) -> None:
    topic = kafka_server.new_topic("killed")
    # Batches of 50: hundreds of tasks, so the kill lands while most are still to come.
    config = kafka_config(tmp_path, broker, kafka_server, topic, timeout_s=10, buffer_records=200)
    start_sweeping_beat(config, tmp_path, procs)
    records = make_records("kafka-kill", 20_000)
    report(records, config)
    worker = start_worker(config, tmp_path / "w1.log", name="w1")
    procs.append(worker)
    assert wait_until(lambda: topic_size(kafka_server.bootstrap, topic) > 0, 60)
    if not broker:
        # Kill while tasks are held, not in a gap between two fetches.
        assert wait_until(lambda: faults_db.hlen("unacked") > 0, 30, interval_s=0.01)
    worker.kill_group(signal.SIGKILL)
    worker.popen.wait(10)
    at_kill = topic_size(kafka_server.bootstrap, topic)
    assert at_kill < len(records), "everything was written before the kill: no fault injected"
    procs.append(start_worker(config, tmp_path / "w2.log", name="w2"))
    assert wait_until(
        lambda: topic_size(kafka_server.bootstrap, topic) >= len(records),
        REDELIVERY_TIMEOUT_S,
        interval_s=1.0,
    ), f"{topic_size(kafka_server.bootstrap, topic)} of {len(records)} messages"
    time.sleep(3)  # anything written twice would arrive now
    lost, _duplicated = count_by_id(
        kafka_server, topic, records, f"kafka, worker SIGKILL at {at_kill} messages"
    )
    assert lost == 0
    assert not faults_db.keys("*dead-letters*")


def test_broker_stopped_for_a_while_and_restarted_loses_nothing(
    tmp_path: Path,
    broker: str,
    faults_db: redis.Redis,
    procs: list[Proc],
    kafka_server: KafkaServer,
) -> None:
    """Writes fail as temporary errors while the broker is away and are retried with backoff
    (8 retries of up to 5 s each outlast 20 s down plus the restart); none is dead-lettered."""
    topic = kafka_server.new_topic("restart")
    config = kafka_config(tmp_path, broker, kafka_server, topic, timeout_s=5)
    procs.append(start_worker(config, tmp_path / "w.log"))
    first = make_records("kafka-before", 2000)
    during = make_records("kafka-during", 2000)
    report(first, config)
    assert wait_until(lambda: topic_size(kafka_server.bootstrap, topic) > 0, 60)
    kafka_server.stop_broker()
    stopped = time.monotonic()
    try:
        report(during, config)
        time.sleep(max(0.0, BROKER_DOWN_S - (time.monotonic() - stopped)))
    finally:
        kafka_server.start_broker()
    down_s = time.monotonic() - stopped
    records = first + during
    assert wait_until(
        lambda: topic_size(kafka_server.bootstrap, topic) >= len(records), 120, interval_s=1.0
    ), f"{topic_size(kafka_server.bootstrap, topic)} of {len(records)} messages"
    time.sleep(3)
    lost, _duplicated = count_by_id(
        kafka_server, topic, records, f"kafka broker down {down_s:.0f} s"
    )
    assert lost == 0
    assert "PumpTemporaryError" in procs[0].output() or "Retry in" in procs[0].output()
    assert not faults_db.keys("*dead-letters*")
