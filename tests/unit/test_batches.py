"""The batch store: a clean batch kept once in Redis while pumps still have to write it."""

from __future__ import annotations

import redis

from app.config import parse_settings
from tasks.batches import BatchStore

SETTINGS = parse_settings("pumps: {out: {type: stdout}}")


def test_a_batch_lives_until_every_pump_released_it(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS)
    store.hold("b1", b"bytes", ["csv", "mongo"])
    assert store.fetch("b1") == b"bytes"
    assert store.holders("b1") == ["csv", "mongo"]
    assert store.release("b1", "csv") == 1
    assert store.fetch("b1") == b"bytes"
    assert store.release("b1", "mongo") == 0
    assert store.fetch("b1") is None
    assert redis_db.exists(store.key("b1")) == 0
    assert store.count() == 0


def test_holding_again_adds_the_missing_pumps_and_keeps_no_expiry(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS)
    store.hold("b2", b"x", ["a"])
    store.hold("b2", b"x", ["a", "b"])  # an ingest redelivered mid fan-out
    assert store.holders("b2") == ["a", "b"]
    assert redis_db.ttl(store.key("b2")) == -1
    assert store.count() == 1


def test_a_repeated_release_does_not_free_another_pumps_claim(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS)
    store.hold("b3", b"x", ["a", "b"])
    assert store.release("b3", "a") == 1
    assert store.release("b3", "a") == 1  # a duplicate of a's task
    assert store.fetch("b3") == b"x"
    assert store.release("b3", "b") == 0
    assert store.release("b3", "b") == 0  # releasing a released batch is harmless


def test_pump_names_cannot_collide_with_the_data_field(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS)
    store.hold("b4", b"payload", ["data"])
    assert store.fetch("b4") == b"payload"
    assert store.release("b4", "data") == 0


def test_batches_are_kept_in_redis_only_when_redis_is_the_broker() -> None:
    assert SETTINGS.batches_in_redis
    same = parse_settings("redis: {host: h, port: 1}\nbroker-url: redis://h:1/0\n")
    assert same.batches_in_redis
    rabbit = parse_settings("broker-url: amqp://guest:guest@127.0.0.1:5672//\n")
    assert not rabbit.batches_in_redis
