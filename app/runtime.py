"""Per-process state of a worker: the settings, the Redis client, the open pumps.

Nothing here runs at import time. Each piece is made on first use, in the process that uses it
(after a prefork child is forked), and the pumps are closed when the process shuts down.
"""

from __future__ import annotations

import logging
import threading
from functools import cache

import redis

from app.config import Settings, load_settings
from pumps.base import Pump
from pumps.errors import PumpError
from pumps.pipeline import Step, build_pipeline
from pumps.registry import resolve_pump_class

logger = logging.getLogger(__name__)

DEFAULT_REDIS_CONNECT_TIMEOUT_S = 5.0
DEFAULT_REDIS_SOCKET_TIMEOUT_S = 10.0

_lock = threading.Lock()
_pumps: dict[str, Pump] = {}


@cache
def settings() -> Settings:
    """The validated settings of this process (read once)."""
    return load_settings()


def redis_client(current: Settings | None = None) -> redis.Redis:
    """The Redis client for the list, our state keys and the dead letters."""
    config = (current or settings()).redis
    return _redis_for(
        config.url,
        config.optimisation_max_active or None,
        config.timeout or DEFAULT_REDIS_CONNECT_TIMEOUT_S,
    )


def broker_redis_client(current: Settings | None = None) -> redis.Redis:
    """A Redis client for the broker's server, where batch bytes are kept (tasks/batches.py)."""
    chosen = current or settings()
    config = chosen.redis
    return _redis_for(
        chosen.broker,
        config.optimisation_max_active or None,
        config.timeout or DEFAULT_REDIS_CONNECT_TIMEOUT_S,
    )


@cache
def _redis_for(url: str, max_connections: int | None, connect_timeout_s: float) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        max_connections=max_connections,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=max(connect_timeout_s, DEFAULT_REDIS_SOCKET_TIMEOUT_S),
        health_check_interval=30,
    )


def pump(name: str) -> Pump:
    """The open pump called ``name``, opened on first use in this process."""
    with _lock:
        existing = _pumps.get(name)
        if existing is not None:
            return existing
        entry = settings().pumps[name]
        instance = resolve_pump_class(entry.type).create(
            name, entry.meta, timeout_s=entry.timeout_s
        )
        instance.open()
        _pumps[name] = instance
        return instance


@cache
def pipeline(name: str) -> list[Step]:
    """The record transforms for pump ``name``."""
    current = settings()
    entry = current.pumps[name]
    try:
        handles_size = resolve_pump_class(entry.type).handles_record_size
    except PumpError:
        handles_size = False  # the write itself will report the pump as unusable
    return build_pipeline(
        entry,
        omit_detailed_globally=current.omit_detailed_recording,
        size_limit_step=not handles_size,
    )


def close_pumps() -> None:
    """Close every open pump (worker shutdown); errors are logged, not raised."""
    with _lock:
        opened = list(_pumps.items())
        _pumps.clear()
    for name, instance in opened:
        try:
            instance.close()
        except Exception:
            logger.exception("closing pump %s failed", name)
