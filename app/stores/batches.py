"""Batch bytes kept once on the broker's Redis, so Celery messages carry only their key.

kombu's Redis transport copies a message's body several times (base64, JSON, once more into its
``unacked`` hash, then a pipe to the pool process). For batches of megabytes that was most of a
worker's time. So when the broker is a Redis server, batch bytes go there once, by key:

* Envelopes, ``<prefix>:envelope:<batch id>`` (string). The reporter and the purge store the
  envelope, then send an ``ingest`` task whose batch reference names the key. Once the batch is
  fanned out the ingest task leaves an empty value with an expiry in its place.
* Clean batches, ``<prefix>:batch:<batch id>`` (hash). The ingest task stores the clean batch
  (field ``data``) with one claim ``pump:<name>`` per pump that must write it, and each pump's
  ``write`` task names the key. A write task releases its pump's claim once the batch is written
  or dead-lettered; the last release drops the data and leaves a ``done`` marker with an expiry.

Bytes are kept with no expiry while a task needs them, so a long outage of a sink cannot outrun
them. The empty value / ``done`` marker tells a redelivered copy of a task that its work is done;
a key with neither means the bytes were lost outside our control (Redis flushed, or evicted by a
``maxmemory-policy`` other than ``noeviction``), which is reported, not taken for done.

Every claim is also in the ledger (:mod:`app.stores.ledger`), added and removed in the same
transaction as the claim itself, so a claim whose task message was lost is found and sent again.

Both stores answer the same two calls, ``load(key, claim)`` and ``release(key, claim)``, which is
all a :class:`~app.messages.BatchRef` needs of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import time
from typing import Any, Protocol

import redis

from app.config import DEFAULT_DEDUP_TTL_S
from app.stores.ledger import LEDGER_KIND, ledger_member
from app.stores.values import as_text

logger = logging.getLogger(__name__)

DATA_FIELD = "data"
DONE_FIELD = "done"
PUMP_CLAIM_PREFIX = "pump:"
#: The one claim on an envelope: the ingest task's.
INGEST_CLAIM = "ingest"

# KEYS: batch, ledger; ARGV: claim, done ttl s, ledger member. Give up one claim and settle it in
# the ledger. The last claim drops the data and marks the batch done (the marker expires after
# ARGV[2] seconds). Returns the claims left, or -1 when the batch is not held.
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[3])
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


# KEYS: envelope, ledger; ARGV: bytes, ledger member, now. Keep the envelope and owe its ingest,
# only if the key is free (bytes already there, or the done marker: nothing changes).
_PUT_ENVELOPE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[2])
end
return 1
"""


class BatchLostError(RuntimeError):
    """A task names bytes that are neither kept nor marked done."""


class ByteStore(Protocol):
    """What a batch reference needs of the store that keeps its bytes."""

    def load(self, key: str, claim: str) -> bytes | None:
        """The bytes, None when ``claim``'s work on them is done; BatchLostError when neither."""
        ...

    def release(self, key: str, claim: str) -> int:
        """Give up ``claim`` (and settle it in the ledger); returns how many claims are left."""
        ...


class _KeptBytes:
    """What both stores share: a client, their keys ``<prefix>:<kind>:<batch id>``, and how long
    a done marker outlives the bytes."""

    KIND = ""

    def __init__(
        self, client: redis.Redis, key_prefix: str, *, done_ttl_s: int = DEFAULT_DEDUP_TTL_S
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._done_ttl_s = done_ttl_s
        self._ledger = f"{key_prefix}:{LEDGER_KIND}"

    @property
    def client(self) -> redis.Redis:
        """The client of the server that keeps the bytes."""
        return self._client

    def key(self, batch_id: str) -> str:
        """The key of a batch's bytes (``*`` as the id gives the pattern of them all)."""
        return f"{self._prefix}:{self.KIND}:{batch_id}"

    def _read(self, key: str, claim: str, read: Callable[[Any], Any]) -> Any:
        # The read, and in the same round trip the ledger told that a task for ``claim`` started
        # (progress: ZADD XX, so a settled claim stays settled). A failed progress mark (a full
        # Redis refuses ZADD) costs only the mark; a failed read raises.
        pipe = self._client.pipeline(transaction=False)
        read(pipe)
        pipe.zadd(self._ledger, {ledger_member(claim, key): time()}, xx=True)
        value, touched = pipe.execute(raise_on_error=False)
        if isinstance(value, Exception):
            raise value
        if isinstance(touched, Exception):
            logger.debug("progress of %s not recorded: %s", ledger_member(claim, key), touched)
        return value

    def _count_present(self, probe: Callable[[Any, Any], Any]) -> int:
        # Keys of this store whose probe answers truthy (non-empty, has data).
        keys = list(self._client.scan_iter(match=self.key("*"), count=1000))
        if not keys:
            return 0
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            probe(pipe, key)
        return sum(1 for answer in pipe.execute() if answer)


class EnvelopeStore(_KeptBytes):
    """Envelopes waiting for their ingest task (written by reporters and the purge)."""

    KIND = "envelope"

    def put(self, batch_id: str, payload: bytes) -> str:
        """Keep ``payload`` (no expiry) and return the key an ingest task should name.

        Only if the key is free: bytes already there (a retried send) or the done marker (the
        batch already fanned out, its first send arrived after all) are left as they are.
        """
        key = self.key(batch_id)
        self._client.eval(
            _PUT_ENVELOPE, 2, key, self._ledger, payload, ledger_member(INGEST_CLAIM, key), time()
        )
        return key

    def load(self, key: str, claim: str = INGEST_CLAIM) -> bytes | None:
        """The envelope at ``key``, or None when a copy of its ingest task already fanned it out.

        Raises :class:`BatchLostError` when nothing is there at all.
        """
        value = self._read(key, claim, lambda pipe: pipe.get(key))
        if value is None:
            raise BatchLostError(f"envelope {key} is not in Redis (flushed or evicted?)")
        assert isinstance(value, bytes)
        return value or None

    def release(self, key: str, claim: str = INGEST_CLAIM) -> int:
        """The envelope is fanned out: replace it with an empty marker that expires."""
        pipe = self._client.pipeline(transaction=True)
        pipe.set(key, b"", ex=self._done_ttl_s)
        pipe.zrem(self._ledger, ledger_member(claim, key))
        pipe.execute()
        return 0

    def waiting(self) -> int:
        """How many envelopes wait for their ingest task (scans the keyspace: status, tests)."""
        return self._count_present(lambda pipe, key: pipe.strlen(key))


class BatchStore(_KeptBytes):
    """Clean batches, each held while some pump still has to write it."""

    KIND = "batch"

    def hold(self, key: str, clean: bytes, pumps: list[str]) -> None:
        """Keep ``clean`` until each pump of ``pumps`` has released it (idempotent)."""
        mapping: dict[str, bytes | int] = {DATA_FIELD: clean}
        mapping.update({pump_claim(name): 1 for name in pumps})
        now = time()
        owed = {ledger_member(pump_claim(name), key): now for name in pumps}
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(key, DONE_FIELD)
        pipe.persist(key)
        pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
        if owed:
            pipe.zadd(self._ledger, owed, nx=True)
        pipe.execute()

    def load(self, key: str, claim: str) -> bytes | None:
        """The batch's bytes, or None when ``claim`` (``pump:<name>``) is already released.

        Raises :class:`BatchLostError` when the batch is neither held nor marked done.
        """
        data, done, held = self._read(
            key, claim, lambda pipe: pipe.hmget(key, [DATA_FIELD, DONE_FIELD, claim])
        )
        if isinstance(data, bytes):
            return data if held is not None else None
        if done is None:
            raise BatchLostError(f"batch {key} is not in Redis (flushed or evicted?)")
        return None

    def release(self, key: str, claim: str) -> int:
        """Claim ``claim`` (``pump:<name>``) is done with the batch; returns the claims left."""
        member = ledger_member(claim, key)
        left = self._client.eval(_RELEASE, 2, key, self._ledger, claim, self._done_ttl_s, member)
        return max(0, int(left))

    def release_in(self, pipe: redis.client.Pipeline, key: str, claim: str) -> None:
        """Queue :meth:`release` on ``pipe``, a pipeline of :attr:`client`."""
        member = ledger_member(claim, key)
        pipe.eval(_RELEASE, 2, key, self._ledger, claim, self._done_ttl_s, member)

    def holders(self, key: str) -> list[str]:
        """The pumps that still have to write the batch."""
        fields = [as_text(field) for field in self._client.hkeys(key)]
        return sorted(
            name[len(PUMP_CLAIM_PREFIX) :] for name in fields if name.startswith(PUMP_CLAIM_PREFIX)
        )

    def held(self) -> int:
        """How many batches are held for some pump (scans the keyspace: status and tests)."""
        return self._count_present(lambda pipe, key: pipe.hexists(key, DATA_FIELD))


def pump_claim(pump_name: str) -> str:
    """The claim a pump holds on a clean batch until its write task is done with it."""
    return PUMP_CLAIM_PREFIX + pump_name
