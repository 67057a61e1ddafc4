"""Clean batches kept once in Redis while their write tasks wait, so messages carry only an id.

When the Celery broker is the ``redis:`` server itself, the ingest task keeps each clean batch in
the hash ``<prefix>:batch:<batch id>`` (field ``data``) with one field ``pump:<name>`` per pump
that still has to write it, and sends each pump a write task that names the batch instead of
carrying its bytes. A write task gives up its pump's field once the batch is written or
dead-lettered; the last one deletes the hash. The batch thus lives exactly as long as a task
needs it, with no expiry that a long outage of a sink could outrun, and the bytes move through
Redis once instead of once per pump and once more for each copy kombu keeps of a message.

With any other broker (RabbitMQ, another Redis) the bytes stay in the messages: the batch must
live where its tasks live, and survive what they survive.
"""

from __future__ import annotations

import redis

from app.config import Settings

DATA_FIELD = "data"
PUMP_FIELD_PREFIX = "pump:"

# Give up one pump's claim; the last claim deletes the batch. Returns the claims left.
_RELEASE = """
redis.call('HDEL', KEYS[1], ARGV[1])
local left = redis.call('HLEN', KEYS[1]) - 1
if left <= 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
return left
"""


class BatchStore:
    """Clean batches by id, each held while some pump still has to write it."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    def key(self, batch_id: str) -> str:
        return self._settings.key("batch", batch_id)

    def hold(self, batch_id: str, clean: bytes, pumps: list[str]) -> None:
        """Keep ``clean`` until each pump of ``pumps`` has released it (idempotent)."""
        mapping: dict[str, bytes | int] = {DATA_FIELD: clean}
        mapping.update({PUMP_FIELD_PREFIX + name: 1 for name in pumps})
        self._client.hset(self.key(batch_id), mapping=mapping)  # type: ignore[arg-type]

    def fetch(self, batch_id: str) -> bytes | None:
        """The batch's bytes, or None when every pump has released it."""
        data = self._client.hget(self.key(batch_id), DATA_FIELD)
        return data if isinstance(data, bytes) else None

    def release(self, batch_id: str, pump_name: str) -> int:
        """Pump ``pump_name`` is done with the batch; returns how many pumps still hold it."""
        left = self._client.eval(_RELEASE, 1, self.key(batch_id), PUMP_FIELD_PREFIX + pump_name)
        return int(left)

    def holders(self, batch_id: str) -> list[str]:
        """The pumps that still have to write the batch."""
        fields = self._client.hkeys(self.key(batch_id))
        names = [f.decode() if isinstance(f, bytes) else str(f) for f in fields]
        return sorted(n[len(PUMP_FIELD_PREFIX) :] for n in names if n.startswith(PUMP_FIELD_PREFIX))

    def count(self) -> int:
        """How many batches are held (scans the keyspace; for status and tests)."""
        pattern = self._settings.key("batch", "*")
        return sum(1 for _ in self._client.scan_iter(match=pattern, count=1000))
