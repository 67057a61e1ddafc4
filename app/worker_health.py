"""The health endpoint of a worker started with ``--health-address HOST:PORT``.

Celery imports this module in the worker (the app's ``include``). The server starts in the
worker's main process when the worker initialises, before it connects to the broker, so
``/livez`` answers while the worker connects or reconnects; a prefork pool child closes its
inherited copy of the listening socket. ``/livez`` fails only when the worker or its consumer
is stopping, or the main thread has ended.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from celery import bootsteps, signals

from app.celery_app import app, health_address
from app.health import HealthServer
from app.stores.clients import redis_client

logger = logging.getLogger(__name__)

_STOPPING = (bootsteps.CLOSE, bootsteps.TERMINATE)
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


@signals.worker_init.connect
def _start(sender: Any, **_: Any) -> None:
    global _server
    address = health_address()
    if address is None or _server is not None:
        return
    settings = app.conf["_pump_settings"]
    _server = HealthServer(
        settings, redis_client(settings), address=address, liveness=lambda: worker_liveness(sender)
    )
    _server.start()


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
