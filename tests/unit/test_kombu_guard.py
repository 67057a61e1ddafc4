"""kombu's channel close with the broker connection already gone must not kill the worker."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection

from app import kombu_guard
from tests.support import REDIS_HOST, REDIS_PORT


def _channel_whose_connection_is_gone(redis_db: redis.Redis) -> object:
    db = redis_db.connection_pool.connection_kwargs["db"]
    connection = Connection(f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}")
    channel = connection.default_channel
    channel.qos._delivered["tag"] = object()  # a task this worker had not acknowledged yet
    channel._pool = None
    channel.connection.client = None  # what a lost broker connection leaves behind
    return channel


def test_kombu_alone_fails_where_the_guard_steps_in(
    redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.transport import redis as kombu_redis
    from kombu.transport.virtual.base import QoS

    # Without the guard (kombu's own method), closing fails the way the worker log showed.
    monkeypatch.setattr(kombu_redis.QoS, "restore_unacked_once", QoS.restore_unacked_once)
    channel = _channel_whose_connection_is_gone(redis_db)
    with pytest.raises(AttributeError, match="hostname"):
        channel.qos.restore_unacked_once()  # type: ignore[attr-defined]


def test_with_the_guard_the_channel_closes(
    redis_db: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    kombu_guard.install()
    kombu_guard.install()  # idempotent
    channel = _channel_whose_connection_is_gone(redis_db)
    channel.close()  # type: ignore[attr-defined]
    assert channel.closed  # type: ignore[attr-defined]
    assert "redelivered after the visibility timeout" in caplog.text
