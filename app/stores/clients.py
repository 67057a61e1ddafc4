"""Redis clients for the ``redis:`` server and for the broker's Redis, built from the settings."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.config import Settings, mask_url
from app.errors import ConfigError

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


def same_server(
    client: redis.Redis, *, max_connections: int | None = None, **changes: Any
) -> redis.Redis:
    """A new client for the server ``client`` talks to, with some connection settings changed
    (another database, shorter timeouts, no retries); the caller closes it."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, **changes}
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=max_connections, **kwargs
        )
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


#: How long the start-up certificate check may wait for the server.
CERTIFICATE_CHECK_TIMEOUT_S = 3.0


def check_certificate(url: str, *, source: str = "") -> None:
    """Raise :class:`ConfigError` when the Redis server at ``url`` fails TLS verification.

    Only a ``rediss://`` URL that verifies (``ssl_cert_reqs`` other than ``none``) is looked
    at. Called at start-up by the workers, beat, the command line and the reporter: a
    certificate that does not verify never heals by retrying, so it stops the process with the
    keys to fix instead of a retry loop. A server that is down or refuses the login is left to
    the usual retries and health checks.
    """
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.scheme != "rediss" or query.get("ssl_cert_reqs", ["required"])[0] == "none":
        return
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=CERTIFICATE_CHECK_TIMEOUT_S,
        socket_timeout=CERTIFICATE_CHECK_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        failure = _verification_failure(exc)
        if failure is None:
            return
        ca_file = query.get("ssl_ca_certs", [""])[0]
        trusted = f"the CA in {ca_file}" if ca_file else "the system's CAs"
        message = (
            f"TLS certificate verification failed for the Redis server at "
            f"{parts.hostname}:{parts.port or 6379} ({failure.verify_message or failure}) "
            f"against {trusted}: set redis.ssl-ca-file to the CA that signed the server's "
            f"certificate, make redis.host a name the certificate was issued for, or (not "
            f"recommended) set redis.ssl-insecure-skip-verify: true"
        )
        raise ConfigError([("redis.ssl-ca-file", message)], source=source) from None
    except OSError:
        return
    finally:
        client.close()


def _verification_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind a redis-py error, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
