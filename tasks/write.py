"""The write task: one clean batch into one pump, with retries and dead letters.

Runs on queue ``pump.<name>``. The pump's ``timeout`` is the task's soft time limit (the hard
limit adds a few seconds). A temporary failure is retried with exponential backoff and
jitter, up to the pump's ``max-retries``; after that, or on a permanent failure, the batch is
kept in the dead-letter store with the error. Records refused one by one (by the size limit or by
the sink) are kept there too, and the rest of the batch is committed.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from app import runtime
from app.celery_app import app
from app.codec import decode_clean_batch
from pumps.errors import PumpConfigError, PumpPermanentError, PumpTemporaryError
from pumps.pipeline import run_pipeline
from tasks.batches import BatchLostError, BatchStore
from tasks.dead_letters import DeadLetterStore
from tasks.names import WRITE_TASK
from tasks.retrying import delivery_backoff_s, retry_later

logger = logging.getLogger(__name__)


class WriteTask(Task):  # type: ignore[misc]
    """Keeps a batch whose write was killed by the hard time limit.

    Celery acknowledges a task its hard time limit killed; this hook, which Celery calls in the
    worker before that acknowledgement, puts the batch in the dead letters first.
    """

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        pump_name = args[0]
        kwargs = kwargs or {}
        stored = kwargs.get("stored")
        try:
            payload = args[1] if len(args) > 1 else kwargs.get("payload")
            if payload is None and stored is not None:
                try:
                    payload = _batches().fetch(stored)
                except BatchLostError as lost:
                    _dead_letters().put_lost(pump_name, stored, str(lost))
                    return
            if payload is None:
                return  # another copy of this task finished the batch
            batch_id, records = decode_clean_batch(payload)
            _dead_letters().put_batch(
                pump_name,
                batch_id,
                payload,
                stage="write",
                record_count=len(records),
                error=f"write killed by the hard time limit ({exc})",
            )
            if stored is not None:
                _batches().release(stored, pump_name)
        except Exception:
            logger.critical(
                "pump %s: task %s hit its hard time limit and could not be dead-lettered",
                pump_name,
                task_id,
                exc_info=True,
            )


def _batches() -> BatchStore:
    return BatchStore(runtime.broker_redis_client(), runtime.settings())


def _dead_letters() -> DeadLetterStore:
    return DeadLetterStore(runtime.redis_client(), runtime.settings())


@app.task(name=WRITE_TASK, base=WriteTask, bind=True, acks_late=True, max_retries=None)
def write(
    self: Task, pump_name: str, payload: bytes | None = None, stored: str | None = None
) -> dict[str, Any]:
    """Write a clean batch with pump ``pump_name``; Redis trouble puts it back for later.

    The batch is ``payload`` (its bytes) or ``stored`` (the id of a batch kept in Redis by the
    ingest task, released here once it is written or dead-lettered).
    """
    try:
        if payload is None:
            if stored is None:
                raise ValueError("a write task needs payload or stored")
            try:
                payload = _batches().fetch(stored)
            except BatchLostError as exc:
                _dead_letters().put_lost(pump_name, stored, str(exc))
                return {"batch": stored, "written": 0, "lost": True}
            if payload is None:
                # Every pump released it: a copy of this task already wrote it.
                logger.info("pump %s: batch %s was already written", pump_name, stored)
                return {"batch": stored, "written": 0, "already_written": True}
        result = _write(self, pump_name, payload)
        if stored is not None:
            _batches().release(stored, pump_name)
        return result
    except redis.RedisError as exc:
        logger.warning("pump %s: Redis unavailable (%s); batch put back", pump_name, exc)
        retry_later(self, exc, countdown_s=delivery_backoff_s(self.request.retries))
    except SoftTimeLimitExceeded as exc:
        # Outside the sink's own call (which counts as a failed attempt): decoding, dead
        # letters, the release. Try again rather than let the task fail and be acknowledged.
        logger.warning(
            "pump %s: the pump timeout ran out around the write; batch put back", pump_name
        )
        retry_later(self, exc, countdown_s=delivery_backoff_s(self.request.retries))


def _write(self: Task, pump_name: str, payload: bytes) -> dict[str, Any]:
    settings = runtime.settings()
    client = runtime.redis_client()
    dead_letters = DeadLetterStore(client, settings)
    batch_id, records = decode_clean_batch(payload)
    entry = settings.pumps.get(pump_name)
    attempts = self.request.retries + 1
    if entry is None:
        dead_letters.put_batch(
            pump_name,
            batch_id,
            payload,
            stage="write",
            attempts=attempts,
            error=f"pump {pump_name!r} is not in the configuration",
            record_count=len(records),
        )
        return {"batch": batch_id, "written": 0, "dead_lettered": len(records)}

    kept, rejects = run_pipeline(runtime.pipeline(pump_name), records)
    error: Exception | None = None
    written = 0
    try:
        if kept:
            result = runtime.pump(pump_name).write(kept)
            if result is not None and result.rejected:
                rejects.extend(result.rejected)
            written = len(kept) - (len(result.rejected) if result is not None else 0)
    except PumpPermanentError as exc:
        dead_letters.put_batch(
            pump_name,
            batch_id,
            payload,
            stage="write",
            attempts=attempts,
            error=str(exc),
            record_count=len(records),
        )
        logger.error("pump %s: batch %s dead-lettered: %s", pump_name, batch_id, exc)
        return {"batch": batch_id, "written": 0, "dead_lettered": len(records)}
    except SoftTimeLimitExceeded:
        error = PumpTemporaryError(f"write took longer than the pump timeout ({entry.timeout_s}s)")
    except (PumpTemporaryError, PumpConfigError) as exc:
        error = exc
    except Exception as exc:
        logger.exception("pump %s: unexpected error writing batch %s", pump_name, batch_id)
        error = PumpTemporaryError(f"{type(exc).__name__}: {exc}")

    if rejects:
        dead_letters.put_records(pump_name, batch_id, rejects, stage="records")
    if error is not None:
        return _retry_or_dead_letter(self, pump_name, batch_id, payload, len(records), error)

    stats = client.pipeline(transaction=False)
    stats.hincrby(settings.key("stats"), f"written_records:{pump_name}", written)
    stats.hincrby(settings.key("stats"), f"written_batches:{pump_name}", 1)
    stats.execute()
    return {"batch": batch_id, "written": written, "dead_lettered": len(rejects)}


def _retry_or_dead_letter(
    task: Task, pump_name: str, batch_id: str, payload: bytes, count: int, error: Exception
) -> dict[str, Any]:
    settings = runtime.settings()
    entry = settings.pumps[pump_name]
    retries = task.request.retries
    if retries >= entry.max_retries:
        _dead_letters().put_batch(
            pump_name,
            batch_id,
            payload,
            stage="write",
            attempts=retries + 1,
            error=str(error),
            record_count=count,
        )
        logger.error(
            "pump %s: batch %s dead-lettered after %d attempts: %s",
            pump_name,
            batch_id,
            retries + 1,
            error,
        )
        return {"batch": batch_id, "written": 0, "dead_lettered": count}
    countdown = delivery_backoff_s(retries)
    logger.warning(
        "pump %s: batch %s attempt %d failed (%s); retrying in %.1fs",
        pump_name,
        batch_id,
        retries + 1,
        error,
        countdown,
    )
    runtime.redis_client().hincrby(settings.key("stats"), f"retries:{pump_name}", 1)
    retry_later(task, error, countdown_s=countdown)
