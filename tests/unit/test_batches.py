"""Batch bytes kept once on the broker's Redis: envelopes and clean batches."""

from __future__ import annotations

import pytest
import redis

from app.config import parse_settings
from tasks.batches import BatchLostError, BatchStore, EnvelopeStore

SETTINGS = parse_settings("pumps: {out: {type: stdout}}")


def test_a_batch_lives_until_every_pump_released_it(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS)
    store.hold("b1", b"bytes", ["csv", "mongo"])
    assert store.fetch("b1") == b"bytes"
    assert store.holders("b1") == ["csv", "mongo"]
    assert store.release("b1", "csv") == 1
    assert store.fetch("b1") == b"bytes"
    assert store.release("b1", "mongo") == 0
    # Released by all: the bytes are gone, a marker that expires says the batch is done.
    assert store.fetch("b1") is None
    assert redis_db.hget(store.key("b1"), "data") is None
    assert 0 < redis_db.ttl(store.key("b1")) <= SETTINGS.delivery.dedup_ttl_s
    assert store.held() == 0


def test_holding_again_adds_the_missing_pumps_and_keeps_no_expiry(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS)
    store.hold("b2", b"x", ["a"])
    store.hold("b2", b"x", ["a", "b"])  # an ingest redelivered mid fan-out
    assert store.holders("b2") == ["a", "b"]
    assert redis_db.ttl(store.key("b2")) == -1
    assert store.held() == 1
    store.release("b2", "a")
    store.release("b2", "b")
    store.hold("b2", b"x", ["c"])  # held again after it was done: no expiry, no done marker
    assert store.fetch("b2") == b"x"
    assert redis_db.ttl(store.key("b2")) == -1


def test_a_repeated_release_does_not_free_another_pumps_claim(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS)
    store.hold("b3", b"x", ["a", "b"])
    assert store.release("b3", "a") == 1
    assert store.release("b3", "a") == 1  # a duplicate of a's task
    assert store.fetch("b3") == b"x"
    assert store.release("b3", "b") == 0
    assert store.release("b3", "b") == 0  # releasing a released batch is harmless
    assert store.fetch("b3") is None


def test_pump_names_cannot_collide_with_the_store_fields(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS)
    store.hold("b4", b"payload", ["data", "done"])
    assert store.fetch("b4") == b"payload"
    assert store.release("b4", "data") == 1
    assert store.fetch("b4") == b"payload"
    assert store.release("b4", "done") == 0


def test_bytes_gone_without_a_done_marker_are_reported_lost(redis_db: redis.Redis) -> None:
    batches = BatchStore(redis_db, SETTINGS)
    batches.hold("b5", b"x", ["a"])
    redis_db.delete(batches.key("b5"))  # what an eviction or a flush does
    with pytest.raises(BatchLostError, match="b5"):
        batches.fetch("b5")
    envelopes = EnvelopeStore(redis_db, "iam-pump")
    with pytest.raises(BatchLostError, match="e1"):
        envelopes.take(envelopes.key("e1"))


def test_an_envelope_is_kept_until_fanned_out_then_marked_done(redis_db: redis.Redis) -> None:
    envelopes = EnvelopeStore(redis_db, "iam-pump")
    key = envelopes.put("e2", b"envelope")
    assert key == "iam-pump:envelope:e2"
    assert redis_db.ttl(key) == -1
    assert envelopes.take(key) == b"envelope"
    envelopes.done(key, ttl_s=60)
    assert envelopes.take(key) is None
    assert 0 < redis_db.ttl(key) <= 60
    # A reporter retrying a send that had arrived after all does not bring the bytes back.
    assert envelopes.put("e2", b"envelope") == key
    assert envelopes.take(key) is None
    assert 0 < redis_db.ttl(key) <= 60


def test_batches_are_kept_on_the_broker_only_when_it_is_redis() -> None:
    assert SETTINGS.batches_on_broker
    other = parse_settings("redis: {host: h, port: 1}\nbroker-url: rediss://b:2/3\n")
    assert other.batches_on_broker
    rabbit = parse_settings("broker-url: amqp://guest:guest@127.0.0.1:5672//\n")
    assert not rabbit.batches_on_broker
