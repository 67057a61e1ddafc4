"""Redis clients for the ``redis:`` server and for the broker's Redis, built from the settings.

The ``redis:`` block reaches one server, a Redis Cluster (``enable-cluster``: redis-py's
:class:`~redis.cluster.RedisCluster`) or a master through Sentinel (``master-name``: redis-py's
:meth:`Sentinel.master_for <redis.sentinel.Sentinel.master_for>`, a client that follows
failovers). The stores are written against :class:`redis.Redis`; a cluster client is handed to
them as one, which holds because every command and script of ours touches keys of one hash slot
(:attr:`app.config.Settings.redis_key_prefix`).
"""

from __future__ import annotations

import ssl
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from app.config import RedisConfig, Settings, mask_url
from app.errors import ConfigError

DEFAULT_REDIS_CONNECT_TIMEOUT_S = 5.0
DEFAULT_REDIS_SOCKET_TIMEOUT_S = 10.0
#: How often an idle pooled connection is pinged before use, so a restarted Redis is noticed.
HEALTH_CHECK_INTERVAL_S = 30


def pipelines_scripts(client: redis.Redis) -> bool:
    """Whether a pipeline of ``client`` can carry scripts (``EVAL``): not a cluster's, whose
    pipelines refuse them; callers then run each script on its own."""
    return not isinstance(client, RedisCluster)


def redis_client(settings: Settings) -> redis.Redis:
    """A client for the ``redis:`` server: iam's list, our state keys, the dead letters."""
    return config_client(settings.redis)


def config_client(config: RedisConfig) -> redis.Redis:
    """A pooled client for what a ``redis:`` block names: one server, a cluster, or the master
    its sentinels name (found again after a failover)."""
    socket = _socket_timeouts(config)
    login: dict[str, Any] = {
        "username": config.username or None,
        "password": config.password or None,
    }
    max_connections = config.optimisation_max_active or None
    if config.mode == "cluster":
        cluster = RedisCluster(
            startup_nodes=[_node(host, port) for host, port in config.addresses],
            max_connections=max_connections or 2**31,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            **login,
            **socket,
        )
        return cast(redis.Redis, cluster)
    if config.mode == "sentinel":
        # iam's go-redis asks the sentinels without a login; the login is the master's.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(config.addresses),
            sentinel_kwargs=dict(socket),
            db=config.database,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            **login,
            **socket,
        )
        master = sentinel.master_for(  # type: ignore[no-untyped-call]
            config.master_name, redis_class=SentinelMaster, max_connections=max_connections
        )
        return cast(redis.Redis, master)
    return _from_url(config.url, config)


class SentinelMaster(redis.Redis):
    """A client for the master Sentinel names, whose ``close`` also closes the connections to
    the sentinels (redis-py leaves them open; they reconnect if the client is used again)."""

    def close(self) -> None:
        super().close()
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            for sentinel in pool.sentinel_manager.sentinels:
                sentinel.close()


def broker_redis_client(settings: Settings) -> redis.Redis | None:
    """A client for the broker's Redis, where batch bytes are kept; None for another broker."""
    if not settings.batches_on_broker:
        return None
    return client_for(settings.broker, settings)


def client_for(url: str, settings: Settings) -> redis.Redis:
    """A pooled client for ``url`` with the ``redis:`` block's pool size and timeouts."""
    return _from_url(url, settings.redis)


def _from_url(url: str, config: RedisConfig) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        max_connections=config.optimisation_max_active or None,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        **_socket_timeouts(config),
    )


def _socket_timeouts(config: RedisConfig) -> dict[str, Any]:
    # The ``redis:`` block's ``timeout`` bounds the connect; a command may wait a bit longer.
    connect_timeout_s = config.timeout or DEFAULT_REDIS_CONNECT_TIMEOUT_S
    return {
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": max(connect_timeout_s, DEFAULT_REDIS_SOCKET_TIMEOUT_S),
    }


def same_server(
    client: redis.Redis, *, max_connections: int | None = None, **changes: Any
) -> redis.Redis:
    """A new client for the server ``client`` talks to, with some connection settings changed
    (another database, shorter timeouts, no retries); the caller closes it. For a cluster, the
    same cluster; for a master found through Sentinel, that master, still found through the
    sentinels."""
    if isinstance(client, RedisCluster):
        node = client.get_default_node().redis_connection
        kept = node.connection_pool.connection_kwargs if node is not None else {}
        login: dict[str, Any] = {name: kept[name] for name in _CLUSTER_KEPT if name in kept}
        changes.pop("db", None)  # a cluster has database 0 only
        cluster = RedisCluster(
            startup_nodes=[_node(n.host, n.port) for n in client.get_nodes()],
            max_connections=max_connections or 2**31,
            **{**login, **changes},
        )
        return cast(redis.Redis, cluster)
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        master = pool.sentinel_manager.master_for(
            pool.service_name,
            redis_class=SentinelMaster,
            max_connections=max_connections,
            **changes,
        )
        return cast(redis.Redis, master)
    kwargs = {**pool.connection_kwargs, **changes}
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=max_connections, **kwargs
        )
    )


def _node(host: str, port: int) -> ClusterNode:
    return ClusterNode(host, port)  # type: ignore[no-untyped-call]


def context_database(client: redis.Redis) -> int:
    """The database number ``client`` works in (always 0 on a Redis Cluster)."""
    if isinstance(client, RedisCluster):
        return 0
    return int(client.connection_pool.connection_kwargs.get("db", 0))


#: What a copy of a cluster client keeps of the original's connection settings.
_CLUSTER_KEPT = (
    "username",
    "password",
    "socket_timeout",
    "socket_connect_timeout",
    "health_check_interval",
)


def batch_servers(settings: Settings) -> list[tuple[str, redis.Redis]]:
    """The Redis servers that keep our data, each named for messages: the ``redis:`` server,
    and the broker's Redis when that is another server. The caller closes the clients."""
    servers = [(f"the redis: server ({settings.redis.describe()})", redis_client(settings))]
    state = settings.redis.url if settings.redis.mode == "single" else None
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
