"""The least a Redis ACL user needs to run the pump: commands, key patterns, pub/sub channels.

Workers, beat (the purge), the reporter, ``iam-pump status`` / ``dead-letters`` and the health
endpoint together use exactly these, so a user with :func:`acl_setuser` rules and nothing else
runs all of them (``tests/security/test_redis_acl.py`` runs the integration suite as such a
user, and checks that anything else is refused).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from app.config import IAM_LOCK_KEY, Settings, broker_is_redis

#: Commands, grouped by what needs them. No CONFIG, FLUSH*, KEYS, ACL, DEBUG or SHUTDOWN.
COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("connection", ("ping", "hello", "select", "time")),
    (
        "strings: envelopes, locks, purge offsets",
        ("get", "set", "del", "strlen", "incrby", "expire", "pexpire", "pttl", "persist"),
    ),
    (
        "lists: iam's list, the Celery queues (LINDEX: the oldest element's age, /metrics)",
        ("llen", "lindex", "lpush", "rpush", "brpop", "lrange", "ltrim"),
    ),
    (
        "hashes: batches, dead letters, stats, kombu's unacked",
        (
            "hset",
            "hget",
            "hgetall",
            "hdel",
            "hexists",
            "hkeys",
            "hmget",
            "hvals",
            "hlen",
            "hincrby",
            "hscan",
        ),
    ),
    (
        "sets: dead-letter groups, kombu's bindings, the prometheus pump's usernames",
        ("sadd", "srem", "smembers", "sismember", "scard"),
    ),
    (
        "sorted sets: kombu's unacked index and bindings, the ledger",
        ("zadd", "zrem", "zcard", "zrange", "zrangebyscore", "zscore"),
    ),
    ("scripts: locks, the purge step, kombu", ("eval", "evalsha", "script|load", "script|exists")),
    ("transactions", ("multi", "exec", "discard", "watch", "unwatch")),
    ("key scans under our prefix", ("scan",)),
    (
        "pub/sub: Celery remote control and events",
        ("publish", "psubscribe", "punsubscribe"),
    ),
)

#: Keys of a Celery/kombu Redis broker: the queues (with their priority lists, the queue's name
#: followed by ``\\x06\\x16`` and a digit), the unacked hash, index and mutex, the exchange
#: bindings, remote-control reply queues and event receiver queues.
CELERY_KEY_PATTERNS = (
    "ingest*",
    "purge*",
    "pump.*",
    "unacked*",
    "_kombu.binding*",
    "*.celery.pidbox*",
    "celeryev.*",
)


def celery_channels(database: int) -> tuple[str, ...]:
    """The pub/sub channels kombu uses on database ``database`` (its fanout prefix is ``/<db>.``).

    PSUBSCRIBE patterns are matched literally by Redis ACLs, so each is listed as kombu spells it.
    """
    prefix = f"/{database}."
    return (f"{prefix}celery.pidbox", f"{prefix}celeryev/*", f"{prefix}celeryev/worker.*")


def key_patterns(settings: Settings) -> tuple[str, ...]:
    """Our keys (on a Redis Cluster with their hash tag, and as they are on the broker), iam's
    list and lock and, with a Redis broker, Celery's keys."""
    prefixes = dict.fromkeys((settings.redis_key_prefix, settings.key_prefix))
    own = (*(f"{prefix}:*" for prefix in prefixes), settings.analytics_key, IAM_LOCK_KEY)
    return own + (CELERY_KEY_PATTERNS if broker_is_redis(settings.broker) else ())


def broker_database(settings: Settings) -> int | None:
    """The database number of a Redis broker (None for another broker)."""
    if not broker_is_redis(settings.broker):
        return None
    path = urlsplit(settings.broker).path.strip("/")
    return int(path) if path.isdigit() else 0


def acl_rules(settings: Settings) -> list[str]:
    """The ``ACL SETUSER`` rules (after the user name and password) for these settings."""
    database = broker_database(settings)
    channels = celery_channels(database) if database is not None else ()
    commands = [name for _, names in COMMANDS for name in names]
    return [
        "reset",
        "on",
        *(f"~{pattern}" for pattern in key_patterns(settings)),
        *(f"&{channel}" for channel in channels),
        "-@all",
        *(f"+{command}" for command in commands),
    ]


def acl_setuser(settings: Settings, *, user: str = "iam-pump", password: str = "CHANGE-ME") -> str:
    """A ready ``ACL SETUSER`` line for ``redis-cli`` (or a ``user`` line of an ACL file)."""
    rules = acl_rules(settings)
    return " ".join(["ACL", "SETUSER", user, *rules[:2], f">{password}", *rules[2:]])
