"""The health endpoint of a worker or beat started with ``--health-address HOST:PORT``.

Celery imports this module in the worker and in beat (the app's ``include``). In a worker the
server starts in the main process when the worker initialises, before it connects to the broker,
so ``/livez`` answers while the worker connects or reconnects; a prefork pool child closes its
inherited copy of the listening socket. A worker's ``/livez`` fails only when the worker or its
consumer is stopping, or the main thread has ended; beat's when its scheduler has not ticked for
:data:`BEAT_STALL_S` beyond its longest sleep (a publish waiting for a lost broker gives up well
before that), or it is stopping.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from celery import bootsteps, signals

from app.celery_app import app, health_address
from app.health import HealthServer, Liveness
from app.stores.clients import redis_client

logger = logging.getLogger(__name__)

_STOPPING = (bootsteps.CLOSE, bootsteps.TERMINATE)
#: How long beat's scheduler may go without a tick beyond its longest sleep before beat's
#: ``/livez`` fails.
BEAT_STALL_S = 120.0
_server: HealthServer | None = None


def worker_liveness(worker: Any) -> str | None:
    """None while ``worker`` (a Celery ``WorkController``) and its consumer run or reconnect,
    else why not."""
    if not threading.main_thread().is_alive():
        return "the worker's main thread has ended"
    if worker.blueprint.state in _STOPPING:
        return f"the worker is {worker.blueprint.human_state()}"
    consumer = getattr(worker, "consumer", None)
    if consumer is not None and consumer.blueprint.state in _STOPPING:
        return f"the consumer is {consumer.blueprint.human_state()}"
    return None


def beat_liveness(service: Any) -> str | None:
    """None while beat's ``service`` (a ``celery.beat.Service``) ticks, else why not."""
    if service._is_shutdown.is_set():
        return "beat is stopping"
    last_tick = getattr(service, "_last_tick", None)
    if last_tick is None:
        return None
    stalled_s = time.monotonic() - last_tick
    if stalled_s > service.scheduler.max_interval + BEAT_STALL_S:
        return f"beat's scheduler has not ticked for {stalled_s:.0f}s"
    return None


def _serve(liveness: Liveness) -> None:
    global _server
    address = health_address()
    if address is None or _server is not None:
        return
    settings = app.conf["_pump_settings"]
    _server = HealthServer(settings, redis_client(settings), address=address, liveness=liveness)
    _server.start()


@signals.worker_init.connect
def _start(sender: Any, **_: Any) -> None:
    _serve(lambda: worker_liveness(sender))


@signals.beat_init.connect
def _start_beat(sender: Any, **_: Any) -> None:
    _serve(lambda: beat_liveness(sender))


@signals.worker_process_init.connect
def _forget_in_child(**_: Any) -> None:
    # A forked pool child has the listening socket but no thread serving it: close its copy
    # (the parent's stays open) so the port is the main process's alone.
    global _server
    if _server is not None:
        with contextlib.suppress(OSError):
            _server.close_listener()
        _server = None


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None
