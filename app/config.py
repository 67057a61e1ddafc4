"""The configuration: one YAML file in iam-pump's own format, validated once at start-up.

Keys are those of iam's ``iam-pump.yaml`` (``purge-delay``, ``pumps``, ``redis``, ...) plus the
reporter's ``analytics:`` block from ``iam-authz-server.yaml``, so an existing iam file works as it
is. ``${VAR}`` and ``${VAR:-default}`` expand from the environment; a value that is nothing but a
reference to an unset variable (iam's own files use ``${REDIS_HOST}``) counts as not given, so the
default applies. Every problem is reported with its key path, and :class:`ConfigError` is raised
before anything touches data.

The models, their defaults and the loader are here, so that what each key defaults to is read in
one place; the ``redis:`` block (server, login, TLS) is in :mod:`app.config_redis`, the model base
in :mod:`app.config_model`, and the text handling (``${VAR}``, Go durations, masking) in
:mod:`app.config_text`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.config_env import annotate, apply_env_overrides
from app.config_model import ConfigModel as _Model
from app.config_model import kebab as _kebab
from app.config_redis import RedisConfig as RedisConfig
from app.config_redis import cluster_key_prefix
from app.config_text import (
    check_tree,
    expand_env,
    is_secret,
    load_yaml,
    parse_duration_s,
    shown_value,
)
from app.config_text import (
    mask_url as mask_url,
)
from app.errors import ConfigError
from app.redaction import DeadLetterFields, Treatment

logger = logging.getLogger(__name__)

CONFIG_ENV_VAR = "IAM_PUMP_CONFIG"
DEFAULT_ANALYTICS_KEY = "analytics-iam-system-analytics"
DEFAULT_KEY_PREFIX = "iam-pump"
DEFAULT_PURGE_DELAY_S = 10
DEFAULT_PURGE_CHUNK_SIZE = 1000
DEFAULT_PUMP_TIMEOUT_S = 30
DEFAULT_MAX_RETRIES = 8
DEFAULT_RETRY_BACKOFF_BASE_S = 1.0
DEFAULT_RETRY_BACKOFF_MAX_S = 30.0
DEFAULT_MAX_RECORD_SIZE_BYTES = 1_048_576
DEFAULT_POOL_SIZE = 4
DEFAULT_RECORDS_BUFFER_SIZE = 20_000
DEFAULT_FLUSH_INTERVAL_MS = 200
DEFAULT_STORAGE_EXPIRATION_S = 24 * 3600
DEFAULT_DEDUP_TTL_S = 24 * 3600
#: Where /healthz and /metrics listen when the file does not say: this machine only (iam's
#: default is 0.0.0.0:7070; exposing them is a choice made by setting the address).
DEFAULT_HEALTH_CHECK_ADDRESS = "127.0.0.1:7070"
#: How long the purge lock outlives a purge that died holding it (renewed at every chunk).
DEFAULT_PURGE_LOCK_TTL_S = 30.0
#: The Go iam-pump's lock (its redsync mutex), in database 0 of iam's Redis; the purge takes it
#: too. Fixed, as in iam.
IAM_LOCK_KEY = "iam-pump"
#: Expiry of iam's own lock (the Go iam-pump's redsync mutex ``iam-pump``: 10 minutes).
DEFAULT_IAM_LOCK_TTL_S = 600.0
#: On SIGTERM, how long running tasks may go on before the unfinished ones are requeued; keep it
#: below your orchestrator's grace period (Kubernetes: 30 s).
DEFAULT_SOFT_SHUTDOWN_TIMEOUT_S = 10.0
#: What a stopping worker needs after its soft shutdown: requeue the unfinished tasks (each broker
#: command waits at most celeryconfig's 15 s socket timeout) and exit (5 s).
SHUTDOWN_REQUEUE_MARGIN_S = 20.0
#: A claim on kept bytes with no progress for this long has its task sent again (the ledger
#: sweep, Redis broker), and how often the sweep looks.
DEFAULT_REDELIVERY_WINDOW_S = 120.0
DEFAULT_SWEEP_INTERVAL_S = 30.0
#: Time the write task's hard limit adds to its soft limit, so a pump can clean up.
HARD_LIMIT_GRACE_S = 5
#: The Redis transport redelivers unacknowledged tasks after this margin past the longest task.
VISIBILITY_MARGIN_S = 30

#: Checks the raw ``pumps:`` mapping's ``meta`` blocks; returns (key path, message) pairs.
MetaProblems = Callable[[Any], list[tuple[str, str]]]


class FiltersConfig(_Model):
    """Which records a pump receives: ``skip-usernames`` wins over ``usernames``."""

    usernames: tuple[str, ...] = ()
    skip_usernames: tuple[str, ...] = Field(
        default=(), validation_alias=AliasChoices("skip-usernames", "skip_usernames")
    )


class PumpEntryConfig(_Model):
    """One entry of ``pumps:``: the common fields; ``meta`` is validated by the pump's class.

    An empty or missing ``type`` is the entry's key, as iam reads it (``pumps: {csv: {...}}``);
    :class:`Settings` fills it in, so ``type`` is never empty once loaded.
    """

    type: str = ""
    enabled: bool = True
    filters: FiltersConfig = FiltersConfig()
    timeout: float = Field(default=DEFAULT_PUMP_TIMEOUT_S, ge=0)
    omit_detailed_recording: bool = False
    max_record_size_bytes: int = Field(default=DEFAULT_MAX_RECORD_SIZE_BYTES, ge=64)
    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0, le=100)
    dead_letters: DeadLetterFields = DeadLetterFields()
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("type", mode="before")
    @classmethod
    def _no_type(cls, value: Any) -> Any:
        return "" if value is None else value

    @property
    def timeout_s(self) -> float:
        """The write task's soft time limit (iam's 0, "no timeout", becomes the default)."""
        return self.timeout or float(DEFAULT_PUMP_TIMEOUT_S)

    @property
    def hard_time_limit_s(self) -> float:
        """The write task's hard time limit."""
        return self.timeout_s + HARD_LIMIT_GRACE_S


class AnalyticsConfig(_Model):
    """The reporter's ``analytics:`` block (iam-authz-server's keys plus ``transport``)."""

    enable: bool = True
    pool_size: int = Field(default=DEFAULT_POOL_SIZE, ge=1, le=256)
    records_buffer_size: int = Field(default=DEFAULT_RECORDS_BUFFER_SIZE, ge=1)
    flush_interval: int = Field(default=DEFAULT_FLUSH_INTERVAL_MS, ge=1, description="ms")
    enable_detailed_recording: bool = True
    #: iam's TTL on the Redis list; accepted, and reported as ignored: the list never expires here.
    storage_expiration_time: float = DEFAULT_STORAGE_EXPIRATION_S
    #: Seconds until stores may forget a record the reporter stamps; 0 = never (100 years).
    record_expiration_time: float = Field(default=0, ge=0)
    transport: Literal["celery", "redis-list"] = "celery"
    #: Publish from a helper process (``python -m app.analytics_helper``) fed through a pipe;
    #: false publishes from threads in the application's own process (where ``sys.executable``
    #: is not a Python interpreter, e.g. an embedded one such as uWSGI's).
    helper_process: bool = True

    @field_validator("storage_expiration_time", "record_expiration_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration_s(value)


class DeliveryConfig(_Model):
    """How hard we try before a batch becomes a dead letter, and how the Redis list is drained."""

    retry_backoff_base_s: float = Field(default=DEFAULT_RETRY_BACKOFF_BASE_S, gt=0)
    retry_backoff_max_s: float = Field(default=DEFAULT_RETRY_BACKOFF_MAX_S, gt=0)
    purge_chunk_size: int = Field(default=DEFAULT_PURGE_CHUNK_SIZE, ge=1, le=100_000)
    dedup_ttl_s: int = Field(default=DEFAULT_DEDUP_TTL_S, ge=60)
    visibility_timeout_s: float | None = Field(default=None, gt=0)
    soft_shutdown_timeout_s: float = Field(default=DEFAULT_SOFT_SHUTDOWN_TIMEOUT_S, ge=0)
    purge_lock_ttl_s: float = Field(default=DEFAULT_PURGE_LOCK_TTL_S, ge=1)
    #: Expiry of the ``iam-pump`` lock shared with a Go iam-pump, held around each chunk.
    iam_lock_ttl_s: float = Field(default=DEFAULT_IAM_LOCK_TTL_S, ge=1)
    redelivery_window_s: float = Field(default=DEFAULT_REDELIVERY_WINDOW_S, ge=15)
    sweep_interval_s: float = Field(default=DEFAULT_SWEEP_INTERVAL_S, ge=1)
    #: Start even when a Redis we keep batches on may evict any key (``allkeys-*``).
    allow_evicting_redis: bool = False


class LogConfig(_Model):
    """iam's ``log:`` block. ``level`` and ``format`` set up the ``iam-pump`` commands' logging;
    iam's other keys are accepted so an iam file loads, and reported as ignored at start-up."""

    level: Literal["debug", "info", "warn", "warning", "error", "dpanic", "panic", "fatal"] = "info"
    format: Literal["console", "json"] = "console"
    name: str | None = None
    development: bool | None = None
    enable_color: bool | None = None
    disable_color: bool | None = None
    enable_caller: bool | None = None
    disable_caller: bool | None = None
    disable_stacktrace: bool | None = None
    output_paths: str | None = None
    error_output_paths: str | None = None

    @property
    def python_level(self) -> str:
        """The ``logging`` level name for ``level`` (zap's dpanic/panic/fatal are CRITICAL)."""
        return {
            "warn": "WARNING",
            "dpanic": "CRITICAL",
            "panic": "CRITICAL",
            "fatal": "CRITICAL",
        }.get(self.level, self.level.upper())


def split_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` as a host (empty: every interface) and a port; raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host or "0.0.0.0", int(port)


class Settings(_Model):
    """The whole validated configuration."""

    purge_delay: int = Field(default=DEFAULT_PURGE_DELAY_S, ge=1)
    health_check_path: str = "healthz"
    health_check_address: str = DEFAULT_HEALTH_CHECK_ADDRESS
    omit_detailed_recording: bool = False
    analytics_key: str = Field(default=DEFAULT_ANALYTICS_KEY, min_length=1)
    key_prefix: str = Field(default=DEFAULT_KEY_PREFIX, min_length=1)
    broker_url: str | None = None
    redis: RedisConfig = RedisConfig()
    analytics: AnalyticsConfig = AnalyticsConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    log: LogConfig = LogConfig()
    dead_letters: DeadLetterFields = DeadLetterFields()
    pumps: dict[str, PumpEntryConfig] = Field(default_factory=dict)
    source: str = Field(default="", exclude=True)
    #: Each key set by an ``IAM_PUMP_`` variable (dotted path -> variable), see app.config_env.
    env_overrides: dict[str, str] = Field(default_factory=dict, exclude=True)

    @field_validator("pumps")
    @classmethod
    def _pump_names(cls, pumps: dict[str, PumpEntryConfig]) -> dict[str, PumpEntryConfig]:
        for name in pumps:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"pump name {name!r} must be letters, digits, '_', '.', '-'")
        return {
            name: entry if entry.type else entry.model_copy(update={"type": name})
            for name, entry in pumps.items()
        }

    @field_validator("health_check_address")
    @classmethod
    def _address(cls, value: str) -> str:
        split_address(value)
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"expected a Celery broker URL like amqp://... got {value!r}")
        if value is not None:
            urlsplit(value).port  # noqa: B018 - raises ValueError on a URL kombu cannot read
        return value

    @model_validator(mode="after")
    def _redis_mode(self) -> Settings:
        mode = self.redis.mode
        if mode != "single" and self.broker_url is None:
            which = "redis.enable-cluster" if mode == "cluster" else "redis.master-name"
            raise ValueError(
                f"broker-url: required with {which}: Celery's Redis transport talks to one "
                f"server; name an ordinary Redis (redis://...) or RabbitMQ (amqp://...)"
            )
        if mode == "cluster":
            cluster_key_prefix(self.key_prefix, self.analytics_key)
        return self

    @property
    def redis_key_prefix(self) -> str:
        """The prefix of our Redis keys: ``key-prefix``, and on a Redis Cluster with the hash tag
        of ``analytics-key`` in front, so every key of ours shares the slot of iam's list
        (:func:`app.config_redis.cluster_key_prefix`)."""
        if self.redis.mode == "cluster":
            return cluster_key_prefix(self.key_prefix, self.analytics_key)
        return self.key_prefix

    @property
    def broker(self) -> str:
        """The Celery broker URL: ``broker-url`` or the ``redis:`` server."""
        return self.broker_url or self.redis.url

    @property
    def batches_on_broker(self) -> bool:
        """Whether batch bytes are kept on the broker (a Redis server) and tasks name them.

        Otherwise (RabbitMQ) batches travel inside the messages; see tasks/batches.py.
        """
        return broker_is_redis(self.broker)

    @property
    def enabled_pumps(self) -> dict[str, PumpEntryConfig]:
        """The pumps that receive batches."""
        return {name: entry for name, entry in self.pumps.items() if entry.enabled}

    @property
    def health_host_port(self) -> tuple[str, int]:
        """``health-check-address`` split into host and port."""
        return split_address(self.health_check_address)

    @property
    def visibility_timeout_s(self) -> float:
        """How long the Redis broker waits before redelivering an unacknowledged task.

        The Redis transport starts this clock when a worker receives a task, and a retried task
        is held by the worker during its countdown, so it must exceed the longest countdown plus
        the longest run (the slowest pump's hard time limit). Unless set, it is exactly that plus
        a margin: no task is redelivered while it still runs or waits, and a task held by a
        killed worker comes back soon after (about 95 s with the defaults).
        """
        if self.delivery.visibility_timeout_s is not None:
            return self.delivery.visibility_timeout_s
        return self.longest_task_s + self.delivery.retry_backoff_max_s + VISIBILITY_MARGIN_S

    @property
    def longest_task_s(self) -> float:
        """The slowest pump's hard time limit (a pump's default when none is configured)."""
        return max(
            [entry.hard_time_limit_s for entry in self.pumps.values()]
            + [DEFAULT_PUMP_TIMEOUT_S + HARD_LIMIT_GRACE_S]
        )

    @property
    def shutdown_grace_period_s(self) -> float:
        """How long an orchestrator should wait after SIGTERM before it kills a worker
        (Kubernetes ``terminationGracePeriodSeconds``, systemd ``TimeoutStopSec``).

        The soft shutdown lets running tasks go on for ``delivery.soft-shutdown-timeout-s``, but
        no task outlives the slowest pump's hard time limit, so the wait is the smaller of the
        two; then the worker requeues what is unfinished and exits
        (:data:`SHUTDOWN_REQUEUE_MARGIN_S`). 30 s with the defaults: min(10, 35) + 20.
        """
        soft_shutdown_s = min(self.delivery.soft_shutdown_timeout_s, self.longest_task_s)
        return soft_shutdown_s + SHUTDOWN_REQUEUE_MARGIN_S

    def dead_letter_fields(self, group: str) -> dict[str, Treatment]:
        """How the dead letters of ``group`` treat ``request`` and ``policies``: the pump's
        ``dead-letters`` block over the top-level one (which alone governs ``ingest`` and any
        group that is not a configured pump)."""
        entry = self.pumps.get(group)
        own = entry.dead_letters if entry is not None else self.dead_letters
        return own.over(self.dead_letters)

    def ignored_keys(self) -> list[str]:
        """Keys of iam's that were given but have no effect here (reported at start-up)."""
        ignored = [
            f"log.{_kebab(name)}"
            for name in self.log.model_fields_set
            if name not in ("level", "format")
        ]
        if "optimisation_max_idle" in self.redis.model_fields_set:
            ignored.append("redis.optimisation-max-idle")
        if "storage_expiration_time" in self.analytics.model_fields_set:
            ignored.append("analytics.storage-expiration-time")
        return sorted(ignored)

    def key(self, *parts: str) -> str:
        """A Redis key of ours, under ``key-prefix`` (:attr:`redis_key_prefix`)."""
        return ":".join((self.redis_key_prefix, *parts))


def default_config_text() -> str:
    """The embedded default configuration (a CSV pump under ./analytics-data)."""
    return resources.files("app").joinpath("default-config.yaml").read_text(encoding="utf-8")


def config_path(explicit: str | os.PathLike[str] | None = None) -> str | None:
    """The config file to use: the explicit path, else ``$IAM_PUMP_CONFIG``, else none."""
    if explicit:
        return os.fspath(explicit)
    return os.environ.get(CONFIG_ENV_VAR) or None


def broker_is_redis(broker_url: str) -> bool:
    """Whether a Celery broker URL names a Redis server that redis-py can also reach."""
    return urlsplit(broker_url).scheme in ("redis", "rediss")


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    meta_problems: MetaProblems | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read, expand and validate the configuration; raise :class:`ConfigError` on any problem.

    ``meta_problems`` and ``environ`` as for :func:`parse_settings`.
    """
    chosen = config_path(path)
    if chosen is None:
        return parse_settings(
            default_config_text(),
            source="<embedded default>",
            meta_problems=meta_problems,
            environ=environ,
        )
    try:
        text = Path(chosen).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [("", f"cannot read config file: {exc.strerror}")], source=chosen
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([("", f"config file is not UTF-8 text: {exc}")], source=chosen) from exc
    return parse_settings(text, source=chosen, meta_problems=meta_problems, environ=environ)


def parse_settings(
    text: str,
    *,
    source: str = "",
    meta_problems: MetaProblems | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Validate YAML text into :class:`Settings`.

    ``${VAR}`` references expand from ``environ`` (default: the process environment), then
    ``IAM_PUMP_<KEY PATH>`` variables there override keys (:mod:`app.config_env`). Each
    pump's ``meta`` is the pump class's to check: ``meta_problems`` (the pump registry's,
    :func:`pumps.settings.load_pump_settings`) reports its problems together with the rest of
    the file's. Without it ``meta`` is not looked at, so the reporter, which needs none of the
    pumps, imports no sink driver to read the file.
    """
    try:
        raw = load_yaml(text)
        check_tree(raw)
        if isinstance(raw, dict):
            raw = expand_env(raw, environ)
            check_tree(raw)
    except ValueError as exc:
        raise ConfigError([("", f"not valid YAML: {exc}")], source=source) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([("", "the file must be a YAML mapping")], source=source)
    raw, applied = apply_env_overrides(
        raw, Settings, os.environ if environ is None else environ, frozenset({CONFIG_ENV_VAR})
    )
    problems: list[tuple[str, str]] = []
    settings: Settings | None = None
    try:
        settings = Settings.model_validate({**raw, "source": source, "env-overrides": applied})
    except ValidationError as exc:
        problems += validation_problems(exc)
    if meta_problems is not None:
        problems += meta_problems(raw.get("pumps"))
    if problems or settings is None:
        raise ConfigError(annotate(problems, applied), source=source)
    return settings


def warn_ignored_keys(settings: Settings) -> None:
    """Log, once logging is set up, which of iam's options have no effect here."""
    ignored = settings.ignored_keys()
    if ignored:
        logger.warning(
            "%s: ignored (iam options with no effect here): %s",
            settings.source or "config",
            ", ".join(ignored),
        )


def validation_problems(
    exc: ValidationError, prefix: tuple[str | int, ...] = ()
) -> list[tuple[str, str]]:
    """Every error of a pydantic validation as a (key path, message) pair, secrets masked."""
    problems = []
    for error in exc.errors():
        location = [str(part) for part in (*prefix, *error["loc"])]
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in error and error["type"] != "missing":
            message = f"{message} (got {shown_value(location, error['input'])})"
        problems.append((".".join(location), message))
    return problems


def masked(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data, with every secret replaced by ``***``."""
    data = settings.model_dump(by_alias=True, mode="json", exclude_none=True)

    def mask(item: Any) -> Any:
        if isinstance(item, dict):
            return {
                key: "***" if is_secret(key) and item_value else mask(item_value)
                for key, item_value in item.items()
            }
        if isinstance(item, list):
            return [mask(inner) for inner in item]
        if isinstance(item, str) and "://" in item:
            return mask_url(item)
        return item

    return dict(mask(data))
