"""A real Apache Kafka 0.9.0.1 broker (and its ZooKeeper) for the Kafka pump's tests.

The jars come from ``scripts/test-servers.sh install`` (under ``$IAM_PUMP_SERVERS_DIR/kafka/libs``,
by default ``.cache/test-servers/kafka/libs``). One broker per test session, on free ports with
its data under the session's tmp folder, stopped by PID at the end. Being a process of its own,
the broker can be stopped and started again by a test (:meth:`KafkaServer.stop_broker`,
:meth:`KafkaServer.start_broker`); its log folder survives, as a restarted broker's does.

Clients must speak 0.9: ``api.version.request=false`` and ``broker.version.fallback=0.9.0``
(the pump's ``broker_version: 0.9.0``). Topics come from the broker's auto-creation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support import REPO, free_port, port_open

if TYPE_CHECKING:
    from tests.security.certs import Certs

SERVERS_DIR = Path(os.environ.get("IAM_PUMP_SERVERS_DIR", REPO / ".cache" / "test-servers"))
KAFKA_LIBS = SERVERS_DIR / "kafka" / "libs"
#: The broker's version, as the pump's ``broker_version`` and librdkafka's fallback name it.
BROKER_VERSION = "0.9.0"
#: librdkafka settings for a 0.9 broker (no ApiVersion request, the 0.9 protocol).
CLIENT_09: dict[str, Any] = {
    "api.version.request": False,
    "broker.version.fallback": BROKER_VERSION,
}
START_TIMEOUT_S = 60.0
#: The password of the broker's key and trust stores (made for the session, thrown away).
STORE_PASSWORD = "test-store"
#: The broker's largest message; the client's own limit is about 1 MB.
BROKER_MESSAGE_MAX_BYTES = 262_144
STOP_TIMEOUT_S = 15.0


def _classpath() -> str:
    return ":".join(str(jar) for jar in sorted(KAFKA_LIBS.glob("*.jar")))


def _write_properties(path: Path, values: dict[str, object]) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


class BrokerExited(RuntimeError):
    """The broker process ended while we waited for it to answer."""


class KafkaServer:
    """ZooKeeper and one Kafka 0.9 broker, each a child process of the test session."""

    def __init__(self, folder: Path, *, certs: Certs | None = None) -> None:
        self.folder = folder
        self.zookeeper_port = free_port()
        self.port = free_port()
        #: With ``certs``: a TLS listener that asks for a client certificate signed by the CA.
        self.certs = certs
        self.ssl_port = free_port() if certs is not None else None
        self._zookeeper: subprocess.Popen[bytes] | None = None
        self._broker: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ssl_bootstrap(self) -> str:
        assert self.ssl_port is not None, "started without certs"
        return f"127.0.0.1:{self.ssl_port}"

    def _ssl_properties(self) -> dict[str, object]:
        """The TLS listener's settings: PKCS12 key store from the PEM pair, JKS trust store."""
        if self.certs is None:
            return {}
        keystore, truststore = self.folder / "server.p12", self.folder / "trust.jks"
        if not keystore.exists():
            subprocess.run(
                ["openssl", "pkcs12", "-export", "-in", str(self.certs.server_cert),
                 "-inkey", str(self.certs.server_key), "-name", "kafka", "-out", str(keystore),
                 "-passout", f"pass:{STORE_PASSWORD}"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            subprocess.run(
                ["keytool", "-importcert", "-noprompt", "-alias", "ca", "-file",
                 str(self.certs.ca), "-keystore", str(truststore), "-storetype", "JKS",
                 "-storepass", STORE_PASSWORD],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        return {
            "ssl.keystore.location": keystore,
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.password": STORE_PASSWORD,
            "ssl.key.password": STORE_PASSWORD,
            "ssl.truststore.location": truststore,
            "ssl.truststore.type": "JKS",
            "ssl.truststore.password": STORE_PASSWORD,
            "ssl.client.auth": "required",
            "ssl.enabled.protocols": "TLSv1.2",
        }

    def _java(self, main_class: str, properties: Path, log_name: str) -> subprocess.Popen[bytes]:
        log4j = _write_properties(
            self.folder / "log4j.properties",
            {
                "log4j.rootLogger": "WARN, stdout",
                "log4j.appender.stdout": "org.apache.log4j.ConsoleAppender",
                "log4j.appender.stdout.layout": "org.apache.log4j.PatternLayout",
                "log4j.appender.stdout.layout.ConversionPattern": "[%d] %p %m (%c)%n",
            },
        )
        with (self.folder / log_name).open("ab") as log:
            return subprocess.Popen(
                [
                    "java",
                    "-Xmx512m",
                    "-Xss1m",
                    f"-Dlog4j.configuration=file:{log4j}",
                    "-cp",
                    _classpath(),
                    main_class,
                    str(properties),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,
            )

    def start(self) -> None:
        """Start ZooKeeper, then the broker; return once the broker serves metadata."""
        zookeeper = _write_properties(
            self.folder / "zookeeper.properties",
            {
                "dataDir": self.folder / "zookeeper-data",
                "clientPortAddress": "127.0.0.1",
                "clientPort": self.zookeeper_port,
                "maxClientCnxns": 0,
            },
        )
        self._zookeeper = self._java(
            "org.apache.zookeeper.server.quorum.QuorumPeerMain", zookeeper, "zookeeper.log"
        )
        self._wait(lambda: port_open("127.0.0.1", self.zookeeper_port), "ZooKeeper")
        self.start_broker()

    def start_broker(self) -> None:
        """Start the broker (again) on the same port and log folder; wait until it answers."""
        properties = _write_properties(
            self.folder / "server.properties",
            {
                "broker.id": 0,
                "listeners": ",".join(
                    [f"PLAINTEXT://127.0.0.1:{self.port}"]
                    + ([f"SSL://127.0.0.1:{self.ssl_port}"] if self.ssl_port else [])
                ),
                **self._ssl_properties(),
                "log.dirs": self.folder / "kafka-logs",
                "zookeeper.connect": f"127.0.0.1:{self.zookeeper_port}",
                "zookeeper.connection.timeout.ms": 30000,
                "zookeeper.session.timeout.ms": 6000,
                "auto.create.topics.enable": "true",
                "num.partitions": 3,
                "default.replication.factor": 1,
                "offsets.topic.replication.factor": 1,
                "group.max.session.timeout.ms": 300000,
                "controlled.shutdown.enable": "false",
                "delete.topic.enable": "true",
                # Small, so a test can send a record the broker itself refuses.
                "message.max.bytes": BROKER_MESSAGE_MAX_BYTES,
            },
        )
        # A broker killed a moment ago is still registered in ZooKeeper until its session
        # expires (zookeeper.session.timeout.ms); a new one exits until then: start it again.
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self._broker = self._java("kafka.Kafka", properties, "kafka.log")
            try:
                self._wait(self._broker_answers, "the Kafka broker")
                return
            except BrokerExited:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def stop_broker(self, *, sig: int = signal.SIGKILL) -> None:
        """Stop the broker process (killed by default, as a crash would), leaving ZooKeeper."""
        broker, self._broker = self._broker, None
        if broker is not None:
            _stop(broker, sig)
        self._wait(lambda: not port_open("127.0.0.1", self.port), "the broker's port to close")

    def stop(self) -> None:
        self.stop_broker(sig=signal.SIGTERM)
        zookeeper, self._zookeeper = self._zookeeper, None
        if zookeeper is not None:
            _stop(zookeeper, signal.SIGTERM)

    def _broker_answers(self) -> bool:
        from confluent_kafka import KafkaException, Producer

        if self._broker is not None and self._broker.poll() is not None:
            raise BrokerExited(f"the Kafka broker exited; see {self.folder / 'kafka.log'}")
        if not port_open("127.0.0.1", self.port):
            return False
        producer = Producer({"bootstrap.servers": self.bootstrap, **CLIENT_09, "log_level": 0})
        try:
            metadata = producer.list_topics(timeout=2)
        except KafkaException:
            return False
        return bool(metadata.brokers)

    def _wait(self, condition: Any, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what}: not ready within {START_TIMEOUT_S:.0f} s; see {self.folder}")

    def new_topic(self, prefix: str = "iam") -> str:
        """A topic name of the caller's own (the broker creates it on first use)."""
        return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _stop(process: subprocess.Popen[bytes], sig: int) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


def read_topic(
    bootstrap: str, topic: str, *, client: dict[str, Any] | None = None, timeout_s: float = 30.0
) -> list[tuple[str, dict[str, Any]]]:
    """Every message of ``topic`` up to its end now, as (key, decoded JSON value).

    Each partition is read from its first offset to its high watermark (no consumer group, so
    nothing waits for a group to form).
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            **(CLIENT_09 if client is None else client),
            "group.id": f"read-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    messages: list[tuple[str, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while True:  # a broker that just started may not lead its partitions yet
            try:
                metadata = consumer.list_topics(topic, timeout=timeout_s)
                ends = {
                    partition: consumer.get_watermark_offsets(
                        TopicPartition(topic, partition), timeout=timeout_s
                    )
                    for partition in sorted(metadata.topics[topic].partitions)
                }
                break
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        wanted = {p: high for p, (low, high) in ends.items() if high > low}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in wanted])
        while wanted and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            partition = message.partition()
            messages.append(
                ((message.key() or b"").decode(), json.loads(message.value() or b"null"))
            )
            if partition in wanted and (message.offset() or 0) + 1 >= wanted[partition]:
                del wanted[partition]
        if wanted:
            raise TimeoutError(f"{topic}: partitions {sorted(wanted)} not read to their end")
    finally:
        consumer.close()
    return messages


def keys_in(messages: list[tuple[str, dict[str, Any]]]) -> Counter[str]:
    """How many messages carry each key."""
    return Counter(key for key, _ in messages)


@pytest.fixture(scope="session")
def kafka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    """The session's Kafka 0.9 broker (skips locally, fails in CI, when it is not installed)."""
    from tests.conftest import require
    from tests.security.certs import make_certs

    require(
        shutil.which("java") is not None and any(KAFKA_LIBS.glob("kafka_*.jar")),
        f"Kafka 0.9 jars in {KAFKA_LIBS} and java (scripts/test-servers.sh install)",
    )
    folder = tmp_path_factory.mktemp("kafka")
    server = KafkaServer(folder, certs=make_certs(folder / "certs"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def topic_size(bootstrap: str, topic: str, *, client: dict[str, Any] | None = None) -> int:
    """Messages in ``topic`` now (the sum of its partitions' watermark spans); 0 if unknown."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            **(CLIENT_09 if client is None else client),
            "group.id": "size",
            "log_level": 0,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=5)
        total = 0
        for partition in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5)
            total += high - low
        return total
    except KafkaException:
        return 0
    finally:
        consumer.close()
