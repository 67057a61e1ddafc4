"""The ingest task: validate a batch once, set bad records aside, fan out to every pump.

Runs on queue ``ingest``. Each enabled pump gets one write task on its own queue ``pump.<name>``
for the same clean batch (its bytes, or with the Redis broker the id of the batch kept once in
Redis: tasks/batches.py). Which pumps already have the batch is remembered in Redis
(``<prefix>:ingest:<batch id>``), so a redelivered ingest (worker killed mid fan-out, or the purge
enqueuing a chunk twice) sends only what is missing. Two copies of one batch never fan out at the
same time: the fan-out holds a short per-batch lock, and a copy that finds it taken comes back a
little later, when the markers tell it what is already done.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis
from celery import Task

from app import runtime
from app.celery_app import app
from app.codec import MalformedBatchError, Rejected, decode_envelope, encode_clean_batch
from app.redis_values import as_text
from tasks.batches import BatchLostError, BatchStore, EnvelopeStore
from tasks.dead_letters import INGEST_GROUP, DeadLetterStore
from tasks.names import INGEST_TASK, WRITE_TASK, pump_queue
from tasks.retrying import delivery_backoff_s, retry_later

logger = logging.getLogger(__name__)

#: How long a fan-out may hold its batch's lock (it takes milliseconds; a dead holder's lock
#: expires after this).
FAN_OUT_LOCK_TTL_MS = 10_000
#: When another copy holds the lock, try again after this long.
FAN_OUT_BUSY_RETRY_S = 2.0

_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@app.task(name=INGEST_TASK, bind=True, acks_late=True, max_retries=None)
def ingest(self: Task, payload: bytes | None = None, stored: str | None = None) -> dict[str, Any]:
    """Validate a batch envelope and send one write task per enabled pump.

    The envelope is ``payload`` (its bytes) or ``stored`` (the key of an envelope kept on the
    broker's Redis by the reporter or the purge: tasks/batches.py).
    """
    try:
        if payload is not None:
            return _ingest(self, payload)
        if stored is None:
            raise ValueError("an ingest task needs payload or stored")
        envelopes = EnvelopeStore(runtime.broker_redis_client(), runtime.settings().key_prefix)
        try:
            payload = envelopes.take(stored)
        except BatchLostError as exc:
            DeadLetterStore(runtime.redis_client(), runtime.settings()).put_lost(
                INGEST_GROUP, stored, str(exc)
            )
            return {"batch": stored, "records": 0, "lost": True}
        if payload is None:
            logger.info("ingest: %s was already fanned out", stored)
            return {"batch": stored, "records": 0, "already_ingested": True}
        result = _ingest(self, payload)
        envelopes.done(stored, ttl_s=runtime.settings().delivery.dedup_ttl_s)
        return result
    except redis.RedisError as exc:
        logger.warning("ingest: Redis unavailable (%s); batch put back", exc)
        retry_later(self, exc, countdown_s=delivery_backoff_s(self.request.retries))


def _ingest(self: Task, payload: bytes) -> dict[str, Any]:
    settings = runtime.settings()
    client = runtime.redis_client()
    dead_letters = DeadLetterStore(client, settings)
    try:
        batch_id, rows, rejected = decode_envelope(payload)
    except MalformedBatchError as exc:
        batch_id = f"unreadable-{self.request.id}"
        logger.warning("ingest: batch %s set aside: %s", batch_id, exc)
        dead_letters.put_malformed(batch_id, [Rejected(0, payload, str(exc))], error=str(exc))
        return {"batch": batch_id, "records": 0, "rejected": 1}
    if rejected:
        logger.warning(
            "ingest: batch %s: %d malformed record(s) set aside, first: %s",
            batch_id,
            len(rejected),
            rejected[0].reason,
        )
        dead_letters.put_malformed(batch_id, rejected)
    sent: list[str] = []
    if rows:
        sent = _fan_out_once(self, batch_id, encode_clean_batch(batch_id, rows))
    stats = client.pipeline(transaction=False)
    stats.hincrby(settings.key("stats"), "ingested_batches", 1)
    stats.hincrby(settings.key("stats"), "ingested_records", len(rows))
    stats.hincrby(settings.key("stats"), "malformed_records", len(rejected))
    stats.execute()
    return {"batch": batch_id, "records": len(rows), "rejected": len(rejected), "sent": sent}


def _fan_out_once(task: Task, batch_id: str, clean: bytes) -> list[str]:
    settings = runtime.settings()
    client = runtime.redis_client()
    lock_key = settings.key("ingest", batch_id, "lock")
    token = uuid.uuid4().hex
    if not client.set(lock_key, token, nx=True, px=FAN_OUT_LOCK_TTL_MS):
        logger.info("ingest: batch %s is being fanned out by another copy; later", batch_id)
        retry_later(task, None, countdown_s=FAN_OUT_BUSY_RETRY_S)
    try:
        return fan_out(batch_id, clean)
    finally:
        client.eval(_RELEASE_IF_OWNER, 1, lock_key, token)


def fan_out(batch_id: str, clean: bytes) -> list[str]:
    """Send the clean batch to each enabled pump that does not have it yet; return those sent.

    With the Redis broker the batch is kept once (tasks/batches.py) and each write task names
    it; otherwise each write task carries the bytes.
    """
    settings = runtime.settings()
    client = runtime.redis_client()
    sent_key = settings.key("ingest", batch_id)
    already = {as_text(name) for name in client.hkeys(sent_key)}
    missing = {name: entry for name, entry in settings.enabled_pumps.items() if name not in already}
    if not missing:
        return []
    by_id = settings.batches_on_broker
    if by_id:
        # Kept before any task names it; a copy redelivered mid fan-out keeps it again.
        BatchStore(runtime.broker_redis_client(), settings).hold(batch_id, clean, list(missing))
    sent = []
    for name, entry in missing.items():
        app.send_task(
            WRITE_TASK,
            args=(name,) if by_id else (name, clean),
            kwargs={"stored": batch_id} if by_id else None,
            queue=pump_queue(name),
            soft_time_limit=entry.timeout_s,
            time_limit=entry.hard_time_limit_s,
        )
        pipe = client.pipeline(transaction=True)
        pipe.hset(sent_key, name, 1)
        pipe.expire(sent_key, settings.delivery.dedup_ttl_s)
        pipe.execute()
        sent.append(name)
    return sent
