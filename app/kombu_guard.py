"""A guard around kombu's Redis transport for a broker connection lost mid-flight.

When the Redis connection drops, the Celery consumer closes its channel before reconnecting, and
closing asks kombu to put the worker's unacknowledged tasks back at once. With the connection
already torn down, kombu (5.x) fails there with ``AttributeError`` ('NoneType' object has no
attribute 'hostname'), which Celery reports as an unrecoverable error: the worker exits instead
of reconnecting. Nothing is lost by skipping that step (the tasks stay in kombu's ``unacked``
hash and come back after the visibility timeout, as for a killed worker), so the guard logs it
and lets the channel close and the consumer reconnect.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)


def install() -> None:
    """Wrap the Redis transport's ``QoS.restore_unacked_once`` (idempotent)."""
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.restore_unacked_once
    if getattr(original, "guarded_by_iam_pump", False):
        return

    @functools.wraps(original)
    def restore_unacked_once(self: Any, stderr: Any = None) -> Any:
        try:
            return original(self, stderr)  # type: ignore[no-untyped-call]
        except AttributeError as exc:
            logger.warning(
                "broker connection gone while closing the channel (%s); its unacknowledged "
                "tasks stay in Redis and are redelivered after the visibility timeout",
                exc,
            )
            return None

    restore_unacked_once.guarded_by_iam_pump = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked_once = restore_unacked_once  # type: ignore[method-assign]
