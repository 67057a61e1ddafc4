"""The kafka pump against a real Apache Kafka 0.9 broker, and its modern-protocol settings
(idempotent producer, ApiVersion negotiation) against librdkafka's mock cluster.

The 0.9 broker (``tests/servers_kafka.py``) is a process of its own, so these tests also stop
it and start it again. 0.9 has no idempotent producer: the mock cluster, which speaks the
current protocol in-process, covers that; it cannot be killed on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from pumps.base import Pump, WriteResult
from pumps.deadline import Deadline
from pumps.errors import PumpTemporaryError
from pumps.kafka import KafkaPump
from pumps.testing import PumpContract
from pumps.testing.contract import DOWN_SLACK_S, DOWN_TIMEOUT_S, opened, soon
from pumps.testing.records import make_records
from tests.servers_kafka import (
    BROKER_MESSAGE_MAX_BYTES,
    BROKER_VERSION,
    KafkaServer,
    keys_in,
    read_topic,
)
from tests.support import free_port

pytestmark = pytest.mark.integration


def meta_for(server: KafkaServer, topic: str, **extra: Any) -> dict[str, Any]:
    """``meta`` of a pump writing to ``topic`` on the 0.9 broker."""
    return {
        "broker": [server.bootstrap],
        "topic": topic,
        "broker_version": BROKER_VERSION,
        **extra,
    }


class TestKafkaPump(PumpContract):
    """The contract on the real 0.9 broker; each test writes to a topic of its own."""

    pump_class = KafkaPump
    pump_type = "kafka"
    connects = True

    @pytest.fixture(autouse=True)
    def _broker(self, kafka_server: KafkaServer) -> None:
        self.server = kafka_server
        self.topic = kafka_server.new_topic("contract")

    def meta(self, tmp_path: Path) -> dict[str, Any]:
        return meta_for(self.server, self.topic)

    def stored_ids(self, pump: Pump) -> Counter[str]:
        return keys_in(read_topic(self.server.bootstrap, self.topic))

    def meta_at(self, tmp_path: Path, port: int) -> dict[str, Any]:
        return {**self.meta(tmp_path), "broker": [f"127.0.0.1:{port}"]}

    def unreachable_meta(self, tmp_path: Path) -> dict[str, Any]:
        return self.meta_at(tmp_path, free_port())

    def server_address(self) -> tuple[str, int]:
        return self.server.address

    @contextlib.contextmanager
    def server_going_away(self) -> Iterator[tuple[Pump, Callable[[], None]]]:
        """The kit's TCP proxy cuts nothing here: a Kafka client bootstraps through it, then
        connects to the address the broker advertises, past the proxy. The broker itself goes
        away (killed) and comes back."""
        stopped = False

        def take_away() -> None:
            nonlocal stopped
            self.server.stop_broker()
            stopped = True

        try:
            yield self.create(timeout_s=DOWN_TIMEOUT_S), take_away
        finally:
            if stopped:
                self.server.start_broker()


@pytest.fixture
def topic(kafka_server: KafkaServer) -> str:
    return kafka_server.new_topic()


def test_messages_carry_iam_fields_meta_data_and_the_record_id_as_key(
    kafka_server: KafkaServer, topic: str
) -> None:
    records = make_records("shape", 20)
    meta = meta_for(kafka_server, topic, meta_data={"cluster": "eu-1"}, compressed=True)
    pump = KafkaPump.create("kafka", meta, timeout_s=10)
    with opened(pump):
        assert pump.write(records, deadline=soon()) == WriteResult()
    messages = dict(read_topic(kafka_server.bootstrap, topic))
    assert set(messages) == {record.id for record in records}
    first = records[0]
    assert messages[first.id] == {
        "timestamp": first.timestamp,
        "username": first.username,
        "effect": first.effect,
        "conclusion": first.conclusion,
        "request": first.request,
        "policies": first.policies,
        "deciders": first.deciders,
        "expireAt": first.expire_at.isoformat().replace("+00:00", "Z"),
        "cluster": "eu-1",
    }


def test_a_record_the_broker_refuses_is_rejected_alone(
    kafka_server: KafkaServer, topic: str
) -> None:
    """The broker's message.max.bytes is smaller than the client's: the broker refuses the
    message, its delivery report says so, and only that record becomes a dead letter."""
    records = make_records("refused", 6)
    big = records[3] = dataclasses.replace(records[3], request="x" * BROKER_MESSAGE_MAX_BYTES)
    pump = KafkaPump.create("kafka", meta_for(kafka_server, topic), timeout_s=10)
    with opened(pump):
        result = pump.write(records, deadline=soon())
    assert [(record.id, "MSG_SIZE_TOO_LARGE" in reason) for record, reason in result.rejected] == [
        (big.id, True)
    ]
    assert keys_in(read_topic(kafka_server.bootstrap, topic)) == Counter(
        {record.id: 1 for record in records if record is not big}
    )


def test_writes_fail_as_temporary_while_the_broker_is_down_and_succeed_after(
    kafka_server: KafkaServer, topic: str
) -> None:
    """The broker stopped for about 20 s: every write in between is a temporary error within
    its deadline; once it is back, the same batch goes through and nothing is missing."""
    pump = KafkaPump.create("kafka", meta_for(kafka_server, topic), timeout_s=3)
    before = make_records("up", 10)
    during = make_records("down", 10)
    with opened(pump):
        assert pump.write(before, deadline=Deadline.after(3)) == WriteResult()
        kafka_server.stop_broker()
        failures = 0
        try:
            down_until = time.monotonic() + 20
            while time.monotonic() < down_until:
                started = time.monotonic()
                with pytest.raises(
                    PumpTemporaryError, match=r"acknowledged 0 of 10|\(0 acknowledged"
                ):
                    pump.write(during, deadline=Deadline.after(3))
                assert time.monotonic() - started < 3 + DOWN_SLACK_S
                failures += 1
        finally:
            kafka_server.start_broker()
        deadline = time.monotonic() + 60
        while True:  # as the worker would: retry the batch until it is acknowledged
            try:
                assert pump.write(during, deadline=Deadline.after(3)) == WriteResult()
                break
            except PumpTemporaryError:
                assert time.monotonic() < deadline
        pump.check()
    stored = keys_in(read_topic(kafka_server.bootstrap, topic))
    assert failures >= 3
    assert set(stored) == {record.id for record in before + during}
    print(f"\n[kafka broker down 20 s] failed writes: {failures}, stored: {sum(stored.values())}")


# -- the modern protocol: librdkafka's mock cluster ----------------------------------------------


@pytest.fixture
def mock_cluster() -> Iterator[str]:
    """A three-broker mock cluster (current protocol, idempotence included) in this process;
    it lives as long as the client that made it. Other clients reach it by its addresses."""
    owner = Producer({"test.mock.num.brokers": 3, "log_level": 0})
    metadata = owner.list_topics(timeout=10)
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())
    yield bootstrap
    owner.close()


def test_idempotent_producer_on_a_modern_cluster(mock_cluster: str) -> None:
    records = make_records("idem", 500)
    meta = {"broker": mock_cluster, "topic": "iam-analytics", "compressed": True}
    pump = KafkaPump.create("kafka", meta, timeout_s=10)
    config = pump.producer_config()
    assert config["enable.idempotence"] is True
    assert "api.version.request" not in config  # the client asks the brokers
    with opened(pump):
        pump.check()
        assert pump.write(records, deadline=soon()) == WriteResult()
        assert pump.write(records[:10], deadline=soon()) == WriteResult()
    stored = keys_in(read_topic(mock_cluster, "iam-analytics", client={}))
    assert stored == Counter({r.id: 2 if i < 10 else 1 for i, r in enumerate(records)})


def test_idempotence_off_when_asked(mock_cluster: str) -> None:
    meta = {"broker": mock_cluster, "topic": "plain", "idempotent": "false"}
    pump = KafkaPump.create("kafka", meta, timeout_s=10)
    assert pump.producer_config()["enable.idempotence"] is False
    records = make_records("plain", 50)
    with opened(pump):
        assert pump.write(records, deadline=soon()) == WriteResult()
    assert keys_in(read_topic(mock_cluster, "plain", client={})) == Counter(
        {record.id: 1 for record in records}
    )


def test_a_record_over_the_clients_own_limit_is_rejected_alone(mock_cluster: str) -> None:
    """librdkafka refuses a message over its message.max.bytes (1 MB) before sending it."""
    records = make_records("huge", 4)
    huge = records[1] = dataclasses.replace(records[1], request="y" * 1_100_000)
    pump = KafkaPump.create("kafka", {"broker": mock_cluster, "topic": "huge"}, timeout_s=10)
    with opened(pump):
        result = pump.write(records, deadline=soon())
    assert [(r.id, "MSG_SIZE_TOO_LARGE" in reason) for r, reason in result.rejected] == [
        (huge.id, True)
    ]
    assert keys_in(read_topic(mock_cluster, "huge", client={})) == Counter(
        {r.id: 1 for r in records if r is not huge}
    )


def test_records_without_an_id_are_sent_without_a_key(mock_cluster: str) -> None:
    records = [dataclasses.replace(r, id="") for r in make_records("noid", 3)]
    pump = KafkaPump.create("kafka", {"broker": mock_cluster, "topic": "noid"}, timeout_s=10)
    with opened(pump):
        assert pump.write(records, deadline=soon()) == WriteResult()
    messages = read_topic(mock_cluster, "noid", client={})
    assert sorted(value["request"] for _, value in messages) == sorted(r.request for r in records)
    assert keys_in(messages) == Counter({"": 3})


# -- TLS: the 0.9 broker's TLS listener, which asks for a client certificate ---------------------


def tls_meta(server: KafkaServer, topic: str, **extra: Any) -> dict[str, Any]:
    assert server.certs is not None
    return {
        "broker": [server.ssl_bootstrap],
        "topic": topic,
        "broker_version": BROKER_VERSION,
        "use_ssl": True,
        "ssl_ca_file": str(server.certs.ca),
        "ssl_cert_file": str(server.certs.client_cert),
        "ssl_key_file": str(server.certs.client_key),
        **extra,
    }


def test_tls_with_the_brokers_ca_and_a_client_certificate(
    kafka_server: KafkaServer, topic: str
) -> None:
    records = make_records("tls", 30)
    pump = KafkaPump.create("kafka", tls_meta(kafka_server, topic), timeout_s=10)
    with opened(pump):
        pump.check()
        assert pump.write(records, deadline=soon()) == WriteResult()
    assert keys_in(read_topic(kafka_server.bootstrap, topic)) == Counter(
        {record.id: 1 for record in records}
    )


@pytest.mark.parametrize("fault", ["other CA", "no client certificate"])
def test_tls_that_cannot_be_established_is_a_temporary_error_saying_why(
    kafka_server: KafkaServer, topic: str, fault: str
) -> None:
    assert kafka_server.certs is not None
    if fault == "other CA":
        meta = tls_meta(kafka_server, topic, ssl_ca_file=str(kafka_server.certs.other_ca))
    else:
        meta = {**tls_meta(kafka_server, topic), "ssl_cert_file": "", "ssl_key_file": ""}
    pump = KafkaPump.create("kafka", meta, timeout_s=DOWN_TIMEOUT_S)
    started = time.monotonic()
    with pytest.raises(PumpTemporaryError, match=r"(?i)ssl|handshake|certificate") as caught:
        pump.open()
    assert time.monotonic() - started < DOWN_TIMEOUT_S + DOWN_SLACK_S
    pump.close()
    print(f"\n[{fault}] {caught.value}")


def test_tls_without_verification_accepts_a_certificate_of_another_ca(
    kafka_server: KafkaServer, topic: str
) -> None:
    assert kafka_server.certs is not None
    meta = tls_meta(
        kafka_server,
        topic,
        ssl_ca_file=str(kafka_server.certs.other_ca),
        ssl_insecure_skip_verify=True,
    )
    records = make_records("insecure", 5)
    with opened(KafkaPump.create("kafka", meta, timeout_s=10)) as pump:
        assert pump.write(records, deadline=soon()) == WriteResult()
    assert len(keys_in(read_topic(kafka_server.bootstrap, topic))) == 5
