"""How many live workers consume each queue, asked of the workers through Celery's remote control.

``app.control.inspect().active_queues()`` broadcasts on the broker and collects the answers of
every worker that is alive to give one within a short timeout: each lists the queues it consumes.
No registry of our own is kept, so a worker that died (or stopped consuming a queue) is missing
from the very next answer. The answer is cached for :data:`CACHE_S`, so that probes and scrapes
arriving together cost one broadcast, and only one broadcast runs at a time: a broker that does
not answer holds one thread, not one per probe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

logger = logging.getLogger(__name__)

#: How long the workers get to answer the broadcast.
REPLY_TIMEOUT_S = 1.0
#: How long to wait for the broker's connection (no retry).
CONNECT_TIMEOUT_S = 2.0
#: How long an answer is reused.
CACHE_S = 2.0
#: An answer older than this is not reused while a new question hangs (a broker that stopped
#: answering mid-question): the census then reports the broker as not answering.
STALE_S = 3 * CACHE_S


@dataclass(frozen=True, slots=True)
class Census:
    """Consumers per queue at ``taken_at`` (time.time()), or why they could not be counted."""

    consumers: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    taken_at: float = 0.0

    def without_consumer(self) -> list[str]:
        """The queues no live worker consumes (none when the census failed: see ``error``)."""
        return [name for name, count in self.consumers.items() if count == 0]


class QueueConsumers:
    """Counts the consumers of ``queues`` (always reported, 0 when nobody consumes one) and of
    any other queue a worker says it consumes."""

    def __init__(
        self,
        celery: Celery,
        queues: Iterable[str],
        *,
        broker_url: str,
        cache_s: float = CACHE_S,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
    ) -> None:
        self.queues = list(queues)
        self._broker_url = broker_url
        self._cache_s = cache_s
        self._reply_timeout_s = reply_timeout_s
        # A client app of its own on ``broker_url``: the question goes out through this app's
        # producers, so it must be the broker the workers use (the worker app's may have been
        # configured from another file). It speaks the workers' serializer, as they accept
        # nothing else.
        self._client = Celery("iam_pump_census", broker=broker_url, set_as_current=False)
        self._client.conf.update(
            task_serializer=celery.conf.task_serializer,
            accept_content=celery.conf.accept_content,
            broker_connection_timeout=CONNECT_TIMEOUT_S,
            broker_transport_options={
                "max_retries": 1,
                "socket_timeout": CONNECT_TIMEOUT_S,
                "socket_connect_timeout": CONNECT_TIMEOUT_S,
            },
        )
        self._lock = threading.Lock()
        self._asking = threading.Lock()
        self._last: Census | None = None

    def census(self) -> Census:
        """The cached answer if fresh, else a new one; while another thread is asking, the last
        answer (or an error saying the question is pending)."""
        with self._lock:
            last = self._last
        if last is not None and time.time() - last.taken_at < self._cache_s:
            return last
        if not self._asking.acquire(blocking=False):
            if last is not None and time.time() - last.taken_at < STALE_S:
                return last
            return Census(error="the broker has not answered the last question", taken_at=0.0)
        try:
            fresh = self._ask()
        finally:
            self._asking.release()
        with self._lock:
            self._last = fresh
        return fresh

    def close(self) -> None:
        """Let go of the broker connections."""
        self._client.close()

    def _ask(self) -> Census:
        now = time.time()
        try:
            # Fail fast when the broker is away (publishing would wait for it).
            with self._client.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_S)
            inspect = self._client.control.inspect(timeout=self._reply_timeout_s)
            replies: dict[str, list[dict[str, Any]]] | None = inspect.active_queues()
        except Exception as exc:
            logger.debug("counting queue consumers failed: %s", exc)
            return Census(error=f"the broker did not answer: {exc}", taken_at=now)
        counts = dict.fromkeys(self.queues, 0)
        for queues in (replies or {}).values():
            for name in {queue.get("name") for queue in queues or ()}:
                if isinstance(name, str) and not name.endswith(".pidbox"):
                    counts[name] = counts.get(name, 0) + 1
        return Census(consumers=counts, taken_at=now)
