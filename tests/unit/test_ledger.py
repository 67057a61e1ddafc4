"""The ledger of claims on kept batches, the heartbeat of running writes, and one sweep run, on a
real Redis with real Celery messages."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from app.config import Settings, parse_settings
from app.messages import BatchRef, claim_in_message
from app.stores.batches import INGEST_CLAIM, BatchStore, EnvelopeStore, pump_claim
from app.stores.ledger import Heartbeat, Ledger, ledger_member, split_member
from app.stores.stats import Counter
from app.worker_context import WorkerContext, install_context
from tasks.sweep import sweep_ledger
from tests.support import REDIS_HOST, REDIS_PORT, TEST_REDIS_DB

PREFIX = "iam-pump"
CSV = pump_claim("csv")


def _settings() -> Settings:
    return parse_settings(
        f"redis: {{host: {REDIS_HOST}, port: {REDIS_PORT}, database: {TEST_REDIS_DB}}}\n"
        "delivery: {redelivery-window-s: 30}\n"
        "pumps: {csv: {type: csv, meta: {csv_dir: /tmp/unused}}, out: {type: stdout}}\n"
    )


@pytest.fixture
def context(redis_db: redis.Redis) -> Iterator[WorkerContext]:
    settings = _settings()
    celery = Celery("ledger-test", broker=settings.broker, set_as_current=False)
    celery.conf.update(task_serializer="msgpack", accept_content=["msgpack"])
    built = WorkerContext.build(settings, celery)
    install_context(built)
    yield built
    install_context(None)
    built.close()
    celery.close()


def _age(client: redis.Redis, member: str, seconds: float) -> None:
    # What a claim looks like after ``seconds`` without progress.
    client.zadd(f"{PREFIX}:ledger", {member: time.time() - seconds}, xx=True)


def _owed(client: redis.Redis) -> set[str]:
    return {m.decode() for m in client.zrange(f"{PREFIX}:ledger", 0, -1)}


def test_claims_enter_and_leave_the_ledger_with_the_bytes(redis_db: redis.Redis) -> None:
    envelopes, batches = EnvelopeStore(redis_db, PREFIX), BatchStore(redis_db, PREFIX)
    envelope = envelopes.put("e1", b"envelope")
    assert _owed(redis_db) == {ledger_member(INGEST_CLAIM, envelope)}
    batch = batches.key("e1")
    batches.hold(batch, b"clean", ["csv", "out"])
    envelopes.release(envelope)
    assert _owed(redis_db) == {ledger_member(CSV, batch), ledger_member(pump_claim("out"), batch)}
    batches.release(batch, CSV)
    assert _owed(redis_db) == {ledger_member(pump_claim("out"), batch)}
    batches.release(batch, pump_claim("out"))
    assert _owed(redis_db) == set()
    # A repeated send of a done envelope neither brings its bytes back nor owes its ingest again.
    envelopes.put("e1", b"envelope")
    assert _owed(redis_db) == set()
    assert split_member(ledger_member(CSV, batch)) == (CSV, batch)


def test_touch_keeps_settled_claims_settled_and_stale_lists_oldest_first(
    redis_db: redis.Redis,
) -> None:
    ledger, batches = Ledger(redis_db, PREFIX), BatchStore(redis_db, PREFIX)
    batches.hold(batches.key("a"), b"x", ["csv"])
    batches.hold(batches.key("b"), b"x", ["csv"])
    old, older = ledger_member(CSV, batches.key("a")), ledger_member(CSV, batches.key("b"))
    _age(redis_db, old, 100)
    _age(redis_db, older, 200)
    assert [member for member, _ in ledger.stale(50)] == [older, old]
    ledger.touch([old, "pump:csv|never-owed"])
    assert [member for member, _ in ledger.stale(50)] == [older]
    assert ledger.progress_of("pump:csv|never-owed") is None
    assert ledger.owed() == 2


def test_one_lease_per_claim_and_the_heartbeat_keeps_it(redis_db: redis.Redis) -> None:
    ledger, batches = Ledger(redis_db, PREFIX), BatchStore(redis_db, PREFIX)
    batches.hold(batches.key("c"), b"x", ["csv"])
    member = ledger_member(CSV, batches.key("c"))
    first, second = ledger.lease(member, 300), ledger.lease(member, 300)
    assert first.acquire()
    assert not second.acquire()
    _age(redis_db, member, 100)
    heartbeat = Heartbeat(ledger, interval_s=0.1)
    heartbeat.add(member, first)
    time.sleep(0.6)  # twice the lease's TTL: only the heartbeat keeps it
    assert not second.acquire()
    assert ledger.stale(50) == []  # the claim is moving
    heartbeat.remove(member)
    heartbeat.stop()
    time.sleep(0.4)
    assert second.acquire()  # the holder stopped renewing: its lease expired


def _queued(client: redis.Redis, queue: str) -> list[bytes]:
    return list(client.lrange(queue, 0, -1))


def test_messages_name_the_claim_they_settle(context: WorkerContext) -> None:
    broker = context.broker_redis
    assert broker is not None and context.batches is not None
    key = context.batches.key("m1")
    context.sender.send_write("csv", BatchRef(key=key))
    context.sender.send_ingest(BatchRef(key="iam-pump:envelope:m1"))
    context.sender.send_write("csv", BatchRef(inline=b"bytes travel inline"))
    writes, ingests = _queued(broker, "pump.csv"), _queued(broker, "ingest")
    found = [claim_in_message(raw, stored_key=context.batches.key) for raw in writes + ingests]
    assert sorted(filter(None, found)) == sorted(
        [ledger_member(CSV, key), ledger_member(INGEST_CLAIM, "iam-pump:envelope:m1")]
    )
    assert found.count(None) == 1
    # The form kombu keeps for a delivered, unacknowledged message.
    unacked: list[Any] = [json.loads(writes[-1]), "pump.csv", "pump.csv"]
    raw = json.dumps(unacked).encode()
    assert claim_in_message(raw, stored_key=context.batches.key) == ledger_member(CSV, key)
    assert claim_in_message(b"not json", stored_key=context.batches.key) is None


def test_a_sweep_sends_a_lost_task_again_once_and_leaves_waiting_ones(
    context: WorkerContext,
) -> None:
    broker, batches = context.broker_redis, context.batches
    assert broker is not None and batches is not None
    lost, waiting, fresh = (batches.key(name) for name in ("lost", "waiting", "fresh"))
    for key in (lost, waiting, fresh):
        batches.hold(key, b"clean", ["csv"])
    context.sender.send_write("csv", BatchRef(key=waiting))  # its task is in the queue
    _age(broker, ledger_member(CSV, lost), 60)
    _age(broker, ledger_member(CSV, waiting), 60)
    assert sweep_ledger(context) == {"status": "ok", "stale": 2, "waiting": 1, "resent": 1}
    carried = [claim_in_message(raw, stored_key=batches.key) for raw in _queued(broker, "pump.csv")]
    assert sorted(carried) == sorted([ledger_member(CSV, waiting), ledger_member(CSV, lost)])
    # Both were marked: the next run finds nothing stale, and the one it sent is not sent twice.
    assert sweep_ledger(context)["stale"] == 0
    _age(broker, ledger_member(CSV, lost), 60)
    assert sweep_ledger(context)["resent"] == 0
    assert context.stats.read().total(Counter.RESENT_TASKS) == 1
