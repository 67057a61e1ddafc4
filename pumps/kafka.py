"""Kafka: one JSON message per record, keyed by the record id, acknowledged before it counts.

``meta`` takes iam's keys (so an iam-pump.yaml works) plus ``ssl_ca_file``, ``broker_version``
and ``idempotent``; see :mod:`pumps.kafka_meta`.

Where iam loses data, this pump does not:

* A write produces every record and then waits for the delivery report of each (``acks=all``:
  every in-sync replica has it). The batch counts as written only when every message is
  acknowledged; iam logs a failed write and drops the batch.
* What cannot be acknowledged within the write's time budget is purged from the client's
  queue and the write fails with :class:`~pumps.errors.PumpTemporaryError`, so the worker
  retries the batch with backoff, then dead-letters it; a broker that is down, restarting or
  electing leaders costs retries, not records.
* A message the broker refuses on its own (larger than its ``message.max.bytes``) is returned
  as rejected and becomes a dead letter; the rest of the batch is written.
* The value carries iam's field names (``timestamp``, ``username``, ..., ``expireAt`` as Go
  marshals a ``time.Time``) plus ``meta_data``; the key is the record id. Delivery is
  **at-least-once**: a batch sent again (after a timeout, a killed worker, a broker restart)
  appends its messages again, and a consumer drops the copies by key. The idempotent producer
  (0.11+) keeps the client's own resends inside one write from adding copies.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from app.record import JSON_NAMES, AnalyticsRecord, field_values, go_expiry, go_time_text
from pumps.base import Pump, WriteResult
from pumps.deadline import CHECK_TIMEOUT_S, TIMEOUT_MARGIN_S, Deadline
from pumps.errors import PumpPermanentError, PumpTemporaryError
from pumps.kafka_meta import KafkaMeta

logger = logging.getLogger(__name__)
#: librdkafka's own log lines (connections, retries), forwarded when the client is served.
client_logger = logging.getLogger(f"{__name__}.client")


class _ClientLog:
    """Where librdkafka's log lines go: debug lines of :data:`client_logger`.

    librdkafka logs every failed connection attempt as an error, again and again while a broker
    is away; what matters of it reaches the pump's own errors (the error callback's last error),
    so its lines are kept for debugging only.
    """

    def log(self, level: int, message: str, *args: object) -> None:
        client_logger.debug(message, *args)


#: A record refused one by one, and why.
Rejection = tuple[AnalyticsRecord, str]

#: Compact JSON, as Go's ``encoding/json`` writes it; non-ASCII text left as UTF-8, as Go does.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
#: Pause between metadata requests while a topic is being created or a leader elected.
METADATA_RETRY_PAUSE_S = 0.2

#: How long a write waits for room in the client's queue before trying again.
QUEUE_FULL_POLL_S = 0.05
#: librdkafka's lower bounds on its timeouts.
MIN_MESSAGE_TIMEOUT_MS = 1000
MIN_CONNECTION_SETUP_TIMEOUT_MS = 1000

#: Refusals of one message that sending it again cannot change: it becomes a dead letter.
REJECTED_MESSAGE_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
    }
)
#: Refusals of the whole client that a retry of the same write cannot fix.
PERMANENT_ERRORS = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError._INVALID_ARG,
    }
)
#: Topic errors in metadata that mean "not usable yet", not "broken".
_TOPIC_SETTLING_ERRORS = frozenset({KafkaError.NO_ERROR, KafkaError.LEADER_NOT_AVAILABLE})


def message_value(record: AnalyticsRecord, meta_data: dict[str, str]) -> bytes:
    """The JSON message of a record: iam's field names, then the static ``meta_data``."""
    message: dict[str, object] = dict(zip(JSON_NAMES, field_values(record), strict=True))
    message["expireAt"] = go_time_text(go_expiry(record))
    message.update(meta_data)
    return _ENCODER.encode(message).encode("utf-8")


class _Deliveries:
    """The delivery reports of one write: its own, so late reports of an earlier write that
    gave up (purged messages) never count for a later one."""

    __slots__ = ("acknowledged", "failed", "records")

    def __init__(self, records: Sequence[AnalyticsRecord]) -> None:
        self.records = records
        self.acknowledged = 0
        self.failed: list[tuple[int, KafkaError]] = []

    def report(self, index: int, error: KafkaError | None) -> None:
        if error is None:
            self.acknowledged += 1
        else:
            self.failed.append((index, error))


class KafkaPump(Pump[KafkaMeta]):
    """Produces one message per record and waits for every acknowledgement; see the module
    docstring."""

    Meta = KafkaMeta

    _producer: Producer | None = None

    def __init__(self, name: str, meta: KafkaMeta, *, timeout_s: float) -> None:
        super().__init__(name, meta, timeout_s=timeout_s)
        self._last_client_error = ""
        self._broken = False

    # -- client -------------------------------------------------------------------------------

    def producer_config(self) -> dict[str, Any]:
        """The librdkafka settings this pump's ``meta`` and ``timeout`` give."""
        meta = self.meta
        request_timeout_s = meta.timeout or self.timeout_s
        config: dict[str, Any] = {
            "bootstrap.servers": ",".join(meta.broker),
            "client.id": meta.client_id,
            "acks": "all",
            "enable.idempotence": meta.idempotence,
            "compression.type": "snappy" if meta.compressed else "none",
            # A message not acknowledged within the write's own budget has failed; the write
            # has given up on it by then anyway.
            "message.timeout.ms": max(
                MIN_MESSAGE_TIMEOUT_MS, int((self.timeout_s - TIMEOUT_MARGIN_S) * 1000)
            ),
            "socket.timeout.ms": max(MIN_MESSAGE_TIMEOUT_MS, int(request_timeout_s * 1000)),
            "socket.connection.setup.timeout.ms": max(
                MIN_CONNECTION_SETUP_TIMEOUT_MS, int(request_timeout_s * 1000)
            ),
            # The same key to the same partition as Java producers, so copies sit together.
            "partitioner": "murmur2_random",
            "error_cb": self._client_error,
            "logger": _ClientLog(),
        }
        if not meta.asks_broker_version:
            config["api.version.request"] = False
            config["broker.version.fallback"] = meta.broker_version
        if meta.use_ssl:
            if meta.ssl_ca_file:
                config["ssl.ca.location"] = meta.ssl_ca_file
            if meta.ssl_cert_file:
                config["ssl.certificate.location"] = meta.ssl_cert_file
                config["ssl.key.location"] = meta.ssl_key_file
            if meta.ssl_insecure_skip_verify:
                config["enable.ssl.certificate.verification"] = False
                config["ssl.endpoint.identification.algorithm"] = "none"
        if meta.sasl_mechanism:
            config["security.protocol"] = "SASL_SSL" if meta.use_ssl else "SASL_PLAINTEXT"
            config["sasl.mechanism"] = (
                "PLAIN"
                if meta.sasl_mechanism == "PLAIN"
                else f"SCRAM-{meta.sasl_algorithm.upper()}"
            )
            config["sasl.username"] = meta.sasl_username
            config["sasl.password"] = meta.sasl_password
        else:
            config["security.protocol"] = "SSL" if meta.use_ssl else "PLAINTEXT"
        return config

    def _client_error(self, error: KafkaError) -> None:
        """librdkafka's error callback: remember the last one for the pump's own errors."""
        self._last_client_error = error.str()
        if error.fatal():
            self._broken = True
            logger.error("pump %s: the Kafka producer failed for good: %s", self.name, error)

    def open(self, *, deadline: Deadline | None = None) -> None:
        if self._producer is not None:
            return
        budget_s = self.open_deadline(deadline).operation_budget_s()
        meta = self.meta
        if meta.sasl_mechanism and not meta.use_ssl:
            logger.warning(
                "pump %s: SASL %s without use_ssl sends the password in the clear",
                self.name,
                meta.sasl_mechanism,
            )
        if meta.use_ssl and meta.ssl_insecure_skip_verify:
            logger.warning("pump %s: TLS certificates are not verified", self.name)
        try:
            producer = Producer(self.producer_config())
        except KafkaException as exc:
            raise PumpPermanentError(f"cannot build the Kafka producer: {exc}") from exc
        self._broken = False
        try:
            self._metadata(producer, timeout_s=budget_s)
        except BaseException:
            _discard(producer)
            raise
        self._producer = producer
        logger.info(
            "pump %s: Kafka %s, topic %s, idempotent producer %s%s",
            self.name,
            ",".join(meta.broker),
            meta.topic,
            "on" if meta.idempotence else "off",
            f", broker version {meta.broker_version}" if meta.broker_version else "",
        )

    def _metadata(self, producer: Producer, *, timeout_s: float) -> None:
        """Ask the brokers about the topic (creating it where the broker auto-creates topics);
        raise a pump error saying why it cannot be used.

        A topic being created, or a partition without a leader yet, answers with an error for
        a moment: asked again until ``timeout_s`` is spent.
        """
        topic = self.meta.topic
        budget = Deadline.after(timeout_s)
        while True:
            try:
                metadata = producer.list_topics(topic=topic, timeout=budget.remaining_s())
                entry = metadata.topics.get(topic)
                error = entry.error if entry is not None else None
                if error is None or error.code() in _TOPIC_SETTLING_ERRORS:
                    return
                failure = self._wrap(error, doing=f"topic {topic!r}")
            except KafkaException as exc:
                producer.poll(0)  # serves the error callback: the cause, for the message
                failure = self._wrap(exc.args[0], doing="metadata request")
            if isinstance(failure, PumpPermanentError) or budget.remaining_s() < (
                METADATA_RETRY_PAUSE_S
            ):
                raise failure
            time.sleep(METADATA_RETRY_PAUSE_S)

    def check(self) -> None:
        producer = self._producer
        if producer is None:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        if self._broken:
            raise PumpTemporaryError(
                f"the Kafka producer failed for good ({self._last_client_error}); it is made "
                "again on the next write"
            )
        self._metadata(producer, timeout_s=CHECK_TIMEOUT_S)

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            _discard(producer)

    # -- write --------------------------------------------------------------------------------

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Produce the records and wait for every acknowledgement by ``deadline``.

        Raises :class:`PumpTemporaryError` when any message is not acknowledged in time or
        fails in a way a retry may fix (the whole batch is sent again; consumers drop the copies
        by key), :class:`PumpPermanentError` when the brokers refuse this client (authorization).
        """
        if not records:
            return WriteResult()
        if self._broken:
            # A fatal error (e.g. the idempotent producer's sequence broken) ends a producer.
            self.close()
            self.open(deadline=deadline)
        producer = self._producer
        if producer is None:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        budget = Deadline.after(deadline.operation_budget_s())
        rejected, refused = self._send(producer, records, budget)
        # A broker refuses a partition's whole message set for one message over its limit,
        # so the neighbours of a large message fail with it: send each such message alone,
        # and only one refused on its own is rejected.
        for record, _ in refused:
            early, alone = self._send(producer, [record], budget)
            rejected += early + alone
        return WriteResult(rejected=rejected)

    def _send(
        self, producer: Producer, records: Sequence[AnalyticsRecord], budget: Deadline
    ) -> tuple[list[Rejection], list[Rejection]]:
        """Produce the records and wait for every delivery report within ``budget``.

        Returns the records refused one by one, with the reason: those the client refused
        before sending, and those the broker refused (it may have refused neighbours of a
        large message with it). Raises when any message failed otherwise, or was not
        acknowledged in time.
        """
        deliveries = _Deliveries(records)
        rejected: list[Rejection] = []
        refused: list[Rejection] = []
        topic = self.meta.topic
        meta_data = self.meta.meta_data
        report = deliveries.report
        for index, record in enumerate(records):
            value = message_value(record, meta_data)
            key = record.id or None

            def on_delivery(error: KafkaError | None, _message: object, index: int = index) -> None:
                report(index, error)

            while True:
                try:
                    producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                    break
                except BufferError:
                    # The client's queue is full: let it send, then try again.
                    if budget.expired:
                        self._give_up(producer, deliveries, len(records))
                    producer.poll(QUEUE_FULL_POLL_S)
                except KafkaException as exc:
                    error = exc.args[0]
                    if error.code() in REJECTED_MESSAGE_ERRORS:
                        rejected.append((record, _reason(error)))
                        break
                    producer.purge(in_queue=True, in_flight=False, blocking=False)
                    producer.poll(0)
                    raise self._wrap(error, doing="produce") from exc
        if producer.flush(budget.remaining_s()):
            self._give_up(producer, deliveries, len(records) - len(rejected))
        fatal: KafkaError | None = None
        for index, error in deliveries.failed:
            if error.code() in REJECTED_MESSAGE_ERRORS:
                refused.append((deliveries.records[index], _reason(error)))
            elif fatal is None:
                fatal = error
        if fatal is not None:
            failures = len(deliveries.failed)
            raise self._wrap(
                fatal,
                doing=f"delivery of {failures} of {len(records)} message(s) "
                f"({deliveries.acknowledged} acknowledged; the batch is sent again)",
            )
        return rejected, refused

    def _give_up(self, producer: Producer, deliveries: _Deliveries, sent: int) -> None:
        """Drop what is still queued or in flight and raise: the batch will be sent again."""
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.poll(0)
        last = f"; last client error: {self._last_client_error}" if self._last_client_error else ""
        raise PumpTemporaryError(
            f"Kafka acknowledged {deliveries.acknowledged} of {sent} message(s) within the "
            f"write's time budget{last}; the batch is sent again (consumers drop the copies by "
            "key)"
        )

    def _wrap(self, error: KafkaError, *, doing: str) -> PumpTemporaryError | PumpPermanentError:
        if error.fatal():
            self._broken = True
        message = f"Kafka {doing} failed: {_reason(error)}"
        if self._last_client_error and self._last_client_error != error.str():
            # A timeout says little; the client's last error (a refused connection, a TLS
            # handshake that failed) says why.
            message += f"; last client error: {self._last_client_error}"
        if error.code() in PERMANENT_ERRORS:
            return PumpPermanentError(message)
        return PumpTemporaryError(message)


def _reason(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"


def _discard(producer: Producer) -> None:
    """Close a producer at once, dropping whatever it still holds (nothing, after a write)."""
    producer.purge(in_queue=True, in_flight=True, blocking=False)
    producer.poll(0)
    producer.close()
