"""Batch bytes kept once on the broker's Redis: envelopes and clean batches."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from app.config import parse_settings
from app.messages import BatchRef, legacy_ref
from app.stores.batches import BatchLostError, BatchStore, EnvelopeStore, pump_claim

SETTINGS = parse_settings("pumps: {out: {type: stdout}}")
CSV, MONGO = pump_claim("csv"), pump_claim("mongo")


def test_a_batch_lives_until_every_pump_released_it(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS.key_prefix, done_ttl_s=SETTINGS.delivery.dedup_ttl_s)
    store.hold(store.key("b1"), b"bytes", ["csv", "mongo"])
    assert store.load(store.key("b1"), CSV) == b"bytes"
    assert store.holders(store.key("b1")) == ["csv", "mongo"]
    assert store.release(store.key("b1"), CSV) == 1
    # csv is done with it (a copy of its task finds nothing to do); mongo still reads it.
    assert store.load(store.key("b1"), CSV) is None
    assert store.load(store.key("b1"), MONGO) == b"bytes"
    assert store.release(store.key("b1"), MONGO) == 0
    # Released by all: the bytes are gone, a marker that expires says the batch is done.
    assert store.load(store.key("b1"), MONGO) is None
    assert redis_db.hget(store.key("b1"), "data") is None
    assert 0 < redis_db.ttl(store.key("b1")) <= SETTINGS.delivery.dedup_ttl_s
    assert store.held() == 0


def test_holding_again_adds_the_missing_pumps_and_keeps_no_expiry(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS.key_prefix, done_ttl_s=SETTINGS.delivery.dedup_ttl_s)
    store.hold(store.key("b2"), b"x", ["a"])
    store.hold(store.key("b2"), b"x", ["a", "b"])  # an ingest redelivered mid fan-out
    assert store.holders(store.key("b2")) == ["a", "b"]
    assert redis_db.ttl(store.key("b2")) == -1
    assert store.held() == 1
    store.release(store.key("b2"), pump_claim("a"))
    store.release(store.key("b2"), pump_claim("b"))
    store.hold(
        store.key("b2"), b"x", ["c"]
    )  # held again after it was done: no expiry, no done marker
    assert store.load(store.key("b2"), pump_claim("c")) == b"x"
    assert redis_db.ttl(store.key("b2")) == -1


def test_a_repeated_release_does_not_free_another_pumps_claim(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS.key_prefix, done_ttl_s=SETTINGS.delivery.dedup_ttl_s)
    store.hold(store.key("b3"), b"x", ["a", "b"])
    assert store.release(store.key("b3"), pump_claim("a")) == 1
    assert store.release(store.key("b3"), pump_claim("a")) == 1  # a duplicate of a's task
    assert store.load(store.key("b3"), pump_claim("b")) == b"x"
    assert store.release(store.key("b3"), pump_claim("b")) == 0
    assert (
        store.release(store.key("b3"), pump_claim("b")) == 0
    )  # releasing a released batch is harmless
    assert store.load(store.key("b3"), pump_claim("b")) is None


def test_pump_names_cannot_collide_with_the_store_fields(redis_db: redis.Redis) -> None:
    store = BatchStore(redis_db, SETTINGS.key_prefix, done_ttl_s=SETTINGS.delivery.dedup_ttl_s)
    store.hold(store.key("b4"), b"payload", ["data", "done"])
    assert store.load(store.key("b4"), pump_claim("done")) == b"payload"
    assert store.release(store.key("b4"), pump_claim("data")) == 1
    assert store.load(store.key("b4"), pump_claim("done")) == b"payload"
    assert store.release(store.key("b4"), pump_claim("done")) == 0


def test_bytes_gone_without_a_done_marker_are_reported_lost(redis_db: redis.Redis) -> None:
    batches = BatchStore(redis_db, SETTINGS.key_prefix)
    batches.hold(batches.key("b5"), b"x", ["a"])
    redis_db.delete(batches.key("b5"))  # what an eviction or a flush does
    with pytest.raises(BatchLostError, match="b5"):
        batches.load(batches.key("b5"), pump_claim("a"))
    envelopes = EnvelopeStore(redis_db, "iam-pump")
    with pytest.raises(BatchLostError, match="e1"):
        envelopes.load(envelopes.key("e1"))


def test_an_envelope_is_kept_until_fanned_out_then_marked_done(redis_db: redis.Redis) -> None:
    envelopes = EnvelopeStore(redis_db, "iam-pump", done_ttl_s=60)
    key = envelopes.put("e2", b"envelope")
    assert key == "iam-pump:envelope:e2"
    assert redis_db.ttl(key) == -1
    assert envelopes.load(key) == b"envelope"
    envelopes.release(key)
    assert envelopes.load(key) is None
    assert 0 < redis_db.ttl(key) <= 60
    # A reporter retrying a send that had arrived after all does not bring the bytes back.
    assert envelopes.put("e2", b"envelope") == key
    assert envelopes.load(key) is None
    assert 0 < redis_db.ttl(key) <= 60


def test_batches_are_kept_on_the_broker_only_when_it_is_redis() -> None:
    assert SETTINGS.batches_on_broker
    other = parse_settings("redis: {host: h, port: 1}\nbroker-url: rediss://b:2/3\n")
    assert other.batches_on_broker
    rabbit = parse_settings("broker-url: amqp://guest:guest@127.0.0.1:5672//\n")
    assert not rabbit.batches_on_broker


def test_a_batch_ref_is_inline_bytes_or_a_key_and_travels_as_such() -> None:
    inline = BatchRef(inline=b"envelope")
    kept = BatchRef(key="iam-pump:batch:b6")
    assert BatchRef.from_message(inline.to_message()) == inline
    assert BatchRef.from_message(kept.to_message()) == kept
    assert kept.to_message() == {"key": "iam-pump:batch:b6"}
    with pytest.raises(ValueError, match="either"):
        BatchRef()
    with pytest.raises(ValueError, match="either"):
        BatchRef(inline=b"x", key="k")
    with pytest.raises(ValueError, match="not a batch reference"):
        BatchRef.from_message({"key": 1})


def test_tasks_published_by_the_previous_version_name_the_same_batches() -> None:
    assert legacy_ref(None, b"bytes", None) == BatchRef(inline=b"bytes")
    assert legacy_ref(b"bytes", None, None) == BatchRef(inline=b"bytes")  # positional payload
    assert legacy_ref(None, None, "iam-pump:envelope:e") == BatchRef(key="iam-pump:envelope:e")
    by_id = legacy_ref(None, None, "b7", stored_key=lambda batch_id: f"iam-pump:batch:{batch_id}")
    assert by_id == BatchRef(key="iam-pump:batch:b7")
    assert legacy_ref({"key": "k"}, None, None) == BatchRef(key="k")
    with pytest.raises(ValueError, match="no batch"):
        legacy_ref(None, None, None)


def test_a_batch_ref_loads_and_releases_through_its_store(redis_db: redis.Redis) -> None:
    batches = BatchStore(redis_db, SETTINGS.key_prefix)
    key = batches.key("b8")
    batches.hold(key, b"clean", ["csv"])
    ref = BatchRef(key=key)
    assert ref.load(batches, CSV) == b"clean"
    ref.release(batches, CSV)
    assert ref.load(batches, CSV) is None
    inline = BatchRef(inline=b"clean")
    assert inline.load(None, CSV) == b"clean"
    inline.release(None, CSV)  # nothing kept, nothing to release
    with pytest.raises(ValueError, match="no store"):
        BatchRef(key=key).load(None, CSV)


class _CountingConnection(redis.Connection):
    """A real connection that counts its round trips (one per command or pipeline sent)."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).sent += 1
        super().send_packed_command(command, check_health)


def test_a_load_records_progress_of_an_owed_claim_in_the_same_round_trip(
    redis_db: redis.Redis,
) -> None:
    kwargs = redis_db.connection_pool.connection_kwargs
    pool = redis.ConnectionPool(connection_class=_CountingConnection, **kwargs)
    client = redis.Redis(connection_pool=pool)
    store = BatchStore(client, SETTINGS.key_prefix, done_ttl_s=SETTINGS.delivery.dedup_ttl_s)
    envelopes = EnvelopeStore(client, SETTINGS.key_prefix)
    ledger = f"{SETTINGS.key_prefix}:ledger"
    batch, envelope = store.key("b9"), envelopes.put("b9", b"env")
    store.hold(batch, b"x", ["csv"])
    for member in (f"{CSV}|{batch}", f"ingest|{envelope}"):
        redis_db.zadd(ledger, {member: 1.0})  # as if owed since 1970
    before = _CountingConnection.sent
    assert store.load(batch, CSV) == b"x"
    assert envelopes.load(envelope) == b"env"
    assert _CountingConnection.sent - before == 2  # each read and its progress in one trip
    assert float(redis_db.zscore(ledger, f"{CSV}|{batch}") or 0) > 1.0
    assert float(redis_db.zscore(ledger, f"ingest|{envelope}") or 0) > 1.0
    # A settled claim stays settled: loading a released batch does not bring it back.
    store.release(batch, CSV)
    assert store.load(batch, CSV) is None
    assert redis_db.zscore(ledger, f"{CSV}|{batch}") is None
    client.close()
