"""The delivery policy, in one place: how a task that carries a batch retries, backs off, gives
up, and never drops its message.

* Redis trouble (``RedisError``, or kombu's ``OperationalError`` when a follow-up task cannot
  be published) or a soft time limit that lands outside a sink's own call puts
  the task back for later (:func:`puts_back_on_trouble`), with the backoff of the ``delivery:``
  settings.
* Putting back never lets the message be dropped. Celery's ``Task.retry`` publishes a new message
  and, if that publish fails, raises ``Reject(requeue=False)``, which deletes the original: a
  broker hiccup would lose the batch. :meth:`DeliveryTask.put_back` turns that case into
  ``Reject(requeue=True)``; if even that cannot reach the broker, the message stays
  unacknowledged and comes back after the visibility timeout.
* A failed write is retried up to the pump's ``max-retries`` and then kept as a dead letter
  (:meth:`DeliveryTask.retry_or_dead_letter`); every outcome adds to the named counters of
  :mod:`app.stores.stats`.
* Bytes that a task names but that are gone from Redis are reported (a ``lost`` dead letter,
  ``lost_batches``), never taken for done (:meth:`DeliveryTask.load_batch`).

Acknowledgement itself is global (``task_acks_late``, ``task_reject_on_worker_lost`` in
``celeryconfig``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, ParamSpec, TypeVar

import redis
from celery import Task
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError
from redis.exceptions import RedisClusterException

from app.backoff import backoff_s
from app.messages import BatchRef
from app.stores.batches import BatchLostError, BatchStore, ByteStore
from app.stores.clients import pipelines_scripts
from app.stores.ledger import LEASE_TTL_MS, ledger_member
from app.stores.locks import RedisLock
from app.stores.stats import PumpCounter, per_pump
from app.worker_context import WorkerContext, current_context

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class DeliveryTask(Task):  # type: ignore[misc]
    """Base of the tasks that carry batches (ingest, write); see the module docstring."""

    max_retries = None  # puts back as long as it takes; write attempts have their own budget

    @property
    def context(self) -> WorkerContext:
        """This worker process's context."""
        return current_context(self.app)

    @property
    def attempt(self) -> int:
        """Which delivery of this message is running (1 for the first)."""
        return int(self.request.retries) + 1

    def backoff_s(self) -> float:
        """How long to wait before the next attempt, from the ``delivery:`` settings."""
        delivery = self.context.settings.delivery
        return backoff_s(
            self.request.retries,
            base_s=delivery.retry_backoff_base_s,
            max_s=delivery.retry_backoff_max_s,
        )

    def put_back(self, exc: BaseException | None, *, countdown_s: float | None = None) -> NoReturn:
        """Run this task again later; never lets its message be dropped."""
        self._progress()
        try:
            wait_s = self.backoff_s() if countdown_s is None else countdown_s
            raise self.retry(countdown=wait_s, exc=exc)
        except Retry:
            raise
        except Exception as publish_error:
            raise Reject(f"retry not published: {publish_error}", requeue=True) from publish_error

    def load_batch(
        self, ref: BatchRef, store: ByteStore | None, *, claim: str, group: str
    ) -> bytes | None:
        """The batch's bytes, or None when there is nothing to do: a copy of this task already
        finished with them, or they are gone from Redis (then reported as a ``lost`` entry).

        Either way ``claim`` is settled in the ledger; while there is work, the ledger learns
        that a task for it started (the stores record that with the read itself).
        """
        if ref.key is not None:
            self.request.ledger_member = ledger_member(claim, ref.key)
        try:
            data = ref.load(store, claim)
        except BatchLostError as exc:
            self.context.dead_letters.put_lost(group, ref.name, str(exc))
            data = None
        else:
            if data is None:
                logger.info("%s: batch %s was already done by another copy", group, ref.name)
        if data is None:
            ref.release(store, claim)
        # Otherwise the store's load told the ledger, in the same round trip, that a task for
        # ``claim`` started.
        return data

    @contextlib.contextmanager
    def lease(self, ref: BatchRef, claim: str) -> Iterator[Held]:
        """Hold the lease of ``claim`` while the body runs, renewed by this process's heartbeat,
        so no other copy of the task writes the batch at the same time. A copy that finds the
        lease taken is put back until the holder is done or its lease has expired.

        The body gives up its claim with the :class:`Held` it gets (the lease goes in the same
        round trip)."""
        context = self.context
        if ref.key is None or context.ledger is None or context.heartbeat is None:
            yield Held(None)
            return
        member = ledger_member(claim, ref.key)
        lease = context.ledger.lease(member, LEASE_TTL_MS)
        if not lease.acquire():
            wait_s = lease.left_ms() / 1000 + 1
            logger.info("%s: another copy is writing batch %s; put back", claim, ref.name)
            self.put_back(None, countdown_s=wait_s)
        context.heartbeat.add(member, lease)
        held = Held(lease)
        try:
            yield held
        finally:
            context.heartbeat.remove(member)
            if not held.lease_released:
                lease.release()

    def _progress(self) -> None:
        # Record in the ledger that this task's claim moves (started, or will run again).
        member = getattr(self.request, "ledger_member", None)
        ledger = self.context.ledger
        if member and ledger is not None:
            with contextlib.suppress(redis.RedisError):
                ledger.touch([member])

    def retry_or_dead_letter(
        self, pump: str, batch_id: str, clean: bytes, *, records: int, error: Exception
    ) -> dict[str, Any]:
        """A write failed: retry it with backoff, or keep the batch as a dead letter once the
        pump's ``max-retries`` are spent."""
        context = self.context
        if self.request.retries >= context.settings.pumps[pump].max_retries:
            self.dead_letter(pump, batch_id, clean, records=records, error=str(error))
            return {"batch": batch_id, "written": 0, "dead_lettered": records}
        countdown_s = self.backoff_s()
        logger.warning(
            "pump %s: batch %s attempt %d failed (%s); retrying in %.1fs",
            pump,
            batch_id,
            self.attempt,
            error,
            countdown_s,
        )
        context.stats.add({per_pump(PumpCounter.RETRIES, pump): 1})
        self.put_back(error, countdown_s=countdown_s)

    def dead_letter(
        self, pump: str, batch_id: str, clean: bytes, *, records: int, error: str
    ) -> None:
        """Keep a whole batch that ``pump`` could not write, with the error."""
        self.context.dead_letters.put_batch(
            pump,
            batch_id,
            clean,
            stage="write",
            attempts=self.attempt,
            error=error,
            record_count=records,
        )
        logger.error(
            "pump %s: batch %s dead-lettered after %d attempt(s): %s",
            pump,
            batch_id,
            self.attempt,
            error,
        )


class Held:
    """What the body of :meth:`DeliveryTask.lease` holds: the lease, if the task has one."""

    def __init__(self, lease: RedisLock | None) -> None:
        self.lease = lease
        self.lease_released = False

    def release_claim(self, ref: BatchRef, store: BatchStore | None, claim: str) -> None:
        """Give up ``claim`` on the batch and, in the same round trip, the lease (it is on the
        same server: the ledger is where the bytes are)."""
        lease = self.lease
        if (
            lease is None
            or ref.key is None
            or store is None
            or lease.client is not store.client
            or not pipelines_scripts(store.client)
        ):
            ref.release(store, claim)
            return
        pipe = store.client.pipeline(transaction=False)
        store.release_in(pipe, ref.key, claim)
        lease.release_in(pipe)
        released, lease_result = pipe.execute(raise_on_error=False)
        # A lease whose release failed is released again when the block ends.
        self.lease_released = not isinstance(lease_result, Exception)
        if isinstance(released, Exception):
            raise released


def puts_back_on_trouble(body: Callable[P, R]) -> Callable[P, R]:
    """Wrap a bound task's body: Redis trouble or a stray soft time limit puts the task back."""

    @functools.wraps(body)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        task = args[0]
        assert isinstance(task, DeliveryTask)
        try:
            return body(*args, **kwargs)
        except (redis.RedisError, RedisClusterException, OperationalError) as exc:
            # RedisClusterException: a Redis Cluster whose slots are moving or not all served
            # (a failover under way), which redis-py does not count as a RedisError.
            # OperationalError: kombu could not publish a follow-up task (a broker that is
            # away, or a Redis broker that is full): the batch must not be taken for done.
            logger.warning("%s: Redis unavailable (%s); batch put back", task.name, exc)
            task.put_back(exc)
        except SoftTimeLimitExceeded as exc:
            # Outside a sink's own call (which counts as a failed write): decoding, dead
            # letters, the release. Try again rather than let the task fail and be acknowledged.
            logger.warning("%s: the time limit ran out around the write; put back", task.name)
            task.put_back(exc)

    return run
