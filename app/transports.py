"""How the reporter hands a batch over: as one Celery ``ingest`` task, or by RPUSH to iam's list.

A transport is used by the reporter's shipping threads only, never by ``record_hit``. ``ship``
raises :class:`~app.errors.ShipError` when the batch may not have arrived; the reporter then
retries the same batch (same id) with backoff, and ingest drops the duplicate if the first try did
arrive after all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import redis
from celery import Celery

from app.codec import encode_envelope, encode_go_row
from app.config import RedisConfig, broker_is_redis
from app.errors import ShipError
from app.messages import Sender
from app.stores.batches import EnvelopeStore
from app.stores.clients import config_client

if TYPE_CHECKING:
    from app.analytics_options import AnalyticsOptions

#: What msgpack raises for a value it cannot encode; a transport lets these through, unwrapped,
#: so the reporter can set the offending record aside.
EncodeError = (TypeError, ValueError, OverflowError)

#: How long one attempt to reach the broker may take before it counts as failed.
BROKER_CONNECT_TIMEOUT_S = 2.0


class Transport(Protocol):
    """Ships one batch; raises ShipError on failure."""

    def ship(self, batch_id: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def close(self) -> None: ...


class CeleryTransport:
    """Sends each batch as one ``ingest`` task through the Celery broker.

    With a Redis broker and a ``key_prefix``, the envelope is kept on the broker's Redis and the
    task names its key (app/stores/batches.py); otherwise the task carries the envelope's bytes.
    The app is the reporter's own, never made current: the host application's Celery setup, if
    it has one, is left alone.
    """

    def __init__(self, broker_url: str, *, key_prefix: str | None = None) -> None:
        self._app = Celery("iam_pump_reporter", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            task_serializer="msgpack",
            accept_content=["msgpack"],
            task_ignore_result=True,
            broker_connection_timeout=BROKER_CONNECT_TIMEOUT_S,
            broker_connection_retry=False,
            broker_connection_retry_on_startup=False,
            broker_transport_options={"max_retries": 0},
        )
        self._local = threading.local()
        self._redis: redis.Redis | None = None
        envelopes = None
        if key_prefix is not None and broker_is_redis(broker_url):
            self._redis = _redis_client(broker_url)
            envelopes = EnvelopeStore(self._redis, key_prefix)
        self._sender = Sender(self._app, envelopes=envelopes, retry=False)

    def ship(self, batch_id: str, rows: Sequence[Sequence[Any]]) -> None:
        self.ship_envelope(batch_id, self._packed(batch_id, rows))

    def ship_envelope(self, batch_id: str, payload: bytes) -> None:
        """Ship a batch already packed by :func:`~app.codec.encode_envelope`."""
        try:
            self._sender.send_ingest(self._sender.envelope_ref(batch_id, payload))
        except Exception as exc:
            raise ShipError(f"broker did not take batch {batch_id}: {exc}") from exc
        self._local.packed = None

    def _packed(self, batch_id: str, rows: Sequence[Sequence[Any]]) -> bytes:
        # A batch that failed to ship is retried by the same thread with the same id: its bytes
        # are kept rather than packed again on every attempt of an outage (megabytes each time,
        # which the allocator does not always give back).
        cached: tuple[str, bytes] | None = getattr(self._local, "packed", None)
        if cached is not None and cached[0] == batch_id:
            return cached[1]
        payload = encode_envelope(batch_id, rows)
        self._local.packed = (batch_id, payload)
        return payload

    def close(self) -> None:
        self._app.close()
        if self._redis is not None:
            self._redis.close()


def _redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=BROKER_CONNECT_TIMEOUT_S,
        socket_timeout=BROKER_CONNECT_TIMEOUT_S * 5,
    )


class RedisListTransport:
    """RPUSHes records to iam's list, byte-compatible with iam-authz-server."""

    def __init__(self, redis_url: str, key: str, *, config: RedisConfig | None = None) -> None:
        """Push to ``key`` on ``redis_url``, or, given a ``redis:`` block that names a Redis
        Cluster or a master behind Sentinel, there."""
        self._key = key
        self._redis = config_client(config) if config is not None else _redis_client(redis_url)

    def ship(self, batch_id: str, rows: Sequence[Sequence[Any]]) -> None:
        items = [encode_go_row(row) for row in rows]
        try:
            self._redis.rpush(self._key, *items)
        except redis.RedisError as exc:
            raise ShipError(f"Redis did not take batch {batch_id}: {exc}") from exc

    def close(self) -> None:
        self._redis.close()


class MemoryTransport:
    """Keeps shipped batches in memory: the reporter's seam for tests and benchmarks.

    It encodes each batch like the Celery transport (and so refuses what that one refuses), then
    keeps the rows.

    ``down = True`` makes every ship fail, as if the broker were unreachable; ``delay_s`` makes
    each ship slow.
    """

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.batches: list[tuple[str, list[Sequence[Any]]]] = []
        self.down = False
        self.delay_s = delay_s
        self.attempts = 0
        self.closed = False
        self._lock = threading.Lock()

    def ship(self, batch_id: str, rows: Sequence[Sequence[Any]]) -> None:
        encode_envelope(batch_id, rows)  # as the Celery transport does; raises EncodeError
        with self._lock:
            self.attempts += 1
            down = self.down
        if self.delay_s:
            time.sleep(self.delay_s)
        if down:
            raise ShipError(f"memory transport is down (batch {batch_id})")
        with self._lock:
            self.batches.append((batch_id, list(rows)))

    def rows(self) -> list[Sequence[Any]]:
        """Every shipped row, in shipping order."""
        with self._lock:
            return [row for _, rows in self.batches for row in rows]

    def close(self) -> None:
        self.closed = True


def transport_for(options: AnalyticsOptions) -> CeleryTransport | RedisListTransport:
    """The transport the reporter's options name, for its threads or its helper process."""
    if options.transport == "redis-list":
        return RedisListTransport(options.redis_url, options.analytics_key, config=options.redis)
    return CeleryTransport(options.broker_url, key_prefix=options.key_prefix)
