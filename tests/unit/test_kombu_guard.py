"""kombu's channel close with the broker connection already gone must not kill the worker; a
full Redis must neither kill it nor drop a task."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection

from app import kombu_guard
from tests.conftest import require
from tests.support import REDIS_HOST, REDIS_PORT, KeepFull, RedisServer


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


def test_an_ack_on_a_channel_whose_connection_is_gone_leaves_the_task_for_later(
    redis_db: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    from kombu.transport import redis as kombu_redis

    qos: Any = _channel_whose_connection_is_gone(redis_db).qos  # type: ignore[attr-defined]
    kombu_ack = getattr(kombu_redis.QoS.ack, "__wrapped__", kombu_redis.QoS.ack)
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute"):
        kombu_ack(qos, "tag")  # kombu alone: the worker would exit
    kombu_guard.install()
    qos.ack("tag")  # a task finishing as the consumer reconnects: logged, not fatal
    assert "redelivered after the visibility timeout" in caplog.text


def test_a_put_back_on_a_channel_whose_connection_is_gone_leaves_the_task_for_later(
    redis_db: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    from kombu.transport import redis as kombu_redis

    qos: Any = _channel_whose_connection_is_gone(redis_db).qos  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute"):
        kombu_redis.QoS.restore_by_tag(qos, "tag", leftmost=True)  # what kombu's reject calls
    kombu_guard.install()
    # A task rejected with requeue (it failed on a Redis outage) as the consumer reconnects:
    # logged, not fatal, and forgotten here only.
    qos.reject("tag", requeue=True)
    assert "tag" in qos._dirty  # settled in this process (kombu drops dirty tags lazily)
    assert "redelivered after the visibility timeout" in caplog.text


@pytest.fixture
def full_server(tmp_path: Path) -> Iterator[RedisServer]:
    require(shutil.which("redis-server") is not None, "redis-server")
    server = RedisServer(tmp_path / "redis", maxmemory="8mb", maxmemory_policy="noeviction")
    yield server
    server.stop()


def test_a_full_redis_neither_drops_nor_kills_at_fetch_ack_and_requeue(
    full_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    kombu_guard.install()
    admin = full_server.client()
    with Connection(f"redis://127.0.0.1:{full_server.port}/0") as connection:
        channel = connection.default_channel
        for body in ("first", "second"):
            connection.SimpleQueue("q").put(body)
        keep_full = KeepFull(full_server)
        # Fetched while full: held and retried until Redis records it as unacknowledged.
        fetched: list[Any] = []
        fetcher = threading.Thread(target=lambda: fetched.append(channel.basic_get("q")))
        fetcher.start()
        fetcher.join(1.0)
        assert fetcher.is_alive() and admin.hlen("unacked") == 0
        keep_full.stop()
        admin.config_set("maxmemory", 0)
        fetcher.join(5)
        second = channel.basic_get("q")
        assert admin.hlen("unacked") == 2 and "holding it and retrying" in caplog.text
        admin.config_set("maxmemory", 8 * 1024 * 1024)
        keep_full = KeepFull(full_server)
        # A refused requeue leaves the task unacknowledged in Redis (its visibility timeout
        # brings it back); an acknowledgement goes through outside MULTI.
        first = fetched[0]
        first.reject(requeue=True)
        assert admin.llen("q") == 0 and admin.hlen("unacked") == 2
        assert "stays unacknowledged in Redis" in caplog.text
        second.ack()
        assert admin.hkeys("unacked") == [first.delivery_tag.encode()]
        assert admin.zcard("unacked_index") == 1
        keep_full.stop()
