"""The ``meta`` of the kafka pump.

iam's keys, as its ``KafkaConf`` names them::

    broker                  the bootstrap brokers: a YAML list, or one comma-separated string
                            (``host:port``); required
    client_id               the client id the brokers see; default ``iam-pump``
    topic                   the topic records go to; required
    timeout                 seconds or a Go duration (``10s``): how long connecting and each
                            request may take; 0 or unset: the pump's own ``timeout``
    meta_data               a map of strings added to every message (``{"cluster": "eu-1"}``);
                            a key may not be one of the record's field names
    compressed              compress message sets with snappy, as iam does
    use_ssl                 TLS to the brokers, verifying their certificates (the system's CAs,
                            or ``ssl_ca_file``)
    ssl_insecure_skip_verify   accept any certificate
    ssl_cert_file, ssl_key_file   client certificate and key (PEM), both or neither
    sasl_mechanism          ``PLAIN`` or ``SCRAM`` (either case); TLS is strongly advised
    sasl_username, sasl_password
    sasl_algorithm          for SCRAM: ``sha-256`` (default) or ``sha-512``

Ours, which iam does not have::

    ssl_ca_file             PEM file of the CA that signed the brokers' certificates
    broker_version          the brokers' Kafka version when it is older than 0.10 (``0.9.0``):
                            the client then speaks that version's protocol instead of asking
                            the broker, which brokers before 0.10 cannot answer; unset: ask
    idempotent              ``auto`` (default), ``true`` or ``false``: the idempotent producer,
                            so a message the client sends again after a lost acknowledgement is
                            stored once. ``auto`` turns it on unless ``broker_version`` is older
                            than 0.11, which has no idempotent producer; ``true`` with such a
                            ``broker_version`` is refused
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.config_text import parse_duration_s
from app.record import JSON_NAMES

DEFAULT_CLIENT_ID = "iam-pump"
#: Kafka's own limit on topic names, and the characters it allows.
MAX_TOPIC_NAME_CHARS = 249
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]+")
_BROKER_ADDRESS = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^\s:/,\[\]]+)(:\d{1,5})?")
_VERSION = re.compile(r"\d+(\.\d+){1,3}")
#: The first Kafka version with the idempotent producer.
IDEMPOTENCE_SINCE = (0, 11)
#: The first Kafka version that answers an ApiVersion request.
API_VERSIONS_SINCE = (0, 10)
#: Names a ``meta_data`` key may not take: the message's own fields (iam would overwrite them).
RESERVED_MESSAGE_KEYS = frozenset(JSON_NAMES)

SaslMechanism = Literal["", "PLAIN", "SCRAM"]


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.9.0.1"`` -> ``(0, 9, 0, 1)``."""
    return tuple(int(part) for part in version.split("."))


class KafkaMeta(BaseModel):
    """``meta`` of the kafka pump; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: tuple[str, ...]
    client_id: str = DEFAULT_CLIENT_ID
    topic: str
    timeout: float = Field(default=0.0, ge=0)
    meta_data: dict[str, str] = Field(default_factory=dict)
    compressed: bool = False
    use_ssl: bool = False
    ssl_insecure_skip_verify: bool = False
    ssl_cert_file: str = ""
    ssl_key_file: str = ""
    ssl_ca_file: str = ""
    sasl_mechanism: SaslMechanism = ""
    sasl_username: str = ""
    sasl_password: str = ""
    sasl_algorithm: Literal["sha-256", "sha-512"] = "sha-256"
    broker_version: str = ""
    idempotent: Literal["auto", "true", "false"] = "auto"

    @field_validator("broker", mode="before")
    @classmethod
    def _split_brokers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("broker")
    @classmethod
    def _brokers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one broker address (host:port) is needed")
        for address in value:
            if not _BROKER_ADDRESS.fullmatch(address):
                raise ValueError(f"expected host:port, got {address!r}")
        return tuple(dict.fromkeys(value))

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if value in {"", ".", ".."} or not _TOPIC_NAME.fullmatch(value):
            raise ValueError(
                "a topic name is made of letters, digits, '.', '_' and '-', and is not '.' or '..'"
            )
        if len(value) > MAX_TOPIC_NAME_CHARS:
            raise ValueError(f"a topic name is at most {MAX_TOPIC_NAME_CHARS} characters")
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration_s(value)

    @field_validator("meta_data")
    @classmethod
    def _meta_data(cls, value: dict[str, str]) -> dict[str, str]:
        clash = sorted(RESERVED_MESSAGE_KEYS.intersection(value))
        if clash:
            raise ValueError(
                f"key(s) {', '.join(clash)} would replace the record's own field(s); rename them"
            )
        return value

    @field_validator("sasl_mechanism", "sasl_algorithm", "idempotent", mode="before")
    @classmethod
    def _case(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "true" if value else "false"
        if not isinstance(value, str):
            return value
        return value.upper() if value.lower() in {"plain", "scram"} else value.lower()

    @field_validator("broker_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value and not _VERSION.fullmatch(value):
            raise ValueError(f"expected a Kafka version like 0.9.0, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> KafkaMeta:
        if bool(self.ssl_cert_file) != bool(self.ssl_key_file):
            raise ValueError("ssl_cert_file and ssl_key_file go together")
        if self.sasl_mechanism and not (self.sasl_username and self.sasl_password):
            raise ValueError("sasl_mechanism needs sasl_username and sasl_password")
        if self.idempotent == "true" and not self.broker_supports_idempotence:
            raise ValueError(
                f"idempotent: true needs Kafka 0.11 or later; broker_version is "
                f"{self.broker_version} (use idempotent: auto or false)"
            )
        return self

    @property
    def broker_supports_idempotence(self) -> bool:
        """False only when ``broker_version`` says the brokers are older than 0.11."""
        return not self.broker_version or version_tuple(self.broker_version) >= IDEMPOTENCE_SINCE

    @property
    def idempotence(self) -> bool:
        """Whether the producer is idempotent (``idempotent`` resolved against the version)."""
        if self.idempotent == "auto":
            return self.broker_supports_idempotence
        return self.idempotent == "true"

    @property
    def asks_broker_version(self) -> bool:
        """Whether the client asks the brokers their version (they must be 0.10 or later)."""
        return not self.broker_version or version_tuple(self.broker_version) >= API_VERSIONS_SINCE
