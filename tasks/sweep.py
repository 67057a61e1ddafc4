"""The ledger sweep: send again the task of any kept batch whose claim stopped moving.

Beat runs it every ``delivery.sweep-interval-s`` seconds on queue ``purge`` (Redis broker only:
with another broker batches travel inside their messages and the broker's own acknowledgements
keep them). A task message can be lost where no acknowledgement covers it: kombu pops a message
before it records it as unacknowledged, a broker restarted without persistence forgets its
queues, an operator purges one. The batch bytes are still kept with the claim of each pump that
has not written them, and every claim is in the ledger (:mod:`app.stores.ledger`) with the time
of its last progress. One run:

1. takes the claims with no progress for ``delivery.redelivery-window-s``;
2. reads the task messages waiting in their queues and in kombu's ``unacked`` hash: a claim whose
   task is there is waiting its turn (a backlog, or a dead worker's task that kombu will restore),
   so it is only marked as seen;
3. sends the task of every other claim again and marks it.

A claim is settled exactly once whatever the number of copies of its task: a copy that finds its
claim released does nothing, and a running write holds a lease that keeps other copies waiting
(:meth:`tasks.policy.DeliveryTask.lease`).
"""

from __future__ import annotations

import logging
import time
from itertools import chain
from typing import Any

from app.celery_app import app
from app.messages import INGEST_QUEUE, SWEEP_TASK, claim_in_message, pump_queue
from app.stores.batches import PUMP_CLAIM_PREFIX
from app.stores.broker_queues import unacked_messages, waiting_messages
from app.stores.ledger import split_member
from app.stores.locks import RedisLock
from app.stores.stats import Counter
from app.worker_context import WorkerContext, current_context

logger = logging.getLogger(__name__)

#: Most claims one run looks at (the oldest first); the next run takes the rest.
SWEEP_BATCH = 1000
#: How long a sweep that died holding its lock keeps others out.
SWEEP_LOCK_TTL_MS = 60_000


@app.task(name=SWEEP_TASK, acks_late=False)
def sweep() -> dict[str, Any]:
    """One sweep of the ledger (see the module docstring); acknowledged early, like the purge."""
    return sweep_ledger()


def sweep_ledger(context: WorkerContext | None = None) -> dict[str, Any]:
    """One run; returns how many stale claims it found waiting and how many it sent again.
    Usable outside Celery (tests, the command line)."""
    if context is None:
        context = current_context(app)
    ledger, batches = context.ledger, context.batches
    if ledger is None or batches is None or context.broker_redis is None:
        return {"status": "no-ledger", "stale": 0, "waiting": 0, "resent": 0}
    lock = RedisLock(context.redis, context.settings.key("sweep", "lock"), ttl_ms=SWEEP_LOCK_TTL_MS)
    if not lock.acquire():
        return {"status": "busy", "stale": 0, "waiting": 0, "resent": 0}
    try:
        window_s = context.settings.delivery.redelivery_window_s
        stale = ledger.stale(window_s, limit=SWEEP_BATCH)
        if not stale:
            return {"status": "ok", "stale": 0, "waiting": 0, "resent": 0}
        queues = {INGEST_QUEUE} | {
            pump_queue(claim[len(PUMP_CLAIM_PREFIX) :])
            for claim, _key in (split_member(member) for member, _ in stale)
            if claim.startswith(PUMP_CLAIM_PREFIX)
        }
        broker = context.broker_redis
        queued = {
            member
            for raw in chain(waiting_messages(broker, sorted(queues)), unacked_messages(broker))
            if (member := claim_in_message(raw, stored_key=batches.key)) is not None
        }
        waiting = [member for member, _ in stale if member in queued]
        ledger.touch(waiting)
        resent = 0
        now = time.time()
        for member, seen in stale:
            if member in queued or ledger.progress_of(member) != seen:
                continue  # waiting its turn, settled, or a task for it started meanwhile
            claim, key = split_member(member)
            logger.warning(
                "sweep: %s of %s made no progress for %.0fs and no task carries it; sent again",
                claim,
                key,
                now - seen,
            )
            context.sender.send_again(claim, key)
            ledger.touch([member])
            resent += 1
        if resent:
            context.stats.add({Counter.RESENT_TASKS: resent})
        return {"status": "ok", "stale": len(stale), "waiting": len(waiting), "resent": resent}
    finally:
        lock.release()
