"""Prometheus: iam's ``iam_user_authorization_status_total{code,username}`` counter, counted
once for the whole fleet in Redis and served over HTTP for Prometheus to scrape.

``meta`` takes iam's keys::

    listen_address   HOST:PORT the endpoint listens on (required, as in iam; ``:9090`` means
                     every interface, as in Go)
    path             the endpoint's path, default ``/metrics``

and these of ours::

    max_usernames          distinct usernames that get their own label (default 10000); the
                           records of any further username count under ``__other__``, and how
                           many did is a counter of its own
    redis_url              the Redis that keeps the counts; default: the ``redis:`` server of the
                           configuration this process runs with (``--config``/``IAM_PUMP_CONFIG``)
    key_prefix             default: that configuration's ``key-prefix``
    applied_batch_ttl_s    how long a counted batch is remembered, so that a redelivery of it
                           adds nothing (default 7 days)
    bind_retry_interval_s  how often a process that could not bind ``listen_address`` tries
                           again (default 5 s)

iam keeps the counter in the memory of the one Go process: it starts from zero on every restart
and, with several pump processes, each would count only what it saw. Here a batch is counted by
one Lua script on Redis, which first sets a marker named by a digest of the batch's record ids
(``SET NX``, with ``applied_batch_ttl_s``) and adds nothing if the marker was there, then adds
each (code, username) count to one hash with ``HINCRBY``. So every Celery worker process of every
host adds to the same counts, a batch retried or redelivered after a crash is counted once
(exactly once: the script runs whole or not at all), and a restart loses nothing.

Every process that hosts the pump tries to serve the endpoint; the first to bind
``listen_address`` on a host serves it, reading the hash at each scrape, so whichever process
answers gives the fleet's totals. The others try to bind again every ``bind_retry_interval_s``,
so when the serving process dies another takes over within that time.

``code`` is ``0`` when the record's effect is ``allow`` (ladon's ``AllowAccess``) and ``1``
otherwise, as in iam.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import socket
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.config import load_settings
from app.record import AnalyticsRecord
from app.stores.clients import redis_client, same_server
from pumps.base import NO_ID_REASON, Pump, WriteResult
from pumps.deadline import CHECK_TIMEOUT_S, Deadline
from pumps.errors import PumpError, PumpPermanentError, PumpTemporaryError

logger = logging.getLogger(__name__)

#: iam's metric: its name (prometheus_client adds ``_total`` to a counter), help and labels.
METRIC_NAME = "iam_user_authorization_status"
METRIC_HELP = "authorization effect per user"
METRIC_LABELS = ("code", "username")
FOLDED_METRIC_NAME = "iam_user_authorization_status_folded_records"
FOLDED_METRIC_HELP = (
    "records counted under username __other__ because max_usernames usernames had their own label"
)
USERNAMES_METRIC_NAME = "iam_user_authorization_status_usernames"
USERNAMES_METRIC_HELP = "usernames that have their own label (at most max_usernames)"

#: ladon's ``AllowAccess``: the only effect that counts as code 0.
ALLOW_EFFECT = "allow"
ALLOWED_CODE = "0"
DENIED_CODE = "1"
#: The username label of the records whose username came after ``max_usernames`` others.
OTHER_USERNAME = "__other__"
DEFAULT_PATH = "/metrics"
#: The text format every Prometheus 2.x reads (newer prometheus-client versions announce 1.0.0,
#: whose only change, escaped UTF-8 names, our names never need).
EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_MAX_USERNAMES = 10_000
DEFAULT_APPLIED_BATCH_TTL_S = 7 * 24 * 3600
DEFAULT_BIND_RETRY_INTERVAL_S = 5.0
#: How long the endpoint's loop waits for a request before looking whether it should stop.
_SERVE_POLL_S = 0.5
#: The hash field that counts folded records (count fields are ``<code>:<username>``).
_FOLDED_FIELD = b"folded"

#: KEYS: the counts hash, the set of usernames with their own label, the batch's marker.
#: ARGV: marker TTL (s), max usernames, the folded username, then (username, code, count)
#: triples. Returns -1 when the batch was counted already, else the number of folded records.
_COUNT_BATCH_LUA = """
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[1]) then
  return -1
end
local limit = tonumber(ARGV[2])
local folded = 0
for i = 4, #ARGV, 3 do
  local username = ARGV[i]
  local count = tonumber(ARGV[i + 2])
  if redis.call('SISMEMBER', KEYS[2], username) == 0 then
    if redis.call('SCARD', KEYS[2]) < limit then
      redis.call('SADD', KEYS[2], username)
    else
      username = ARGV[3]
      folded = folded + count
    end
  end
  redis.call('HINCRBY', KEYS[1], ARGV[i + 1] .. ':' .. username, count)
end
if folded > 0 then
  redis.call('HINCRBY', KEYS[1], 'folded', folded)
end
return folded
"""


class PrometheusMeta(BaseModel):
    """``meta`` of the prometheus pump: iam's two keys and ours (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen_address: str
    path: str = DEFAULT_PATH
    max_usernames: int = Field(default=DEFAULT_MAX_USERNAMES, ge=1)
    redis_url: str | None = None
    key_prefix: str | None = Field(default=None, min_length=1)
    applied_batch_ttl_s: int = Field(default=DEFAULT_APPLIED_BATCH_TTL_S, ge=60)
    bind_retry_interval_s: float = Field(default=DEFAULT_BIND_RETRY_INTERVAL_S, gt=0, le=300)

    @field_validator("listen_address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not value:
            raise ValueError("prometheus listen_address not set")
        split_address(value)
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value:
            return DEFAULT_PATH  # as iam
        if not value.startswith("/"):
            raise ValueError(f"expected a path starting with '/', got {value!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {value!r}")
        return value


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``, or ``:PORT`` for every interface) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def batch_digest(record_ids: Sequence[str]) -> str:
    """A name for a batch's content: the same records give the same name, in any order."""
    digest = hashlib.sha256()
    for record_id in sorted(record_ids):
        digest.update(record_id.encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return digest.hexdigest()


def status_code(record: AnalyticsRecord) -> str:
    """iam's ``code`` label: 0 for an allowed request, 1 for anything else."""
    return ALLOWED_CODE if record.effect == ALLOW_EFFECT else DENIED_CODE


@dataclass(frozen=True, slots=True)
class CounterKeys:
    """The Redis keys of one prometheus pump: ``<prefix>:prometheus:<pump name>[:...]``."""

    counts: str
    usernames: str
    applied_prefix: str

    @classmethod
    def for_pump(cls, key_prefix: str, pump_name: str) -> CounterKeys:
        base = f"{key_prefix}:prometheus:{pump_name}"
        return cls(counts=base, usernames=f"{base}:usernames", applied_prefix=f"{base}:applied:")

    def applied(self, digest: str) -> str:
        """The marker of a counted batch."""
        return self.applied_prefix + digest


@dataclass(slots=True)
class Counts:
    """What the counts hash holds: each (code, username) count, folded records, usernames."""

    by_label: dict[tuple[str, str], int] = field(default_factory=dict)
    folded: int = 0
    usernames: int = 0


def read_counts(client: redis.Redis, keys: CounterKeys) -> Counts:
    """The counts as they are now in Redis."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.counts)
        pipe.scard(keys.usernames)
        raw, usernames = pipe.execute()
    counts = Counts(usernames=int(usernames))
    for name, value in raw.items():
        if name == _FOLDED_FIELD:
            counts.folded = int(value)
            continue
        code, _, username = name.decode("utf-8", "replace").partition(":")
        counts.by_label[(code, username)] = int(value)
    return counts


class _CountsCollector(Collector):
    """Turns the Redis counts into Prometheus metric families at each scrape."""

    def __init__(self, client: redis.Redis, keys: CounterKeys) -> None:
        self._client = client
        self._keys = keys

    def collect(self) -> Iterator[Any]:
        counts = read_counts(self._client, self._keys)
        status = CounterMetricFamily(METRIC_NAME, METRIC_HELP, labels=METRIC_LABELS)
        for (code, username), value in sorted(counts.by_label.items()):
            status.add_metric([code, username], value)
        yield status
        yield CounterMetricFamily(FOLDED_METRIC_NAME, FOLDED_METRIC_HELP, value=counts.folded)
        yield GaugeMetricFamily(
            USERNAMES_METRIC_NAME, USERNAMES_METRIC_HELP, value=counts.usernames
        )


class MetricsEndpoint:
    """Serves ``path`` on ``address`` from a thread, binding again while another process has it.

    :meth:`start` tries to bind at once; whether or not it could, a thread then serves or keeps
    trying every ``retry_interval_s`` until :meth:`stop`.
    """

    def __init__(
        self,
        address: str,
        path: str,
        registry: CollectorRegistry,
        *,
        retry_interval_s: float,
        label: str,
    ) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self.path = path
        self._registry = registry
        self._retry_interval_s = retry_interval_s
        self._label = label
        self._stopped = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: Why the last bind failed, for the health check.
        self.bind_error: str | None = None

    @property
    def serving(self) -> bool:
        """True while this process serves the endpoint."""
        return self._server is not None

    def start(self) -> None:
        self._bind()
        self._thread = threading.Thread(
            target=self._run, name=f"prometheus-{self._label}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving (or trying to) and free the port; safe to call twice."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(_SERVE_POLL_S * 4 + 1)
            self._thread = None

    def answered_by_someone(self) -> bool:
        """True when something accepts connections on the address (this process or another)."""
        host = self.host or "127.0.0.1"
        try:
            with socket.create_connection((host, self.port), timeout=CHECK_TIMEOUT_S / 2):
                return True
        except OSError:
            return False

    def _bind(self) -> None:
        try:
            server = _server_class(self.host)((self.host, self.port), self._handler())
        except OSError as exc:
            if self.bind_error is None:
                logger.info(
                    "pump %s: cannot serve %s yet (%s); trying again every %.0f s",
                    self._label,
                    self.address,
                    exc.strerror or exc,
                    self._retry_interval_s,
                )
            self.bind_error = str(exc.strerror or exc)
            return
        server.timeout = _SERVE_POLL_S
        self._server = server
        self.bind_error = None
        logger.info("pump %s: serving %s%s", self._label, self.address, self.path)

    def _run(self) -> None:
        while not self._stopped.is_set():
            server = self._server
            if server is None:
                if self._stopped.wait(self._retry_interval_s):
                    return
                self._bind()
                continue
            try:
                while not self._stopped.is_set():
                    server.handle_request()
            finally:
                self._server = None
                server.server_close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        registry, path, label = self._registry, self.path, self._label

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.partition("?")[0] != path:
                    self._reply(404, b"not found\n", "text/plain; charset=utf-8")
                    return
                try:
                    body = generate_latest(registry)
                except redis.RedisError as exc:
                    logger.warning("pump %s: scrape: Redis did not answer: %s", label, exc)
                    self._reply(503, f"Redis: {exc}\n".encode(), "text/plain; charset=utf-8")
                    return
                self._reply(200, body, EXPOSITION_CONTENT_TYPE)

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("pump %s: " + format, label, *args)

        return Handler


def _server_class(host: str) -> type[http.server.ThreadingHTTPServer]:
    if ":" not in host:
        return _Server
    return _Server6


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class PrometheusPump(Pump[PrometheusMeta]):
    """Counts records per (code, username) in Redis and serves them; see the module docstring."""

    Meta = PrometheusMeta
    #: A batch is counted once however often it is written (its marker), and every record id
    #: reaches this pump in exactly one batch, so each record is counted once.
    upserts = True
    #: Only the username and effect are read: a record's size does not matter here.
    handles_record_size = True

    def __init__(self, name: str, meta: PrometheusMeta, *, timeout_s: float) -> None:
        super().__init__(name, meta, timeout_s=timeout_s)
        self._client: redis.Redis | None = None
        self._quick: redis.Redis | None = None
        self._script: Any = None
        self._endpoint: MetricsEndpoint | None = None
        self.keys: CounterKeys | None = None

    def open(self, *, deadline: Deadline | None = None) -> None:
        if self._client is not None:
            return
        client, key_prefix = self._counts_client()
        self.keys = CounterKeys.for_pump(key_prefix, self.name)
        # Scrapes and health checks give up sooner than writes.
        self._quick = same_server(
            client,
            max_connections=8,
            socket_timeout=CHECK_TIMEOUT_S,
            socket_connect_timeout=CHECK_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._script = client.register_script(_COUNT_BATCH_LUA)
        self._client = client
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_CountsCollector(self._quick, self.keys))
        self._endpoint = MetricsEndpoint(
            self.meta.listen_address,
            self.meta.path,
            registry,
            retry_interval_s=self.meta.bind_retry_interval_s,
            label=self.name,
        )
        self._endpoint.start()

    def _counts_client(self) -> tuple[redis.Redis, str]:
        """A client for the Redis that keeps the counts, and the key prefix: ``redis_url`` and
        ``key_prefix`` from ``meta``, else from the configuration this process runs with (read
        only when one of them is left out)."""
        meta = self.meta
        changes: dict[str, Any] = {
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
            "retry": Retry(NoBackoff(), 0),
        }
        if meta.redis_url is not None:
            client = redis.Redis.from_url(meta.redis_url, **changes)
            return client, meta.key_prefix or load_settings().key_prefix
        settings = load_settings()
        configured = redis_client(settings)
        try:
            return same_server(configured, **changes), meta.key_prefix or settings.key_prefix
        finally:
            configured.close()

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        result = WriteResult()
        counted: Counter[tuple[str, str]] = Counter()
        record_ids: list[str] = []
        for record in records:
            if not record.id:
                result.rejected.append((record, NO_ID_REASON))
                continue
            record_ids.append(record.id)
            counted[(record.username, status_code(record))] += 1
        if not record_ids:
            return result
        client, keys = self._opened()
        args: list[bytes | int | str] = [
            self.meta.applied_batch_ttl_s,
            self.meta.max_usernames,
            OTHER_USERNAME,
        ]
        for (username, code), count in sorted(counted.items()):
            args += [username.encode("utf-8", "surrogatepass"), code, count]
        digest = batch_digest(record_ids)
        if deadline.expired:
            raise PumpTemporaryError(f"pump {self.name}: no time left to count the batch")
        try:
            folded = self._script(
                keys=[keys.counts, keys.usernames, keys.applied(digest)], args=args, client=client
            )
        except redis.RedisError as exc:
            raise _wrap(exc, f"pump {self.name}: counting in Redis failed") from exc
        if folded == -1:
            logger.info(
                "pump %s: batch %s (%d records) was counted already; not counted again",
                self.name,
                digest[:12],
                len(record_ids),
            )
        elif folded:
            logger.debug("pump %s: %d records counted as %s", self.name, folded, OTHER_USERNAME)
        return result

    def check(self) -> None:
        if self._quick is None or self._endpoint is None:
            raise PumpTemporaryError(f"pump {self.name} is not open")
        try:
            self._quick.ping()
        except redis.RedisError as exc:
            raise _wrap(exc, f"pump {self.name}: Redis did not answer") from exc
        endpoint = self._endpoint
        if not endpoint.serving and not endpoint.answered_by_someone():
            raise PumpTemporaryError(
                f"pump {self.name}: nothing serves {endpoint.address} "
                f"({endpoint.bind_error or 'not bound yet'})"
            )

    def close(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.stop()
        for client in (self._quick, self._client):
            if client is not None:
                client.close()
        self._quick = self._client = None

    @property
    def serving(self) -> bool:
        """True while this process serves the endpoint."""
        return self._endpoint is not None and self._endpoint.serving

    def _opened(self) -> tuple[redis.Redis, CounterKeys]:
        if self._client is None or self.keys is None:
            raise PumpTemporaryError(f"pump {self.name} is not open")
        return self._client, self.keys


def _wrap(exc: redis.RedisError, what: str) -> PumpError:
    """A Redis error as a pump error: refused credentials or commands are permanent."""
    if isinstance(exc, redis.AuthenticationError | redis.exceptions.NoPermissionError):
        return PumpPermanentError(f"{what}: {exc}")
    return PumpTemporaryError(f"{what}: {exc}")
