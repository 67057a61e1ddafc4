"""The ingest task: validate a batch once, set bad records aside, fan out to every pump.

Runs on queue ``ingest``. Each enabled pump gets one write task on its own queue ``pump.<name>``,
carrying the same clean batch bytes. Which pumps already have the batch is remembered in Redis
(``<prefix>:ingest:<batch id>``), so a redelivered ingest (worker killed mid fan-out, or the purge
enqueuing a chunk twice) only sends what is missing.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from app import runtime
from app.celery_app import app
from app.codec import MalformedBatchError, decode_envelope, encode_clean_batch
from app.redis_values import as_text
from tasks.dead_letters import DeadLetterStore
from tasks.names import INGEST_TASK, WRITE_TASK, pump_queue

logger = logging.getLogger(__name__)


@app.task(name=INGEST_TASK, bind=True, acks_late=True)
def ingest(self: Task, payload: bytes) -> dict[str, Any]:
    """Validate ``payload`` (a batch envelope) and send one write task per enabled pump."""
    settings = runtime.settings()
    client = runtime.redis_client()
    dead_letters = DeadLetterStore(client, settings)
    try:
        batch_id, rows, rejected = decode_envelope(payload)
    except MalformedBatchError as exc:
        batch_id = f"unreadable-{self.request.id}"
        logger.warning("ingest: batch %s set aside: %s", batch_id, exc)
        from app.codec import Rejected

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
    if rows:
        fan_out(batch_id, encode_clean_batch(batch_id, rows))
    stats = client.pipeline(transaction=False)
    stats.hincrby(settings.key("stats"), "ingested_batches", 1)
    stats.hincrby(settings.key("stats"), "ingested_records", len(rows))
    stats.hincrby(settings.key("stats"), "malformed_records", len(rejected))
    stats.execute()
    return {"batch": batch_id, "records": len(rows), "rejected": len(rejected)}


def fan_out(batch_id: str, clean: bytes, *, only: list[str] | None = None) -> list[str]:
    """Send the clean batch to each enabled pump (or to ``only``) that does not have it yet."""
    settings = runtime.settings()
    client = runtime.redis_client()
    sent_key = settings.key("ingest", batch_id)
    already = {as_text(name) for name in client.hkeys(sent_key)}
    sent = []
    for name, entry in settings.enabled_pumps.items():
        if name in already or (only is not None and name not in only):
            continue
        app.send_task(
            WRITE_TASK,
            args=(name, clean),
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
