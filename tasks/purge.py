"""The purge task: drain iam's Redis list into ingest batches without ever losing a record.

Beat runs it every ``purge-delay`` seconds on queue ``purge``. One run holds a lock
(``<prefix>:purge:lock``, ``SET NX PX`` with a random token), so runs never overlap across
processes or machines, and drains the list chunk by chunk (``delivery.purge-chunk-size``) until
it is empty or its time budget is spent:

A crash of the purge at any point loses nothing; the lock expires after
``delivery.purge-lock-ttl-s`` and the next run carries on.

1. read the head chunk with ``LRANGE`` (nothing is removed yet);
2. enqueue it as one ingest task whose batch id is ``<epoch>-<offset>``, the offset being how many
   records were ever removed from the list: the same chunk always gets the same id;
3. only then remove it: one script checks the lock is still ours, ``LTRIM``s the chunk and advances
   the offset atomically.

A crash before step 3 leaves the chunk in the list; the next run enqueues it again under the same
batch id, and ingest, which remembers which pumps got that batch, does not deliver it twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from app import runtime
from app.celery_app import app
from app.codec import encode_go_envelope
from app.redis_values import as_bytes, as_text
from tasks.batches import EnvelopeStore
from tasks.names import INGEST_QUEUE, INGEST_TASK, PURGE_TASK

logger = logging.getLogger(__name__)

#: Longest a single purge run drains before it lets the next scheduled run take over.
PURGE_RUN_BUDGET_S = 30.0

# KEYS: lock, list, offset; ARGV: token, count, lock ttl ms.
_TRIM_IF_OWNER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@app.task(name=PURGE_TASK, acks_late=False, ignore_result=True)
def purge() -> dict[str, Any]:
    """Drain the Redis list into ingest batches (see the module docstring)."""
    return drain()


def drain(*, budget_s: float = PURGE_RUN_BUDGET_S) -> dict[str, Any]:
    """One purge run; returns what it moved. Usable outside Celery (tests, the command line)."""
    settings = runtime.settings()
    client = runtime.redis_client()
    lock_key = settings.key("purge", "lock")
    offset_key = settings.key("purge", "offset")
    epoch_key = settings.key("purge", "epoch")
    list_key = settings.analytics_key
    chunk_size = settings.delivery.purge_chunk_size
    lock_ttl_ms = int(settings.delivery.purge_lock_ttl_s * 1000)
    token = uuid.uuid4().hex
    if not client.set(lock_key, token, nx=True, px=lock_ttl_ms):
        return {"status": "busy", "records": 0, "batches": 0}
    client.set(epoch_key, uuid.uuid4().hex[:12], nx=True)
    epoch = client.get(epoch_key)
    epoch_text = as_text(epoch) if epoch else "0"
    trim = client.register_script(_TRIM_IF_OWNER)
    records = batches = 0
    status = "drained"
    deadline = time.monotonic() + budget_s
    try:
        while True:
            if time.monotonic() >= deadline:
                status = "budget"
                break
            offset = int(client.get(offset_key) or 0)
            items = [as_bytes(item) for item in client.lrange(list_key, 0, chunk_size - 1)]
            if not items:
                break
            batch_id = f"{epoch_text}-{offset}"
            send_ingest(batch_id, encode_go_envelope(batch_id, items))
            if not trim(
                keys=[lock_key, list_key, offset_key], args=[token, len(items), lock_ttl_ms]
            ):
                logger.warning("purge: lock lost after enqueuing batch %s; stopping", batch_id)
                status = "lock-lost"
                break
            records += len(items)
            batches += 1
    finally:
        client.eval(_RELEASE_IF_OWNER, 1, lock_key, token)
        if records:
            client.hincrby(settings.key("stats"), "purged_records", records)
    if records:
        logger.info("purge: moved %d records in %d batches (%s)", records, batches, status)
    return {"status": status, "records": records, "batches": batches}


def send_ingest(batch_id: str, envelope: bytes) -> None:
    """Enqueue an ingest task for ``envelope``: by key when the broker is Redis, else inline."""
    settings = runtime.settings()
    if settings.batches_on_broker:
        store = EnvelopeStore(runtime.broker_redis_client(), settings.key_prefix)
        key = store.put(batch_id, envelope)
        app.send_task(INGEST_TASK, kwargs={"stored": key}, queue=INGEST_QUEUE)
    else:
        app.send_task(INGEST_TASK, args=(envelope,), queue=INGEST_QUEUE)
