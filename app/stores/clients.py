"""Redis clients for the ``redis:`` server and for the broker's Redis, built from the settings."""

from __future__ import annotations

import redis

from app.config import Settings, mask_url

DEFAULT_REDIS_CONNECT_TIMEOUT_S = 5.0
DEFAULT_REDIS_SOCKET_TIMEOUT_S = 10.0
#: How often an idle pooled connection is pinged before use, so a restarted Redis is noticed.
HEALTH_CHECK_INTERVAL_S = 30


def redis_client(settings: Settings) -> redis.Redis:
    """A client for the ``redis:`` server: iam's list, our state keys, the dead letters."""
    return client_for(settings.redis.url, settings)


def broker_redis_client(settings: Settings) -> redis.Redis | None:
    """A client for the broker's Redis, where batch bytes are kept; None for another broker."""
    if not settings.batches_on_broker:
        return None
    return client_for(settings.broker, settings)


def client_for(url: str, settings: Settings) -> redis.Redis:
    """A pooled client for ``url`` with the ``redis:`` block's pool size and timeouts."""
    config = settings.redis
    connect_timeout_s = config.timeout or DEFAULT_REDIS_CONNECT_TIMEOUT_S
    return redis.Redis.from_url(
        url,
        max_connections=config.optimisation_max_active or None,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=max(connect_timeout_s, DEFAULT_REDIS_SOCKET_TIMEOUT_S),
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )


def batch_servers(settings: Settings) -> list[tuple[str, redis.Redis]]:
    """The Redis servers that keep our data, each named for messages: the ``redis:`` server,
    and the broker's Redis when that is another server. The caller closes the clients."""
    state = settings.redis.url
    servers = [(f"the redis: server ({mask_url(state)})", redis_client(settings))]
    if settings.batches_on_broker and settings.broker != state:
        broker = f"the broker's Redis ({mask_url(settings.broker)})"
        servers.append((broker, client_for(settings.broker, settings)))
    return servers
