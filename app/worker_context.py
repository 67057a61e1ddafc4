"""What a worker process needs to run the tasks, built once at process start.

Tasks receive it as ``self.context`` (:class:`tasks.policy.DeliveryTask`) instead of reaching
for module-level singletons: the settings, the Redis clients, the stores, the sender that
publishes follow-up tasks, and the pump host that opens, checks and closes this process's pumps.

The Celery app builds one in every worker process after the fork (``worker_process_init``), and
in the main process for the solo and threads pools (``worker_init``); a process that runs a task
without either (``celery beat`` running nothing, the command line's purge, eager tests) builds it
on first use. Tests build their own with :meth:`WorkerContext.build` and :func:`install_context`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from celery import Celery
from redis import Redis

from app.config import Settings
from app.messages import Sender
from app.stores.batches import BatchStore, EnvelopeStore
from app.stores.clients import broker_redis_client, redis_client
from app.stores.dead_letters import DeadLetterStore
from app.stores.ledger import Heartbeat, Ledger
from app.stores.stats import Stats
from pumps.host import PumpHost
from pumps.settings import load_pump_settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """One worker process's settings, connections, stores, sender and pumps."""

    settings: Settings
    redis: Redis
    #: The broker's Redis, where batch bytes are kept; None with another broker.
    broker_redis: Redis | None
    stats: Stats
    dead_letters: DeadLetterStore
    #: Where envelopes and clean batches are kept (the broker's Redis); None with RabbitMQ.
    envelopes: EnvelopeStore | None
    batches: BatchStore | None
    #: Every claim on kept bytes and its last progress, and this process's heartbeat for the
    #: writes it runs; None with RabbitMQ.
    ledger: Ledger | None
    heartbeat: Heartbeat | None
    sender: Sender
    pumps: PumpHost

    @classmethod
    def build(cls, settings: Settings, celery: Celery) -> WorkerContext:
        """A context for ``settings``; connections open lazily, pumps on first use."""
        client = redis_client(settings)
        broker = broker_redis_client(settings)
        ttl_s = settings.delivery.dedup_ttl_s
        envelopes = batches = ledger = heartbeat = None
        if broker is not None:
            envelopes = EnvelopeStore(broker, settings.key_prefix, done_ttl_s=ttl_s)
            batches = BatchStore(broker, settings.key_prefix, done_ttl_s=ttl_s)
            ledger = Ledger(broker, settings.key_prefix)
            heartbeat = Heartbeat(ledger)
        return cls(
            settings=settings,
            redis=client,
            broker_redis=broker,
            stats=Stats(client, settings),
            dead_letters=DeadLetterStore(client, settings),
            envelopes=envelopes,
            batches=batches,
            ledger=ledger,
            heartbeat=heartbeat,
            sender=Sender(celery, envelopes=envelopes, pumps=settings.enabled_pumps),
            pumps=PumpHost(settings),
        )

    def close(self) -> None:
        """Close the pumps and the connections (process shutdown); errors are logged."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.pumps.close()
        self.redis.close()
        if self.broker_redis is not None:
            self.broker_redis.close()


_lock = threading.Lock()
_current: WorkerContext | None = None


def install_context(context: WorkerContext | None) -> WorkerContext | None:
    """Make ``context`` this process's (None removes it); returns the one it replaces."""
    global _current
    with _lock:
        previous, _current = _current, context
    return previous


def current_context(celery: Celery) -> WorkerContext:
    """This process's context, built from the configuration on first use if none was installed."""
    global _current
    with _lock:
        if _current is None:
            _current = WorkerContext.build(load_pump_settings(), celery)
        return _current


def close_context() -> None:
    """Close and forget this process's context (worker shutdown); safe to call twice."""
    context = install_context(None)
    if context is not None:
        context.close()
