"""The ingest task: validate a batch once, set bad records aside, fan out to every pump.

Runs on queue ``ingest``. Each enabled pump gets one write task on its own queue ``pump.<name>``
for the same clean batch (its bytes, or with the Redis broker the key of the batch kept once in
Redis: :mod:`app.stores.batches`). Which pumps already have the batch is remembered in Redis
(``<prefix>:ingest:<batch id>``), so a redelivered ingest (worker killed mid fan-out, or the purge
enqueuing a chunk twice) sends only what is missing. Two copies of one batch never fan out at the
same time: the fan-out holds a short per-batch lock, and a copy that finds it taken comes back a
little later, when the markers tell it what is already done.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from app.celery_app import app
from app.codec import MalformedBatchError, Rejected, decode_envelope, encode_clean_batch
from app.messages import INGEST_TASK, BatchRef, legacy_ref
from app.stores.batches import INGEST_CLAIM
from app.stores.clients import pipelines_scripts
from app.stores.dead_letters import INGEST_GROUP
from app.stores.locks import RedisLock
from app.stores.stats import Counter
from app.stores.values import as_text
from app.worker_context import WorkerContext
from tasks.policy import DeliveryTask, puts_back_on_trouble

logger = logging.getLogger(__name__)

#: How long a fan-out may hold its batch's lock (it takes milliseconds; a dead holder's lock
#: expires after this).
FAN_OUT_LOCK_TTL_MS = 10_000
#: When another copy holds the lock, try again after this long.
FAN_OUT_BUSY_RETRY_S = 2.0


@app.task(name=INGEST_TASK, base=DeliveryTask, bind=True)
@puts_back_on_trouble
def ingest(
    self: DeliveryTask, ref: Any = None, *, payload: bytes | None = None, stored: str | None = None
) -> dict[str, Any]:
    """Validate the envelope ``ref`` names and send one write task per enabled pump.

    ``payload`` and ``stored`` are the arguments of tasks published by earlier versions.
    """
    context = self.context
    batch = legacy_ref(ref, payload, stored)
    envelope = self.load_batch(batch, context.envelopes, claim=INGEST_CLAIM, group=INGEST_GROUP)
    if envelope is None:
        return {"batch": batch.name, "records": 0}
    result = _ingest(self, envelope)
    batch.release(context.envelopes, INGEST_CLAIM)
    return result


def _ingest(task: DeliveryTask, envelope: bytes) -> dict[str, Any]:
    context = task.context
    try:
        batch_id, rows, rejected = decode_envelope(envelope)
    except MalformedBatchError as exc:
        batch_id = f"unreadable-{task.request.id}"
        logger.warning("ingest: batch %s set aside: %s", batch_id, exc)
        context.dead_letters.put_malformed(
            batch_id, [Rejected(0, envelope, str(exc))], error=str(exc)
        )
        return {"batch": batch_id, "records": 0, "rejected": 1}
    if rejected:
        logger.warning(
            "ingest: batch %s: %d malformed record(s) set aside, first: %s",
            batch_id,
            len(rejected),
            rejected[0].reason,
        )
        context.dead_letters.put_malformed(batch_id, rejected)
    counts: dict[str, int] = {
        Counter.INGESTED_BATCHES: 1,
        Counter.INGESTED_RECORDS: len(rows),
        Counter.MALFORMED_RECORDS: len(rejected),
    }
    sent: list[str] = []
    if rows:
        sent = _fan_out_once(task, batch_id, encode_clean_batch(batch_id, rows), counts)
    else:
        context.stats.add(counts)
    return {"batch": batch_id, "records": len(rows), "rejected": len(rejected), "sent": sent}


def _fan_out_once(
    task: DeliveryTask, batch_id: str, clean: bytes, counts: dict[str, int]
) -> list[str]:
    # Round trips: the lock and the markers are read together, and the lock's release goes with
    # the counters; the fan-out itself is unchanged.
    context = task.context
    lock = RedisLock(
        context.redis, context.settings.key("ingest", batch_id, "lock"), ttl_ms=FAN_OUT_LOCK_TTL_MS
    )
    pipe = context.redis.pipeline(transaction=False)
    lock.acquire_in(pipe)
    pipe.hkeys(context.settings.key("ingest", batch_id))
    taken, already = pipe.execute()
    if not taken:
        logger.info("ingest: batch %s is being fanned out by another copy; later", batch_id)
        task.put_back(None, countdown_s=FAN_OUT_BUSY_RETRY_S)
    try:
        sent = fan_out(context, batch_id, clean, already=already)
    except BaseException:
        lock.release()
        raise
    released: object = None
    if pipelines_scripts(context.redis):
        pipe = context.redis.pipeline(transaction=False)
        lock.release_in(pipe)
        context.stats.add(counts, pipe=pipe)
        released, *added = pipe.execute(raise_on_error=False)
        context.stats.check(counts, added)
    else:  # a cluster: the lock's script on its own
        try:
            lock.release()
        except redis.RedisError as exc:
            released = exc
        context.stats.add(counts)
    if isinstance(released, Exception):
        logger.warning("ingest: lock of batch %s not released (%s); it expires", batch_id, released)
    return sent


def fan_out(
    context: WorkerContext, batch_id: str, clean: bytes, *, already: list[Any] | None = None
) -> list[str]:
    """Send the clean batch to each enabled pump that does not have it yet; return those sent.

    With the Redis broker the batch is kept once (:mod:`app.stores.batches`) and each write task
    names it; otherwise each write task carries the bytes. ``already``: the pumps marked as sent
    (``HKEYS`` of the batch's marker hash) when the caller read them; read here otherwise.
    """
    settings = context.settings
    sent_key = settings.key("ingest", batch_id)
    if already is None:
        already = context.redis.hkeys(sent_key)
    done = {as_text(name) for name in already}
    missing = [name for name in settings.enabled_pumps if name not in done]
    if not missing:
        return []
    if context.batches is not None:
        # Kept before any task names it; a copy redelivered mid fan-out keeps it again.
        key = context.batches.key(batch_id)
        context.batches.hold(key, clean, missing)
        ref = BatchRef(key=key)
    else:
        ref = BatchRef(inline=clean)
    for name in missing:
        context.sender.send_write(name, ref)
        pipe = context.redis.pipeline(transaction=True)
        pipe.hset(sent_key, name, 1)
        pipe.expire(sent_key, settings.delivery.dedup_ttl_s)
        pipe.execute()
    return missing
