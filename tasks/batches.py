"""Batch bytes kept once on the broker's Redis, so Celery messages carry only their key.

kombu's Redis transport copies a message's body several times (base64, JSON, once more into its
``unacked`` hash, then a pipe to the pool process). For batches of megabytes that was most of a
worker's time. So when the broker is a Redis server, batch bytes go there once, by key:

* Envelopes, ``<prefix>:envelope:<batch id>`` (string). The reporter and the purge store the
  envelope, then send an ``ingest`` task whose ``stored`` argument names the key. Once the batch
  is fanned out the ingest task leaves an empty value with an expiry in its place.
* Clean batches, ``<prefix>:batch:<batch id>`` (hash). The ingest task stores the clean batch
  (field ``data``) with one field ``pump:<name>`` per pump that must write it, and each pump's
  ``write`` task names the batch. A write task releases its pump's field once the batch is
  written or dead-lettered; the last release drops the data and leaves a ``done`` marker with an
  expiry.

Bytes are kept with no expiry while a task needs them, so a long outage of a sink cannot outrun
them. The empty value / ``done`` marker tells a redelivered copy of a task that its work is done;
a key with neither means the bytes were lost outside our control (Redis flushed, or evicted by a
``maxmemory-policy`` other than ``noeviction``), which is reported, not taken for done.

The bytes live on the broker's Redis, next to the messages that name them: they survive exactly
what the messages survive. With another broker (RabbitMQ) batches travel inside the messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from app.config import Settings
from app.redis_values import as_text

DATA_FIELD = "data"
DONE_FIELD = "done"
PUMP_FIELD_PREFIX = "pump:"

# Give up one pump's claim. The last claim drops the data and marks the batch done (the marker
# expires after ARGV[2] seconds). Returns the claims left, or -1 when the batch is not held.
_RELEASE = """
if redis.call('HEXISTS', KEYS[1], 'data') == 0 then return -1 end
redis.call('HDEL', KEYS[1], ARGV[1])
local left = 0
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 5) == 'pump:' then left = left + 1 end
end
if left == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'done', 1)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return left
"""


class BatchLostError(RuntimeError):
    """A task names bytes that are neither kept nor marked done."""


class EnvelopeStore:
    """Envelopes waiting for their ingest task (written by reporters and the purge)."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._client = client
        self._prefix = key_prefix

    def key(self, batch_id: str) -> str:
        return f"{self._prefix}:envelope:{batch_id}"

    def put(self, batch_id: str, payload: bytes) -> str:
        """Keep ``payload`` (no expiry) and return the key an ingest task should name.

        Only if the key is free: bytes already there (a retried send) or the done marker (the
        batch already fanned out, its first send arrived after all) are left as they are.
        """
        key = self.key(batch_id)
        self._client.set(key, payload, nx=True)
        return key

    def take(self, key: str) -> bytes | None:
        """The envelope at ``key``, or None when a copy of its ingest task already fanned it out.

        Raises :class:`BatchLostError` when nothing is there at all.
        """
        value = self._client.get(key)
        if value is None:
            raise BatchLostError(f"envelope {key} is not in Redis (flushed or evicted?)")
        assert isinstance(value, bytes)
        return value or None

    def done(self, key: str, *, ttl_s: int) -> None:
        """The envelope is fanned out: replace it with an empty marker that expires."""
        self._client.set(key, b"", ex=ttl_s)

    def waiting(self) -> int:
        """How many envelopes wait for their ingest task (scans the keyspace: status, tests)."""
        return _count_present(self._client, self.key("*"), lambda pipe, key: pipe.strlen(key))


class BatchStore:
    """Clean batches by id, each held while some pump still has to write it."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    def key(self, batch_id: str) -> str:
        return self._settings.key("batch", batch_id)

    def hold(self, batch_id: str, clean: bytes, pumps: list[str]) -> None:
        """Keep ``clean`` until each pump of ``pumps`` has released it (idempotent)."""
        key = self.key(batch_id)
        mapping: dict[str, bytes | int] = {DATA_FIELD: clean}
        mapping.update({PUMP_FIELD_PREFIX + name: 1 for name in pumps})
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(key, DONE_FIELD)
        pipe.persist(key)
        pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
        pipe.execute()

    def fetch(self, batch_id: str) -> bytes | None:
        """The batch's bytes, or None when every pump has released it.

        Raises :class:`BatchLostError` when the batch is neither held nor marked done.
        """
        data, done = self._client.hmget(self.key(batch_id), [DATA_FIELD, DONE_FIELD])
        if isinstance(data, bytes):
            return data
        if done is None:
            key = self.key(batch_id)
            raise BatchLostError(f"batch {key} is not in Redis (flushed or evicted?)")
        return None

    def release(self, batch_id: str, pump_name: str) -> int:
        """Pump ``pump_name`` is done with the batch; returns how many pumps still hold it."""
        left = self._client.eval(
            _RELEASE,
            1,
            self.key(batch_id),
            PUMP_FIELD_PREFIX + pump_name,
            self._settings.delivery.dedup_ttl_s,
        )
        return max(0, int(left))

    def holders(self, batch_id: str) -> list[str]:
        """The pumps that still have to write the batch."""
        names = [as_text(field) for field in self._client.hkeys(self.key(batch_id))]
        return sorted(n[len(PUMP_FIELD_PREFIX) :] for n in names if n.startswith(PUMP_FIELD_PREFIX))

    def held(self) -> int:
        """How many batches are held for some pump (scans the keyspace: status and tests)."""
        return _count_present(
            self._client, self.key("*"), lambda pipe, key: pipe.hexists(key, DATA_FIELD)
        )


def _count_present(client: redis.Redis, pattern: str, probe: Callable[[Any, Any], Any]) -> int:
    # Keys matching ``pattern`` whose probe answers truthy (non-empty, has data).
    keys = list(client.scan_iter(match=pattern, count=1000))
    if not keys:
        return 0
    pipe = client.pipeline(transaction=False)
    for key in keys:
        probe(pipe, key)
    return sum(1 for answer in pipe.execute() if answer)
