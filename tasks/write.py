"""The write task: one clean batch into one pump, with retries and dead letters.

Runs on queue ``pump.<name>``. The pump's ``timeout`` is the task's soft time limit (the hard
limit adds a few seconds) and the deadline the pump is handed. A temporary failure is retried
with backoff up to the pump's ``max-retries``; after that, or on a permanent failure, the batch
is kept in the dead-letter store with the error (:mod:`tasks.policy`). Records refused one by one
(by the size limit or by the sink) are kept there too, and the rest of the batch is committed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from app.celery_app import app
from app.codec import decode_clean_batch
from app.config import DEFAULT_PUMP_TIMEOUT_S
from app.messages import WRITE_TASK, BatchRef, legacy_ref
from app.record import AnalyticsRecord
from app.stores.batches import pump_claim
from app.stores.stats import PumpCounter, per_pump, write_duration
from pumps.deadline import Deadline
from pumps.errors import PumpConfigError, PumpPermanentError, PumpTemporaryError
from pumps.pipeline import run_pipeline
from tasks.policy import DeliveryTask, puts_back_on_trouble

logger = logging.getLogger(__name__)


class WriteTask(DeliveryTask):
    """Keeps a batch whose write was killed by the hard time limit.

    Celery acknowledges a task its hard time limit killed; this hook, which Celery calls in the
    worker before that acknowledgement, puts the batch in the dead letters first.
    """

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        pump = args[0]
        try:
            kwargs = kwargs or {}
            positional = args[1] if len(args) > 1 else None
            ref = _ref(
                self, kwargs.get("ref", positional), kwargs.get("payload"), kwargs.get("stored")
            )
            claim = pump_claim(pump)
            clean = self.load_batch(ref, self.context.batches, claim=claim, group=pump)
            if clean is None:
                return
            batch_id, records = decode_clean_batch(clean)
            error = f"write killed by the hard time limit ({exc})"
            self.dead_letter(pump, batch_id, clean, records=len(records), error=error)
            ref.release(self.context.batches, claim)
        except Exception:
            logger.critical(
                "pump %s: task %s hit its hard time limit and could not be dead-lettered",
                pump,
                task_id,
                exc_info=True,
            )


def _ref(task: DeliveryTask, ref: Any, payload: bytes | None, stored: str | None) -> BatchRef:
    # The batch of a write task, in this version's form or an earlier one's.
    batches = task.context.batches
    return legacy_ref(ref, payload, stored, stored_key=batches.key if batches else None)


@app.task(name=WRITE_TASK, base=WriteTask, bind=True)
@puts_back_on_trouble
def write(
    self: WriteTask,
    pump_name: str,
    ref: Any = None,
    *,
    payload: bytes | None = None,
    stored: str | None = None,
) -> dict[str, Any]:
    """Write the batch ``ref`` names with pump ``pump_name``; release the pump's claim after.

    ``payload`` and ``stored`` are the arguments of tasks published by earlier versions.
    """
    # The soft time limit's instant: Celery started its clock when this task started.
    entry = self.context.settings.pumps.get(pump_name)
    deadline = Deadline.after(entry.timeout_s if entry else DEFAULT_PUMP_TIMEOUT_S)
    batch = _ref(self, ref, payload, stored)
    claim = pump_claim(pump_name)
    with self.lease(batch, claim) as held:
        # Read under the lease: a copy that waited for it finds the claim already released.
        clean = self.load_batch(batch, self.context.batches, claim=claim, group=pump_name)
        if clean is None:
            return {"batch": batch.name, "written": 0}
        result = _write(self, pump_name, clean, deadline)
        held.release_claim(batch, self.context.batches, claim)
    return result


def _write(task: WriteTask, pump: str, clean: bytes, deadline: Deadline) -> dict[str, Any]:
    context = task.context
    batch_id, records = decode_clean_batch(clean)
    entry = context.settings.pumps.get(pump)
    if entry is None:
        error = f"pump {pump!r} is not in the configuration"
        task.dead_letter(pump, batch_id, clean, records=len(records), error=error)
        return {"batch": batch_id, "written": 0, "dead_lettered": len(records)}
    kept, rejects = run_pipeline(context.pumps.pipeline(pump), records)
    started = time.monotonic()
    try:
        refused = _call_sink(task, pump, kept, deadline=deadline, timeout_s=entry.timeout_s)
    except PumpPermanentError as exc:
        _observe_failed_write(task, pump, kept, started)
        task.dead_letter(pump, batch_id, clean, records=len(records), error=str(exc))
        return {"batch": batch_id, "written": 0, "dead_lettered": len(records)}
    except PumpTemporaryError as exc:
        _observe_failed_write(task, pump, kept, started)
        _set_aside(task, pump, batch_id, rejects)
        return task.retry_or_dead_letter(pump, batch_id, clean, records=len(records), error=exc)
    rejects += refused
    _set_aside(task, pump, batch_id, rejects)
    written = len(kept) - len(refused)
    context.stats.add(
        {
            per_pump(PumpCounter.WRITTEN_RECORDS, pump): written,
            per_pump(PumpCounter.WRITTEN_BATCHES, pump): 1,
            **(write_duration(pump, time.monotonic() - started) if kept else {}),
        }
    )
    return {"batch": batch_id, "written": written, "dead_lettered": len(rejects)}


def _observe_failed_write(
    task: WriteTask, pump: str, kept: list[AnalyticsRecord], started: float
) -> None:
    # A failed write's time counts too: a sink that times out is what the histogram must show.
    if kept:
        task.context.stats.add(write_duration(pump, time.monotonic() - started))


def _call_sink(
    task: WriteTask,
    pump: str,
    kept: list[AnalyticsRecord],
    *,
    deadline: Deadline,
    timeout_s: float,
) -> list[tuple[AnalyticsRecord, str]]:
    """The sink's own call: the records it refused one by one. Any failure but a permanent one
    comes out as :class:`PumpTemporaryError`, so that it is retried."""
    if not kept:
        return []
    try:
        result = task.context.pumps.pump(pump).write(kept, deadline=deadline)
    except (PumpPermanentError, PumpTemporaryError):
        raise
    except SoftTimeLimitExceeded as exc:
        message = f"write took longer than the pump timeout ({timeout_s}s)"
        raise PumpTemporaryError(message) from exc
    except PumpConfigError as exc:
        raise PumpTemporaryError(str(exc)) from exc
    except Exception as exc:
        logger.exception("pump %s: unexpected error writing a batch", pump)
        raise PumpTemporaryError(f"{type(exc).__name__}: {exc}") from exc
    return result.rejected


def _set_aside(
    task: WriteTask, pump: str, batch_id: str, rejects: list[tuple[AnalyticsRecord, str]]
) -> None:
    # Records refused one by one become one replayable dead letter; the rest goes on.
    if rejects:
        task.context.dead_letters.put_records(pump, batch_id, rejects, stage="records")
