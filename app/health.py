"""Health and metrics over HTTP: ``/livez``, ``/readyz`` (and ``/<health-check-path>``) and
``/metrics``.

Two questions, two answers. ``/livez`` says whether this process's own loops run (the worker's
consumer is running or reconnecting; the HTTP thread answers): it does not depend on Redis or a
sink, so an orchestrator never restarts a process for an outage it can do nothing about.
``/readyz`` tells the truth about the pipeline: 200 ``{"status": "ok", ...}`` only when Redis
answers, the broker answers, every enabled pump says it is usable and the ingest queue and every
enabled pump queue have a live consumer; otherwise 503 with the failing checks named and why.
Metrics are read from Redis (the counters every worker keeps there, the list and queue lengths
and ages, the dead letters) and from the workers' answers (consumers per queue), so one endpoint
shows the whole fleet, however many worker processes and machines there are.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import redis
from kombu.connection import Connection
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.codec import MalformedRecordError, decode_go_record
from app.config import Settings
from app.messages import INGEST_QUEUE, PURGE_QUEUE, pump_queue, waiting_since
from app.queue_consumers import Census, QueueConsumers
from app.stores.clients import same_server
from app.stores.dead_letters import DeadLetterStore
from app.stores.ledger import Ledger
from app.stores.stats import Counter, PumpCounter, Stats, StatsSnapshot
from app.stores.values import as_bytes
from pumps.host import PumpHost

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
#: The longest the endpoint waits for a check: a check that has not answered by then fails, so a
#: probe gets its reply within about this long even when a server's packets are being dropped.
CHECK_DEADLINE_S = 5.0
_COUNTERS = {
    Counter.INGESTED_BATCHES: ("iam_pump_ingested_batches", "Batches validated and fanned out."),
    Counter.INGESTED_RECORDS: ("iam_pump_ingested_records", "Records validated and fanned out."),
    Counter.MALFORMED_RECORDS: ("iam_pump_malformed_records", "Records set aside as malformed."),
    Counter.PURGED_RECORDS: ("iam_pump_purged_records", "Records moved off iam's Redis list."),
    Counter.LOST_BATCHES: (
        "iam_pump_lost_batches",
        "Batches whose bytes vanished from the broker's Redis before a task read them.",
    ),
    Counter.RESENT_TASKS: (
        "iam_pump_resent_tasks",
        "Tasks the ledger sweep sent again because no queue carried them any more.",
    ),
}
_PER_PUMP_COUNTERS = {
    PumpCounter.WRITTEN_RECORDS: ("iam_pump_written_records", "Records written by a pump."),
    PumpCounter.WRITTEN_BATCHES: ("iam_pump_written_batches", "Batches written by a pump."),
    PumpCounter.RETRIES: ("iam_pump_write_retries", "Write attempts that failed and were retried."),
    PumpCounter.DEAD_LETTERED_RECORDS: (
        "iam_pump_dead_lettered_records",
        "Records sent to dead letters.",
    ),
}


#: Answers whether this process's own loops run: None when they do, else why not.
Liveness = Callable[[], "str | None"]
#: The name of the check that every required queue has a consumer.
QUEUES_CHECK = "queues"


def required_queues(settings: Settings) -> list[str]:
    """The queues that must have a live consumer for the pipeline to move: ingest and every
    enabled pump's."""
    return [INGEST_QUEUE, *(pump_queue(name) for name in settings.enabled_pumps)]


def all_queues(settings: Settings) -> list[str]:
    """Every queue of this configuration (the required ones and ``purge``)."""
    ingest, *pumps = required_queues(settings)
    return [ingest, PURGE_QUEUE, *pumps]


def queue_consumers(settings: Settings) -> QueueConsumers:
    """Counts the consumers of this configuration's queues through the worker app's remote
    control (made on first use: the caller has set the config file by then)."""
    from app.celery_app import app

    return QueueConsumers(app, all_queues(settings), broker_url=settings.broker)


@dataclass
class HealthReport:
    """The outcome of every check: ``checks`` maps a check name to "ok" or the reason;
    ``consumers`` the live consumers per queue, when they were counted."""

    checks: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, int] | None = None

    @property
    def healthy(self) -> bool:
        return all(result == "ok" for result in self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        failing = [name for name, result in self.checks.items() if result != "ok"]
        body: dict[str, Any] = {"status": "ok" if not failing else "unhealthy"}
        if failing:
            body["failing"] = failing
        body["checks"] = self.checks
        if self.consumers is not None:
            body["consumers"] = self.consumers
        return body


class HealthChecker:
    """Runs the checks. Pumps are opened, checked and closed by a :class:`PumpHost` of its own,
    the same object a worker uses, so a check sees a pump exactly as a write would.

    The checks run side by side, each given :data:`CHECK_DEADLINE_S`; Redis is pinged by a client
    that waits :data:`CHECK_TIMEOUT_S` and does not retry, so a server that drops packets (a
    network partition) makes the check fail in seconds instead of hanging the probe.

    With ``consumers``, a check named ``queues`` also requires a live consumer on each of
    :func:`required_queues`.
    """

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        *,
        consumers: QueueConsumers | None = None,
    ) -> None:
        self.settings = settings
        self.consumers = consumers
        self.redis = bounded_client(client)
        self.pumps = PumpHost(settings)
        # Threads stuck on a dropped connection keep theirs until their own timeouts fire.
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="health-check")

    def check(self) -> HealthReport:
        """Every check's result, within about :data:`CHECK_DEADLINE_S`."""
        redis_check = self._pool.submit(self._check_redis)
        broker_check = self._pool.submit(self._check_broker)
        pump_checks = self._pool.submit(self.pumps.check_all)
        census = self._pool.submit(self.consumers.census) if self.consumers is not None else None
        deadline = time.monotonic() + CHECK_DEADLINE_S
        late = f"no answer within {CHECK_DEADLINE_S:.0f}s"
        report = HealthReport()
        report.checks["redis"] = _outcome(redis_check, deadline) or late
        report.checks["broker"] = _outcome(broker_check, deadline) or late
        pumps = _outcome(pump_checks, deadline)
        for name in self.settings.enabled_pumps:
            report.checks[f"pump:{name}"] = late if pumps is None else pumps[name]
        if census is not None:
            counted = _outcome(census, deadline)
            report.checks[QUEUES_CHECK] = late if counted is None else self._queues(counted)
            if counted is not None and counted.error is None:
                report.consumers = counted.consumers
        return report

    def _queues(self, census: Census) -> str:
        if census.error is not None:
            return f"consumers not counted: {census.error}"
        idle = [name for name in required_queues(self.settings) if not census.consumers.get(name)]
        return "ok" if not idle else f"no live consumer on {', '.join(idle)}"

    def _check_redis(self) -> str:
        try:
            self.redis.ping()
            return "ok"
        except redis.RedisError as exc:
            return f"Redis did not answer: {exc}"

    def _check_broker(self) -> str:
        try:
            connection = Connection(self.settings.broker, connect_timeout=CHECK_TIMEOUT_S)  # type: ignore[no-untyped-call]
            with connection:
                connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_S)  # type: ignore[no-untyped-call]
            return "ok"
        except Exception as exc:
            return f"broker did not answer: {exc}"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.pumps.close()
        self.redis.close()
        if self.consumers is not None:
            self.consumers.close()


T = TypeVar("T")


def _outcome(future: Future[T], deadline: float) -> T | None:
    # The check's result, or None if it has not answered by ``deadline``.
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        return None


def bounded_client(client: redis.Redis) -> redis.Redis:
    """A client for the same server as ``client`` that gives up after :data:`CHECK_TIMEOUT_S`
    and never retries (redis-py retries a timed-out command ten times by default)."""
    return same_server(
        client,
        max_connections=16,
        socket_timeout=CHECK_TIMEOUT_S,
        socket_connect_timeout=CHECK_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


class PumpMetrics(Collector):
    """Prometheus metrics read from Redis at each scrape, and the consumers per queue from
    ``consumers`` (cached for a few seconds, see :mod:`app.queue_consumers`)."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        *,
        consumers: QueueConsumers | None = None,
    ) -> None:
        self.settings = settings
        self.redis = client
        self.consumers = consumers

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("iam_pump_redis_up", "1 when Redis answered the scrape.")
        try:
            stats = Stats(self.redis, self.settings).read()
        except redis.RedisError as exc:
            logger.warning("metrics: Redis did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _counters(stats, self.settings)
        yield _write_durations(stats)
        backlog = GaugeMetricFamily(
            "iam_pump_redis_list_length", "Records waiting in iam's Redis list."
        )
        backlog.add_metric([], int(self.redis.llen(self.settings.analytics_key)))
        yield backlog
        yield from self._list_oldest_age()
        if self.settings.broker_url is None:  # the queues are lists on this same Redis
            heads = self._queue_heads()
            yield _queue_lengths(heads)
            yield _queue_oldest_ages(heads)
            yield from self._ledger()
        yield self._dead_letter_entries()
        if self.consumers is not None:
            yield from _consumer_counts(self.consumers.census(), self.consumers.queues)

    def _list_oldest_age(self) -> Iterator[GaugeMetricFamily]:
        # The first element is the oldest (iam-authz-server RPUSHes): read, not taken.
        raw = self.redis.lindex(self.settings.analytics_key, 0)
        if raw is None:
            age = 0.0
        else:
            try:
                timestamp = decode_go_record(as_bytes(raw))[0]
            except MalformedRecordError:  # the purge sets it aside; no age to tell meanwhile
                return
            age = max(0.0, time.time() - float(timestamp))
        gauge = GaugeMetricFamily(
            "iam_pump_redis_list_oldest_age_seconds",
            "Age of the oldest record waiting in iam's Redis list (its TimeStamp; 0: empty).",
        )
        gauge.add_metric([], age)
        yield gauge

    def _queue_heads(self) -> list[tuple[str, int, Any]]:
        # Every queue's length and oldest message, in one round trip.
        names = all_queues(self.settings)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
            # kombu's Redis transport LPUSHes and BRPOPs: the oldest message is the last one.
            pipe.lindex(name, -1)
        answers = pipe.execute()
        return [
            (name, int(length), oldest)
            for name, length, oldest in zip(names, answers[::2], answers[1::2], strict=True)
        ]

    def _ledger(self) -> Iterator[GaugeMetricFamily]:
        ledger = Ledger(self.redis, self.settings.key_prefix)
        try:
            claims, oldest = ledger.owed(), ledger.oldest()
        except redis.RedisError as exc:  # a user without ZCARD, say: the rest still answers
            logger.warning("metrics: the ledger could not be read: %s", exc)
            return
        owed = GaugeMetricFamily(
            "iam_pump_ledger_claims", "Claims on kept batches not yet settled (ingest or a pump)."
        )
        owed.add_metric([], claims)
        yield owed
        age = GaugeMetricFamily(
            "iam_pump_ledger_oldest_progress_age_seconds",
            "Seconds since the least recently moving claim last made progress (0: none owed).",
        )
        age.add_metric([], 0.0 if oldest is None else max(0.0, time.time() - oldest))
        yield age

    def _dead_letter_entries(self) -> GaugeMetricFamily:
        store = DeadLetterStore(self.redis, self.settings)
        entries = GaugeMetricFamily(
            "iam_pump_dead_letter_entries", "Dead-letter entries kept.", labels=["group"]
        )
        groups = dict.fromkeys([*_dead_letter_groups(self.settings), *store.groups()])
        for group in groups:
            entries.add_metric([group], store.count(group))
        return entries


def _queue_lengths(heads: list[tuple[str, int, Any]]) -> GaugeMetricFamily:
    queues = GaugeMetricFamily(
        "iam_pump_queue_length", "Tasks waiting in a Celery queue.", labels=["queue"]
    )
    for name, length, _oldest in heads:
        queues.add_metric([name], length)
    return queues


def _queue_oldest_ages(heads: list[tuple[str, int, Any]]) -> GaugeMetricFamily:
    ages = GaugeMetricFamily(
        "iam_pump_queue_oldest_age_seconds",
        "Seconds the oldest task waiting in a queue has been due (0: empty).",
        labels=["queue"],
    )
    now = time.time()
    for name, _length, oldest in heads:
        if oldest is None:
            ages.add_metric([name], 0.0)
        elif (since := waiting_since(oldest)) is not None:
            ages.add_metric([name], max(0.0, now - since))
    return ages


def _write_durations(stats: StatsSnapshot) -> HistogramMetricFamily:
    histogram = HistogramMetricFamily(
        "iam_pump_write_duration_seconds",
        "Time a pump's write of one batch took, failed writes included.",
        labels=["pump"],
    )
    for pump, durations in stats.write_durations().items():
        buckets = [(_bound(bound), count) for bound, count in durations.buckets]
        histogram.add_metric([pump], buckets, sum_value=durations.sum_s)
    return histogram


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _consumer_counts(census: Census, queues: list[str]) -> Iterator[GaugeMetricFamily]:
    # Our queues only, so that a worker consuming a queue of its own adds no label value.
    if census.error is not None:
        logger.warning("metrics: queue consumers not counted: %s", census.error)
        return
    gauge = GaugeMetricFamily(
        "iam_pump_queue_consumers",
        "Live workers consuming a queue, as they answer Celery's remote control.",
        labels=["queue"],
    )
    for name in queues:
        gauge.add_metric([name], census.consumers.get(name, 0))
    yield gauge


def _dead_letter_groups(settings: Settings) -> list[str]:
    # Every group that can have dead letters: malformed input, and each enabled pump.
    return [INGEST_QUEUE, *settings.enabled_pumps]


def _counters(stats: StatsSnapshot, settings: Settings) -> Iterator[CounterMetricFamily]:
    # The counters every worker adds to (app/stores/stats.py), under their Prometheus names.
    # Every enabled pump (and dead-letter group) has its series from the start, at 0, so an
    # alert on increase() sees the first retry or dead letter rather than a series appearing.
    for key, (name, documentation) in _COUNTERS.items():
        counter = CounterMetricFamily(name, documentation)
        counter.add_metric([], stats.total(key))
        yield counter
    for pump_key, (name, documentation) in _PER_PUMP_COUNTERS.items():
        dead_letters = pump_key is PumpCounter.DEAD_LETTERED_RECORDS
        counter = CounterMetricFamily(
            name, documentation, labels=["group" if dead_letters else "pump"]
        )
        values = dict.fromkeys(
            _dead_letter_groups(settings) if dead_letters else settings.enabled_pumps, 0
        )
        values.update(stats.by_pump(pump_key))
        for pump_name, value in values.items():
            counter.add_metric([pump_name], value)
        yield counter


class HealthServer:
    """The HTTP endpoint, served from a daemon thread, on ``address`` (default: the config's
    ``health-check-address``).

    ``liveness`` answers ``/livez`` (default: alive while the HTTP thread answers);
    ``consumers`` counts the consumers per queue for ``/readyz`` and ``/metrics`` (default: asked
    through the worker app's remote control).
    """

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        *,
        address: tuple[str, int] | None = None,
        liveness: Liveness | None = None,
        consumers: QueueConsumers | None = None,
    ) -> None:
        self.settings = settings
        self.liveness: Liveness = liveness or (lambda: None)
        consumers = consumers or queue_consumers(settings)
        self.checker = HealthChecker(settings, client, consumers=consumers)
        self.registry = CollectorRegistry()
        self.registry.register(PumpMetrics(settings, self.checker.redis, consumers=consumers))
        host, port = address or settings.health_host_port
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self
        health_path = "/" + self.settings.health_check_path.strip("/")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/livez":
                    problem = server.liveness()
                    if problem is None:
                        self._send_json(200, {"status": "ok"})
                    else:
                        self._send_json(503, {"status": "dead", "why": problem})
                elif path in (health_path, "/healthz", "/readyz"):
                    report = server.checker.check()
                    self._send_json(200 if report.healthy else 503, report.as_dict())
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(server.registry))
                else:
                    self._send_json(404, {"error": "not found"})

            def _send_json(self, status: int, document: dict[str, Any]) -> None:
                self._send(status, "application/json", json.dumps(document).encode())

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("health: " + format, *args)

        return Handler

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-http", daemon=True
        )
        self._thread.start()
        logger.info("health endpoint on http://%s:%d", *self.address)

    def close_listener(self) -> None:
        """Close the listening socket without stopping a serving thread (a forked child's copy,
        which has none)."""
        self._server.socket.close()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.checker.close()
