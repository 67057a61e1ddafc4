"""The kafka pump's ``meta``: iam's keys as iam-pump.yaml gives them, ours, and the librdkafka
settings they make (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.errors import ConfigError
from app.record import go_time_text as go_time
from pumps.kafka import KafkaPump, message_value
from pumps.kafka_meta import KafkaMeta
from pumps.settings import parse_pump_settings
from pumps.testing.records import make_records


def pump(**meta: Any) -> KafkaPump:
    return KafkaPump.create("kafka", {"broker": ["k1:9092"], "topic": "t", **meta}, timeout_s=30)


def test_iam_keys_load() -> None:
    settings = parse_pump_settings(
        """
pumps:
  kafka:
    type: kafka
    meta:
      broker: ["k1:9092", "k2:9092"]
      client_id: iam-pump-eu
      topic: iam-analytics
      timeout: 10s
      meta_data: {cluster: eu-1}
      compressed: true
      use_ssl: true
      ssl_insecure_skip_verify: false
      ssl_cert_file: /etc/c.pem
      ssl_key_file: /etc/k.pem
      sasl_mechanism: scram
      sasl_username: u
      sasl_password: p
      sasl_algorithm: SHA-512
"""
    )
    meta = KafkaMeta.model_validate(settings.pumps["kafka"].meta)
    assert meta.broker == ("k1:9092", "k2:9092")
    assert meta.timeout == 10
    assert meta.sasl_mechanism == "SCRAM" and meta.sasl_algorithm == "sha-512"
    config = KafkaPump("kafka", meta, timeout_s=30).producer_config()
    assert config["bootstrap.servers"] == "k1:9092,k2:9092"
    assert config["client.id"] == "iam-pump-eu"
    assert config["compression.type"] == "snappy"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["ssl.certificate.location"] == "/etc/c.pem"
    assert config["socket.timeout.ms"] == 10_000
    assert config["acks"] == "all"
    assert config["enable.idempotence"] is True


def test_defaults_and_a_comma_separated_broker_string() -> None:
    config = pump(broker="a:1, b:2").producer_config()
    assert config["bootstrap.servers"] == "a:1,b:2"
    assert config["client.id"] == "iam-pump"
    assert config["security.protocol"] == "PLAINTEXT"
    assert config["compression.type"] == "none"
    assert config["socket.timeout.ms"] == 30_000  # timeout unset: the pump's own


def test_plain_sasl_without_tls_and_skipping_verification() -> None:
    config = pump(sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p").producer_config()
    assert config["security.protocol"] == "SASL_PLAINTEXT"
    assert config["sasl.mechanism"] == "PLAIN"
    config = pump(use_ssl=True, ssl_insecure_skip_verify=True).producer_config()
    assert config["security.protocol"] == "SSL"
    assert config["enable.ssl.certificate.verification"] is False


@pytest.mark.parametrize(
    ("meta", "idempotent", "asks"),
    [
        ({}, True, True),
        ({"broker_version": "0.9.0"}, False, False),
        ({"broker_version": "0.10.2"}, False, True),
        ({"broker_version": "0.11.0"}, True, True),
        ({"broker_version": "2.8.1", "idempotent": "false"}, False, True),
        ({"idempotent": False}, False, True),
        ({"idempotent": True}, True, True),
    ],
)
def test_idempotence_and_the_broker_version(
    meta: dict[str, Any], idempotent: bool, asks: bool
) -> None:
    config = pump(**meta).producer_config()
    assert config["enable.idempotence"] is idempotent
    assert ("api.version.request" not in config) is asks
    if not asks:
        assert config["broker.version.fallback"] == meta["broker_version"]


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"broker": []}, "at least one broker"),
        ({"broker": ["http://k:9092"]}, "host:port"),
        ({"topic": "bad topic"}, "topic name"),
        ({"topic": "x" * 250}, "at most 249"),
        ({"timeout": "soon"}, "Go duration"),
        ({"meta_data": {"username": "x"}}, "username would replace"),
        ({"sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
        ({"sasl_mechanism": "PLAIN"}, "needs sasl_username"),
        ({"sasl_algorithm": "md5"}, "sasl_algorithm"),
        ({"ssl_cert_file": "/c.pem"}, "go together"),
        ({"broker_version": "old"}, "Kafka version"),
        ({"broker_version": "0.9.0", "idempotent": "true"}, "needs Kafka 0.11"),
        ({"idempotent": "maybe"}, "idempotent"),
        ({"brokers": ["k:1"]}, "brokers"),
    ],
)
def test_bad_meta_is_refused_naming_the_key(meta: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        KafkaMeta.model_validate({"broker": ["k1:9092"], "topic": "t", **meta})


def test_a_bad_key_is_named_by_its_path_in_the_config() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pump_settings(
            "pumps: {k: {type: kafka, meta: {broker: [k:1], topic: t, timeout: x}}}"
        )
    assert "pumps.k.meta.timeout" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_pump_settings("pumps: {k: {type: kafka, meta: {broker: [k:1]}}}")
    assert "pumps.k.meta.topic" in str(caught.value)


def test_the_message_has_iam_field_names_and_go_times() -> None:
    import json

    record = make_records("value", 1)[0]
    value = json.loads(message_value(record, {"dc": "eu"}))
    assert list(value) == [
        "timestamp",
        "username",
        "effect",
        "conclusion",
        "request",
        "policies",
        "deciders",
        "expireAt",
        "dc",
    ]
    assert value["expireAt"].endswith("Z")
    assert go_time(record.expire_at) == value["expireAt"]
