"""The purge task: drain iam's Redis list into ingest batches without ever losing a record.

Beat runs it every ``purge-delay`` seconds on queue ``purge``. One run holds a lock
(``<prefix>:purge:lock``, ``SET NX PX`` with a random token), so runs never overlap across
processes or machines, and drains the list chunk by chunk (``delivery.purge-chunk-size``) until
it is empty or its time budget is spent:

A crash of the purge at any point loses nothing; the lock expires after
``delivery.purge-lock-ttl-s`` and the next run carries on.

Each chunk is read and trimmed under a second lock, the one a Go iam-pump takes around its
``MULTI; LRANGE 0 -1; DEL; EXEC``: the key ``iam-pump`` (not configurable, as in iam), in
database 0 (iam's lock client never selects another), ``SET NX PX`` with a random token
(``delivery.iam-lock-ttl-s``, iam's 10 minutes by default) and a compare-and-delete release. So a
Go pump and this purge never drain the list at the same time, and our trim never removes records a
Go pump left behind. Our own lock stays: it keeps two of our runs from taking turns chunk by chunk
and expires after ``delivery.purge-lock-ttl-s`` whatever iam's lock does.

1. read the head chunk with ``LRANGE`` (nothing is removed yet);
2. enqueue it as one ingest task whose batch id is ``<epoch>-<offset>-<digest>``, the offset being
   how many records were ever removed from the list and the digest a hash of the chunk's bytes:
   the same chunk always gets the same id, and other records never get the id of a chunk already
   delivered (a list that grew between a failed trim and the next read, or a Redis whose last
   writes were rolled back by a Sentinel failover, can put other records at the same offset);
3. only then remove it: iam's lock is extended if still ours (it then cannot lapse before the
   trim), and one script checks our lock is still ours, ``LTRIM``s the chunk and advances the
   offset atomically; iam's lock is released.

A crash before step 3 leaves the chunk in the list; the next run enqueues it again under the same
batch id, and ingest, which remembers which pumps got that batch, does not deliver it twice (if
the list grew meanwhile, the longer chunk is another batch: its first records are delivered
twice, none is lost).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from app.celery_app import app
from app.codec import encode_go_envelope
from app.config import IAM_LOCK_KEY
from app.messages import PURGE_TASK
from app.stores.clients import context_database, same_server
from app.stores.locks import RedisLock
from app.stores.stats import Counter
from app.stores.values import as_bytes, as_text
from app.worker_context import WorkerContext, current_context

logger = logging.getLogger(__name__)

#: Longest a single purge run drains before it lets the next scheduled run take over.
PURGE_RUN_BUDGET_S = 30.0
#: Bytes of the chunk digest in a batch id (hex: twice as many characters).
DIGEST_BYTES = 6
#: How long a chunk waits for a Go iam-pump to give its lock up before the run stops.
IAM_LOCK_WAIT_S = 2.0

# KEYS: lock, list, offset; ARGV: token, count, lock ttl ms.
_TRIM_IF_OWNER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


@app.task(name=PURGE_TASK, acks_late=False)
def purge() -> dict[str, Any]:
    """Drain the Redis list into ingest batches (see the module docstring).

    Acknowledged early: a purge killed mid-run is not redelivered, the next scheduled run (beat,
    every ``purge-delay`` seconds) carries on from what is still in the list.
    """
    return drain()


def drain(
    context: WorkerContext | None = None, *, budget_s: float = PURGE_RUN_BUDGET_S
) -> dict[str, Any]:
    """One purge run; returns what it moved. Usable outside Celery (tests, the command line):
    without a context it uses this process's, built from the configuration if need be."""
    if context is None:
        context = current_context(app)
    settings = context.settings
    lock = RedisLock(
        context.redis,
        settings.key("purge", "lock"),
        ttl_ms=int(settings.delivery.purge_lock_ttl_s * 1000),
    )
    if not lock.acquire():
        return {"status": "busy", "records": 0, "batches": 0}
    moved = _Moved()
    try:
        _drain_chunks(context, lock, moved, deadline=time.monotonic() + budget_s)
    finally:
        lock.release()
        if moved.records:
            context.stats.add({Counter.PURGED_RECORDS: moved.records})
    if moved.records:
        logger.info(
            "purge: moved %d records in %d batches (%s)", moved.records, moved.batches, moved.status
        )
    return dataclasses.asdict(moved)


@dataclasses.dataclass(slots=True)
class _Moved:
    # What one run moved, kept up to date chunk by chunk (a failure midway still counts it).
    status: str = "drained"
    records: int = 0
    batches: int = 0


def _drain_chunks(
    context: WorkerContext, lock: RedisLock, moved: _Moved, *, deadline: float
) -> None:
    # Read a chunk, enqueue it, only then trim it (if the lock is still ours), until the list
    # is empty or the time budget is spent; ``moved`` counts what went.
    settings = context.settings
    client = context.redis
    epoch = _epoch(context)
    trim = client.register_script(_TRIM_IF_OWNER)
    keys = [lock.key, settings.analytics_key, settings.key("purge", "offset")]
    iam_lock = RedisLock(
        _database_zero(client),
        IAM_LOCK_KEY,
        ttl_ms=int(settings.delivery.iam_lock_ttl_s * 1000),
    )
    try:
        while time.monotonic() < deadline:
            with _held(iam_lock) as held:
                if not held:
                    moved.status = "iam-busy"
                    return
                offset = int(client.get(keys[2]) or 0)
                chunk = client.lrange(keys[1], 0, settings.delivery.purge_chunk_size - 1)
                if not chunk:
                    return
                batch_id = f"{epoch}-{offset}-{chunk_digest(chunk)}"
                envelope = encode_go_envelope(batch_id, [as_bytes(item) for item in chunk])
                context.sender.send_ingest(context.sender.envelope_ref(batch_id, envelope))
                if not iam_lock.extend() or not trim(
                    keys=keys, args=[lock.token, len(chunk), lock.ttl_ms]
                ):
                    logger.warning("purge: lock lost after enqueuing batch %s; stopping", batch_id)
                    moved.status = "lock-lost"
                    return
            moved.records += len(chunk)
            moved.batches += 1
        moved.status = "budget"
    finally:
        if iam_lock.client is not client:
            iam_lock.client.close()


@contextmanager
def _held(lock: RedisLock) -> Iterator[bool]:
    # Take ``lock``, waiting up to IAM_LOCK_WAIT_S for its holder; yields whether it was taken
    # and releases it (if still ours) on the way out.
    give_up = time.monotonic() + IAM_LOCK_WAIT_S
    while not (taken := lock.acquire()) and time.monotonic() < give_up:
        time.sleep(0.05)
    try:
        yield taken
    finally:
        if taken:
            lock.release()


def _database_zero(client: redis.Redis) -> redis.Redis:
    # iam's lock client connects without selecting a database: the lock lives in database 0 of
    # the server that holds the list, whatever database the list is in (a cluster has only 0).
    if context_database(client) == 0:
        return client
    return same_server(client, db=0)


def chunk_digest(chunk: list[Any]) -> str:
    """A short hash of a chunk's items, in order (each length-prefixed, so items cannot run
    into each other): the part of a batch id that tells two chunks at one offset apart."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for item in chunk:
        raw = as_bytes(item)
        digest.update(len(raw).to_bytes(8, "big"))
        digest.update(raw)
    return digest.hexdigest()


def _epoch(context: WorkerContext) -> str:
    # Batch ids are <epoch>-<offset>-<digest>; the epoch is fixed the first time the list is purged.
    epoch_key = context.settings.key("purge", "epoch")
    context.redis.set(epoch_key, uuid.uuid4().hex[:12], nx=True)
    epoch = context.redis.get(epoch_key)
    return as_text(epoch) if epoch else "0"
