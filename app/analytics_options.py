"""The reporter's options: how it batches and where it ships (iam-authz-server's ``analytics:``).

Re-exported by :mod:`app.analytics`; import it from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.config import (
    DEFAULT_FLUSH_INTERVAL_MS,
    DEFAULT_KEY_PREFIX,
    DEFAULT_POOL_SIZE,
    DEFAULT_RECORDS_BUFFER_SIZE,
    RedisConfig,
    Settings,
    load_settings,
)

__all__ = ["AnalyticsOptions"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AnalyticsOptions:
    """How the reporter batches and where it ships (iam-authz-server's ``analytics:`` block)."""

    enable: bool = True
    pool_size: int = DEFAULT_POOL_SIZE
    records_buffer_size: int = DEFAULT_RECORDS_BUFFER_SIZE
    flush_interval_ms: int = DEFAULT_FLUSH_INTERVAL_MS
    enable_detailed_recording: bool = True
    #: Seconds after which stores may forget a record whose ``expire_at`` is unset; 0 is iam's
    #: "never" (``expire_at`` 100 years ahead).
    record_expiration_s: float = 0
    transport: Literal["celery", "redis-list"] = "celery"
    #: Publish from a helper process fed through a pipe (the default), or from threads in this
    #: process when False (an embedded interpreter, whose ``sys.executable`` is not Python).
    helper_process: bool = True
    broker_url: str = "redis://127.0.0.1:6379/0"
    redis_url: str = "redis://127.0.0.1:6379/0"
    analytics_key: str = "analytics-iam-system-analytics"
    #: Prefix of the keys that hold envelopes on a Redis broker (the pump's ``key-prefix``).
    key_prefix: str = DEFAULT_KEY_PREFIX
    #: The ``redis:`` block, when it names a Redis Cluster or a master behind Sentinel: the
    #: ``redis-list`` transport then pushes there (``redis_url`` names one server only).
    redis: RedisConfig | None = None

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if self.records_buffer_size < 1:
            raise ValueError("records_buffer_size must be at least 1")
        if self.flush_interval_ms < 1:
            raise ValueError("flush_interval_ms must be at least 1")

    @classmethod
    def from_settings(cls, settings: Settings) -> AnalyticsOptions:
        """Options from validated settings: the ``analytics:`` block plus the connections."""
        block = settings.analytics
        return cls(
            enable=block.enable,
            pool_size=block.pool_size,
            records_buffer_size=block.records_buffer_size,
            flush_interval_ms=block.flush_interval,
            enable_detailed_recording=block.enable_detailed_recording,
            record_expiration_s=block.record_expiration_time,
            transport=block.transport,
            helper_process=block.helper_process,
            broker_url=settings.broker,
            redis_url=settings.redis.url,
            analytics_key=settings.analytics_key,
            key_prefix=settings.key_prefix,
            redis=settings.redis if settings.redis.mode != "single" else None,
        )

    @classmethod
    def from_yaml(cls, path: str) -> AnalyticsOptions:
        """Options from an iam-pump YAML file; raises :class:`~app.errors.ConfigError`."""
        return cls.from_settings(load_settings(path))

    @property
    def batch_size(self) -> int:
        """Records per batch: ``records-buffer-size / pool-size``, at least one."""
        return max(1, self.records_buffer_size // self.pool_size)
