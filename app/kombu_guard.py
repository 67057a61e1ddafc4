"""Guards around kombu's Redis transport, so the worker neither dies nor drops a task when Redis
misbehaves under it.

* **Connection lost mid-flight.** When the Redis connection drops, the Celery consumer closes its
  channel before reconnecting, and closing asks kombu to put the worker's unacknowledged tasks
  back at once. With the connection already torn down, kombu (5.x) fails there with
  ``AttributeError`` ('NoneType' object has no attribute 'hostname'), which Celery reports as an
  unrecoverable error: the worker exits instead of reconnecting. Nothing is lost by skipping that
  step (the tasks stay in kombu's ``unacked`` hash and come back after the visibility timeout, as
  for a killed worker), so the guard logs it and lets the channel close and the consumer
  reconnect.
* **Acknowledging or putting back on a channel whose connection is gone.** A task that
  finishes just as the consumer reconnects is acknowledged (or, when it failed for the outage,
  put back) on the old channel, whose connection kombu has already dropped: kombu fails with
  ``AttributeError`` ('NoneType' object has no attribute 'client') and the worker exits. The
  task is still in the ``unacked`` hash, so the guard logs it and lets the task come back after
  the visibility timeout; a copy of a finished task finds its claim released and does nothing
  (``tasks.policy``).
* **Redis full** (``maxmemory`` under ``noeviction``: every write that needs memory is refused
  with OOM). Putting a task back (``Reject(requeue=True)``, and the restore at shutdown) pushes it
  onto its queue, which Redis refuses; kombu's transaction is then not applied, so the task is
  still in the ``unacked`` hash, but the error killed the worker. The guard logs it and leaves the
  task there: it comes back after the visibility timeout. And a task just fetched (``BRPOP``,
  which Redis allows) is recorded in the ``unacked`` hash before it runs; if Redis refuses that
  write the task exists only in this process, so the guard holds it and retries the write until
  Redis takes it, rather than let the error drop it. Acknowledging frees memory, but kombu does
  it in a ``MULTI`` transaction, which a full Redis refuses whatever it holds; the guard then
  removes the task with the same two commands outside a transaction, which Redis accepts.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import redis

logger = logging.getLogger(__name__)

#: How long a task fetched while Redis is full waits between attempts to record it as unacked.
APPEND_RETRY_MAX_S = 1.0
#: At most one "Redis is full" warning per this many seconds while a fetched task waits.
APPEND_WARNING_INTERVAL_S = 10.0


def install() -> None:
    """Wrap the Redis transport's ``QoS`` methods named in the module docstring (idempotent)."""
    from kombu.transport import redis as kombu_redis

    qos = kombu_redis.QoS
    if getattr(qos.restore_unacked_once, "guarded_by_iam_pump", False):
        return
    _guard_restore_unacked_once(qos)
    _guard_reject(qos)
    _guard_append(qos)
    _guard_ack(qos)


def _mark(function: Any) -> Any:
    function.guarded_by_iam_pump = True
    return function


def _guard_restore_unacked_once(qos: Any) -> None:
    original = qos.restore_unacked_once

    @functools.wraps(original)
    def restore_unacked_once(self: Any, stderr: Any = None) -> Any:
        try:
            return original(self, stderr)
        except AttributeError as exc:
            logger.warning(
                "broker connection gone while closing the channel (%s); its unacknowledged "
                "tasks stay in Redis and are redelivered after the visibility timeout",
                exc,
            )
            return None
        except redis.ResponseError as exc:
            logger.warning(
                "Redis refused to put this worker's unacknowledged tasks back (%s); they stay "
                "in Redis and are redelivered after the visibility timeout",
                exc,
            )
            return None

    qos.restore_unacked_once = _mark(restore_unacked_once)


def _guard_reject(qos: Any) -> None:
    original = qos.reject

    @functools.wraps(original)
    def reject(self: Any, delivery_tag: Any, requeue: bool = False) -> Any:
        if not requeue:
            return self.ack(delivery_tag)
        try:
            self.restore_by_tag(delivery_tag, leftmost=True)
        except AttributeError as exc:
            # Put back on a channel whose connection is gone (a task that failed on a Redis
            # outage, rejected as the consumer reconnects): as for an ack there, the task is
            # still unacknowledged in Redis and comes back after the visibility timeout.
            logger.warning(
                "broker connection gone before task %s was put back (%s); it stays "
                "unacknowledged in Redis and is redelivered after the visibility timeout",
                delivery_tag,
                exc,
            )
        except redis.ResponseError as exc:
            # The restore is one transaction, not applied: the task is still unacknowledged in
            # Redis. Forget it here only; it comes back after the visibility timeout.
            logger.warning(
                "Redis refused to put task %s back (%s); it stays unacknowledged in Redis and "
                "is redelivered after the visibility timeout",
                delivery_tag,
                exc,
            )
        super(qos, self).ack(delivery_tag)
        return None

    qos.reject = _mark(reject)


def _guard_append(qos: Any) -> None:
    original = qos.append

    @functools.wraps(original)
    def append(self: Any, message: Any, delivery_tag: Any) -> Any:
        attempt, warned_at = 0, float("-inf")
        while True:
            try:
                return original(self, message, delivery_tag)
            except redis.ResponseError as exc:
                now = time.monotonic()
                if now - warned_at >= APPEND_WARNING_INTERVAL_S:
                    warned_at = now
                    logger.warning(
                        "Redis refused to record fetched task %s as unacknowledged (%s); "
                        "holding it and retrying until Redis takes it",
                        delivery_tag,
                        exc,
                    )
                attempt += 1
                time.sleep(min(APPEND_RETRY_MAX_S, 0.05 * 2**attempt))

    qos.append = _mark(append)


def _guard_ack(qos: Any) -> None:
    original = qos.ack

    @functools.wraps(original)
    def ack(self: Any, delivery_tag: Any) -> Any:
        try:
            return original(self, delivery_tag)
        except AttributeError as exc:
            logger.warning(
                "broker connection gone before task %s was acknowledged (%s); it stays "
                "unacknowledged in Redis and is redelivered after the visibility timeout",
                delivery_tag,
                exc,
            )
            super(qos, self).ack(delivery_tag)
            return None
        except redis.ResponseError:
            # A full Redis refuses every command inside MULTI; the same removal outside one is
            # accepted (neither command needs memory).
            with self.channel.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
                pipe.zrem(self.unacked_index_key, delivery_tag)
                pipe.hdel(self.unacked_key, delivery_tag)
                pipe.execute()
            super(qos, self).ack(delivery_tag)
            return None

    qos.ack = _mark(ack)
