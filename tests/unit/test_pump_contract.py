"""The pump contract, run against every pump; then what each store pump adds to it.

The csv, stdout and memory cases need no server. The MongoDB and Elasticsearch cases use the
servers at ``MONGO_URI`` and ``ES_URL`` (skipped locally when absent, failing in CI), each test in
its own database or index, dropped afterwards. Records are told apart by their ``username``,
unique per record, which every sink keeps (the aggregate one as a dimension).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import pytest
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elasticsearch import ApiError, Elasticsearch
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import AutoReconnect, BulkWriteError, NotPrimaryError, OperationFailure

from app.config import parse_settings
from app.errors import ConfigError
from app.record import GO_ZERO_TIME, AnalyticsRecord
from pumps.base import Pump, WriteResult
from pumps.deadline import Deadline
from pumps.elasticsearch import ElasticsearchPump
from pumps.errors import PumpError, PumpPermanentError, PumpTemporaryError
from pumps.memory import MemoryPump
from pumps.mongo import MongoPump
from pumps.mongo_aggregate import MongoAggregatePump, request_resource
from pumps.pipeline import run_pipeline, size_limit
from pumps.registry import resolve_pump_class
from tests.stores import MONGO_URI, es_address, mongo_address, mongo_url_for
from tests.support import free_port, read_csv_rows

P = TypeVar("P", bound=Pump)

#: A fixed time (2026-11-24 06:00 UTC) so buckets and daily indices are known in advance.
NOW_S = 1_795_500_000
EXPIRE_AT = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
#: The timeout the "server down" cases give a pump, and how much later than that it may answer.
DOWN_TIMEOUT_S = 2.0
DOWN_SLACK_S = 2.0
#: The deadline a write gets when the test is not about time.
WRITE_TIMEOUT_S = 10.0
#: What a write that the sink took whole returns.
ALL_WRITTEN = WriteResult()


def soon() -> Deadline:
    """The deadline of a write whose test is not about time."""
    return Deadline.after(WRITE_TIMEOUT_S)
OVERSIZED_REQUEST_BYTES = 64 * 1024
SIZE_LIMIT_BYTES = 16 * 1024


# -- records -------------------------------------------------------------------------------


def make_records(
    tag: str, count: int, *, batch: str | None = None, timestamp: int = NOW_S
) -> list[AnalyticsRecord]:
    """Records of one batch, each with a unique username and a request naming a resource."""
    batch = batch or uuid.uuid4().hex
    return [
        AnalyticsRecord(
            timestamp=timestamp + index,
            username=f"u-{tag}-{index}",
            effect="allow" if index % 3 else "deny",
            conclusion=f"conclusion {index}",
            request=json.dumps({"resource": f"res-{index % 2}", "action": "read", "n": index}),
            policies='[{"id": "p1"}]',
            deciders='[{"id": "d1"}]',
            expire_at=EXPIRE_AT,
            id=f"{batch}-{index}",
        )
        for index in range(count)
    ]


def copies(records: Sequence[AnalyticsRecord]) -> list[AnalyticsRecord]:
    """The same records as new objects, as a redelivered batch decodes them."""
    return [dataclasses.replace(record) for record in records]


# -- servers -------------------------------------------------------------------------------


@pytest.fixture
def es(es_url: str) -> Iterator[Elasticsearch]:
    client = Elasticsearch(es_url.split(","), request_timeout=10)
    yield client
    client.close()


@pytest.fixture
def es_index(es: Elasticsearch) -> Iterator[str]:
    """An index name of this test's own; its indices and template are deleted afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    for index in es.indices.get(index=f"{name}*").body:
        es.indices.delete(index=index)
    if es.indices.exists_index_template(name=name):
        es.indices.delete_index_template(name=name)


def es_usernames(es: Elasticsearch, index_name: str) -> Counter[str]:
    es.indices.refresh(index=f"{index_name}*")
    hits = es.search(index=f"{index_name}*", query={"match_all": {}}, size=10_000).body["hits"]
    return Counter(hit["_source"]["username"] for hit in hits["hits"])


class TcpProxy:
    """Forwards a local port to a server until :meth:`stop`: a server that goes away."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._pipes: list[threading.Thread] = []
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                pipe = threading.Thread(target=self._pipe, args=(source, target), daemon=True)
                self._pipes.append(pipe)
                pipe.start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Close the port and every connection through it."""
        self._stopped.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for pipe in self._pipes:
            pipe.join(5)
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        yield listener.getsockname()[1]


# -- one harness per sink ------------------------------------------------------------------


class Sink:
    """How the contract tests build one kind of pump and read back what it stored."""

    kind: ClassVar[str]
    #: What happens to a record far larger than the others.
    oversize: ClassVar[Literal["pipeline", "trim", "counted"]] = "pipeline"
    #: True when the pump talks to a server (the "server down" cases apply).
    networked: ClassVar[bool] = False

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self.name = f"contract-{self.kind}"

    def meta(self, **overrides: Any) -> dict[str, Any]:
        return overrides

    def pump(self, *, timeout_s: float = 10.0, **meta: Any) -> Pump:
        return resolve_pump_class(self.kind).create(
            self.name, self.meta(**meta), timeout_s=timeout_s
        )

    def counts(self) -> Counter[str]:
        """Copies stored (or counted) per username."""
        raise NotImplementedError

    def unreachable_pump(self, *, timeout_s: float) -> Pump:
        """A pump whose sink cannot be used at all."""
        raise NotImplementedError

    def pump_at_port(self, port: int, *, timeout_s: float) -> Pump:
        """A pump pointed at a server on 127.0.0.1:port (networked sinks only)."""
        raise NotImplementedError

    def target(self) -> tuple[str, int]:
        raise NotImplementedError


class CsvSink(Sink):
    kind = "csv"

    def meta(self, **overrides: Any) -> dict[str, Any]:
        return {"csv_dir": str(self.tmp_path / "csv"), **overrides}

    def counts(self) -> Counter[str]:
        return Counter(row["Username"] for row in read_csv_rows(self.tmp_path / "csv"))

    def unreachable_pump(self, *, timeout_s: float) -> Pump:
        blocker = self.tmp_path / "a-file"
        blocker.write_text("not a folder")
        return self.pump(timeout_s=timeout_s, csv_dir=str(blocker / "csv"))


class StdoutSink(Sink):
    kind = "stdout"

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        super().__init__(request, tmp_path)
        self.capsys: pytest.CaptureFixture[str] = request.getfixturevalue("capsys")
        self.lines: list[str] = []

    def counts(self) -> Counter[str]:
        self.lines += self.capsys.readouterr().out.splitlines()
        return Counter(json.loads(line)["username"] for line in self.lines if line)

    def unreachable_pump(self, *, timeout_s: float) -> Pump:
        class BrokenStdout:
            def write(self, text: str) -> int:
                raise BrokenPipeError(32, "Broken pipe")

            def flush(self) -> None:
                raise BrokenPipeError(32, "Broken pipe")

        monkeypatch: pytest.MonkeyPatch = self.request.getfixturevalue("monkeypatch")
        monkeypatch.setattr(sys, "stdout", BrokenStdout())
        return self.pump(timeout_s=timeout_s)


class MemorySink(Sink):
    kind = "memory"

    def counts(self) -> Counter[str]:
        return Counter(record.username for record in MemoryPump.records(self.name))

    def unreachable_pump(self, *, timeout_s: float) -> Pump:
        return self.pump(timeout_s=timeout_s, fail_times=1)


class MongoSink(Sink):
    kind = "mongo"
    oversize: ClassVar[Literal["pipeline", "trim", "counted"]] = "trim"
    networked = True

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        super().__init__(request, tmp_path)
        self.database: Database[dict[str, Any]] = request.getfixturevalue("mongo_db")
        self.collection_name = "analytics"

    def meta(self, **overrides: Any) -> dict[str, Any]:
        return {
            "mongo_url": mongo_url_for(self.database.name),
            "collection_name": self.collection_name,
            **overrides,
        }

    @property
    def collection(self) -> Collection[dict[str, Any]]:
        return self.database[self.collection_name]

    def counts(self) -> Counter[str]:
        return Counter(doc["username"] for doc in self.collection.find({}, {"username": 1}))

    def target(self) -> tuple[str, int]:
        return mongo_address(MONGO_URI)

    def pump_at_port(self, port: int, *, timeout_s: float) -> Pump:
        url = mongo_url_for(self.database.name, port=port)
        return self.pump(timeout_s=timeout_s, mongo_url=url)

    def unreachable_pump(self, *, timeout_s: float) -> Pump:
        return self.pump_at_port(free_port(), timeout_s=timeout_s)


class MongoAggregateSink(MongoSink):
    kind = "mongo-aggregate"
    oversize: ClassVar[Literal["pipeline", "trim", "counted"]] = "counted"

    def counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for doc in self.collection.find({"dimension": "username"}):
            counts[doc["value"]] += doc["hits"]
        return counts


class ElasticsearchSink(Sink):
    kind = "elasticsearch"
    networked = True

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        super().__init__(request, tmp_path)
        self.es: Elasticsearch = request.getfixturevalue("es")
        self.index_name: str = request.getfixturevalue("es_index")
        self.url: str = request.getfixturevalue("es_url")

    def meta(self, **overrides: Any) -> dict[str, Any]:
        return {"elasticsearch_url": self.url, "index_name": self.index_name, **overrides}

    def counts(self) -> Counter[str]:
        return es_usernames(self.es, self.index_name)

    def target(self) -> tuple[str, int]:
        return es_address(self.url)

    def pump_at_port(self, port: int, *, timeout_s: float) -> Pump:
        return self.pump(timeout_s=timeout_s, elasticsearch_url=f"http://127.0.0.1:{port}")

    def unreachable_pump(self, *, timeout_s: float) -> Pump:
        return self.pump_at_port(free_port(), timeout_s=timeout_s)


SINKS: dict[str, type[Sink]] = {
    sink.kind: sink
    for sink in (
        CsvSink,
        StdoutSink,
        MemorySink,
        MongoSink,
        MongoAggregateSink,
        ElasticsearchSink,
    )
}
STORE_KINDS = [kind for kind, sink in SINKS.items() if sink.networked]


def _params(kinds: Sequence[str]) -> list[Any]:
    return [
        pytest.param(
            kind, id=kind, marks=[pytest.mark.integration] if SINKS[kind].networked else []
        )
        for kind in kinds
    ]


@pytest.fixture(params=_params(list(SINKS)))
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Sink:
    return SINKS[request.param](request, tmp_path)


@pytest.fixture(params=_params(STORE_KINDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Sink:
    return SINKS[request.param](request, tmp_path)


@contextlib.contextmanager
def opened(pump: P) -> Iterator[P]:
    pump.open()
    try:
        yield pump
    finally:
        pump.close()


# -- the contract --------------------------------------------------------------------------


def test_every_pump_is_registered_by_type(sink: Sink) -> None:
    assert resolve_pump_class(sink.kind) is type(sink.pump())


def test_write_stores_each_record_once(sink: Sink) -> None:
    records = make_records("write", 25)
    pump = sink.pump()
    with opened(pump):
        pump.check()
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
        assert pump.write([], deadline=soon()) == ALL_WRITTEN
    pump.close()  # a second close is harmless
    assert sink.counts() == {record.username: 1 for record in records}


def test_redelivered_batch_is_stored_once_by_upserting_pumps(sink: Sink) -> None:
    """Upserting pumps store a redelivered batch once; the others are at-least-once (2 copies)."""
    records = make_records("again", 25)
    pump = sink.pump()
    with opened(pump):
        pump.write(records, deadline=soon())
        pump.write(copies(records), deadline=soon())
    expected = 1 if pump.upserts else 2
    assert sink.counts() == {record.username: expected for record in records}
    assert pump.upserts == (sink.kind in {"memory", *STORE_KINDS})


def test_oversized_record(sink: Sink) -> None:
    """A record far larger than the rest never takes its batch down with it.

    mongo trims it itself and marks it; mongo-aggregate only counts it (it stores no record
    fields); for the others the write task's size limit (``max-record-size-bytes``) sets it aside
    as a dead letter with the reason, and the rest is written.
    """
    records = make_records("big", 5)
    big = records[2] = dataclasses.replace(records[2], request="x" * OVERSIZED_REQUEST_BYTES)
    pump = sink.pump(
        **({"max_document_size_bytes": SIZE_LIMIT_BYTES} if sink.oversize == "trim" else {})
    )
    with opened(pump):
        if sink.oversize == "pipeline":
            kept, rejects = run_pipeline([size_limit(SIZE_LIMIT_BYTES)], records)
            assert pump.write(kept, deadline=soon()) == ALL_WRITTEN
            assert [(record.id, "over the limit" in reason) for record, reason in rejects] == [
                (big.id, True)
            ]
        else:
            assert pump.write(records, deadline=soon()) == ALL_WRITTEN
    expected = {record.username: 1 for record in records}
    if sink.oversize == "pipeline":
        del expected[big.username]
    assert sink.counts() == expected
    if sink.oversize == "trim":
        assert isinstance(sink, MongoSink)
        stored = {doc["_id"]: doc for doc in sink.collection.find()}
        assert stored[big.id]["trimmed"] is True
        assert (stored[big.id]["request"], stored[big.id]["policies"]) == ("", "")
        assert stored[big.id]["username"] == big.username
        assert all("trimmed" not in doc for key, doc in stored.items() if key != big.id)


def test_unusable_sink_gives_a_temporary_error_within_the_timeout(sink: Sink) -> None:
    """A server that is down (closed port), an unwritable folder, a broken pipe: a retryable
    error, quickly, never a hang or a driver exception."""
    pump = sink.unreachable_pump(timeout_s=DOWN_TIMEOUT_S)
    started = time.monotonic()
    with pytest.raises(PumpTemporaryError):
        pump.open()
        pump.write(make_records("down", 3), deadline=Deadline.after(DOWN_TIMEOUT_S))
    assert time.monotonic() - started < DOWN_TIMEOUT_S + DOWN_SLACK_S
    pump.close()
    pump.close()


def test_silent_server_gives_a_temporary_error_within_the_timeout(store: Sink) -> None:
    """A server that accepts connections and never answers: the pump's timeout bounds the wait."""
    with silent_server() as port:
        pump = store.pump_at_port(port, timeout_s=DOWN_TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(PumpTemporaryError):
            pump.open()
            pump.write(make_records("silent", 3), deadline=Deadline.after(DOWN_TIMEOUT_S))
        assert time.monotonic() - started < DOWN_TIMEOUT_S + DOWN_SLACK_S
        pump.close()


def test_server_going_away_gives_temporary_errors_and_a_failing_check(store: Sink) -> None:
    proxy = TcpProxy(store.target())
    pump = store.pump_at_port(proxy.port, timeout_s=DOWN_TIMEOUT_S)
    try:
        with opened(pump):
            first = make_records("before", 5)
            assert pump.write(first, deadline=soon()) == ALL_WRITTEN
            pump.check()
            proxy.stop()
            started = time.monotonic()
            with pytest.raises(PumpTemporaryError):
                pump.write(make_records("after", 5), deadline=Deadline.after(DOWN_TIMEOUT_S))
            assert time.monotonic() - started < DOWN_TIMEOUT_S + DOWN_SLACK_S
            started = time.monotonic()
            with pytest.raises(PumpError):
                pump.check()
            assert time.monotonic() - started < DOWN_TIMEOUT_S + DOWN_SLACK_S
    finally:
        proxy.stop()
    assert store.counts() == {record.username: 1 for record in first}


def test_record_without_an_id_is_refused_alone(store: Sink) -> None:
    """An id is what makes a store write once; a record without one is a dead letter."""
    records = make_records("noid", 4)
    records[1] = dataclasses.replace(records[1], id="")
    with opened(store.pump()) as pump:
        result = pump.write(records, deadline=soon())
    assert isinstance(result, WriteResult)
    assert [(record.username, "id" in reason) for record, reason in result.rejected] == [
        (records[1].username, True)
    ]
    assert store.counts() == {r.username: 1 for r in records if r is not records[1]}


def test_check_before_open_says_so(store: Sink) -> None:
    with pytest.raises(PumpTemporaryError, match="not open"):
        store.pump().check()


# -- configuration -------------------------------------------------------------------------


def _config(pumps: dict[str, Any]) -> str:
    return json.dumps({"pumps": pumps})


def test_iam_style_meta_loads() -> None:
    settings = parse_settings(
        _config(
            {
                "mongo": {
                    "type": "mongo",
                    "meta": {
                        "collection_name": "iam_analytics",
                        "mongo_url": "mongodb://u:p@db:27017/iam_analytics",
                        "collection_cap_max_size_bytes": 1048576,
                        "collection_cap_enable": True,
                        "max_insert_batch_size_bytes": 0,
                        "max_document_size_bytes": 0,
                        "mongo_use_ssl": True,
                        "mongo_ssl_insecure_skip_verify": True,
                    },
                },
                "es": {
                    "type": "elasticsearch",
                    "meta": {
                        "elasticsearch_url": "http://a:9200,http://b:9200",
                        "index_name": "iam_analytics",
                        "rolling_index": True,
                        "document_type": "iam_analytics",
                        "auth_api_key_id": "id",
                        "auth_api_key": "key",
                        "bulk_config": {"workers": 2, "bulk_actions": 500, "bulk_size": 5000000},
                    },
                },
                "agg": {
                    "type": "mongo-aggregate",
                    "meta": {"mongo_url": "mongodb://db/x", "aggregation_time": 60},
                },
            }
        )
    )
    mongo_meta = MongoPump.Meta.model_validate(settings.pumps["mongo"].meta)
    assert mongo_meta.max_document_size_bytes == 10 * 1024 * 1024  # iam: 0 means 10 MiB
    es_pump = ElasticsearchPump.create("es", settings.pumps["es"].meta, timeout_s=5)
    assert isinstance(es_pump, ElasticsearchPump)
    assert es_pump.meta.elasticsearch_url == ("http://a:9200", "http://b:9200")
    assert es_pump.meta.records_per_request == 500
    assert es_pump.meta.ignored_keys == ["document_type", "bulk_config.workers"]


@pytest.mark.parametrize(
    ("pump", "path"),
    [
        ({"type": "mongo", "meta": {"mongo_urll": "mongodb://x"}}, "pumps.p.meta.mongo_urll"),
        ({"type": "mongo", "meta": {"mongo_url": "http://x"}}, "pumps.p.meta.mongo_url"),
        (
            {
                "type": "mongo",
                "meta": {"mongo_url": "mongodb://x", "max_document_size_bytes": 2**25},
            },
            "pumps.p.meta.max_document_size_bytes",
        ),
        (
            {
                "type": "mongo-aggregate",
                "meta": {"mongo_url": "mongodb://x", "aggregation_time": 61},
            },
            "pumps.p.meta.aggregation_time",
        ),
        (
            {
                "type": "mongo-aggregate",
                "meta": {"mongo_url": "mongodb://x", "ignore_aggregations": ["path"]},
            },
            "pumps.p.meta.ignore_aggregations.0",
        ),
        ({"type": "elasticsearch", "meta": {"index_name": "Upper"}}, "pumps.p.meta.index_name"),
        (
            {"type": "elasticsearch", "meta": {"elasticsearch_url": "localhost:9200"}},
            "pumps.p.meta.elasticsearch_url",
        ),
        ({"type": "elasticsearch", "meta": {"auth_basic_username": "u"}}, "pumps.p.meta"),
    ],
)
def test_bad_meta_is_named_at_start_up(pump: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(_config({"p": pump}))
    assert path in [problem_path for problem_path, _ in caught.value.problems]


# -- mongo ---------------------------------------------------------------------------------


class RecordingMongoPump(MongoPump):
    """Sees each bulk; ``fail_with`` makes the next bulk write all but the failed operations
    and then raise, the way the server reports per-document errors."""

    def __init__(self, name: str, meta: Any, *, timeout_s: float) -> None:
        super().__init__(name, meta, timeout_s=timeout_s)
        self.bulks: list[int] = []
        self.fail_with: Exception | None = None

    def _bulk_write(
        self, collection: Collection[dict[str, Any]], operations: list[UpdateOne]
    ) -> None:
        self.bulks.append(len(operations))
        failure, self.fail_with = self.fail_with, None
        if isinstance(failure, BulkWriteError):
            failed = {error["index"] for error in failure.details["writeErrors"]}
            kept = [op for index, op in enumerate(operations) if index not in failed]
            if kept:
                super()._bulk_write(collection, kept)
            raise failure
        if failure is not None:
            raise failure
        super()._bulk_write(collection, operations)


def mongo_pump(database: Database[dict[str, Any]], cls: type[P], **meta: Any) -> P:
    meta = {"mongo_url": mongo_url_for(database.name), "collection_name": "analytics", **meta}
    pump = cls.create("mongo", meta, timeout_s=10)
    assert isinstance(pump, cls)
    return pump


@pytest.mark.integration
def test_mongo_documents_are_iams_with_a_ttl_index(mongo_db: Database[dict[str, Any]]) -> None:
    records = make_records("doc", 2)
    records[1] = dataclasses.replace(records[1], expire_at=GO_ZERO_TIME)
    with opened(mongo_pump(mongo_db, MongoPump)) as pump:
        pump.write(records, deadline=soon())
    collection = mongo_db["analytics"]
    first = collection.find_one({"_id": records[0].id})
    assert first is not None
    assert first == {
        "_id": records[0].id,
        "timestamp": records[0].timestamp,
        "username": records[0].username,
        "effect": records[0].effect,
        "conclusion": records[0].conclusion,
        "request": records[0].request,
        "policies": records[0].policies,
        "deciders": records[0].deciders,
        "expireAt": EXPIRE_AT,
    }
    # A Go zero time means "never expires": no field, so the TTL index leaves it alone.
    second = collection.find_one({"_id": records[1].id})
    assert second is not None and "expireAt" not in second
    ttl = [
        index
        for index in collection.index_information().values()
        if index["key"] == [("expireAt", 1)]
    ]
    assert [index.get("expireAfterSeconds") for index in ttl] == [0]


@pytest.mark.integration
def test_mongo_splits_bulks_at_max_insert_batch_size_bytes(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = [
        dataclasses.replace(record, policies="p" * 1000) for record in make_records("split", 20)
    ]
    with opened(mongo_pump(mongo_db, RecordingMongoPump, max_insert_batch_size_bytes=4096)) as pump:
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
        assert len(pump.bulks) > 1 and max(pump.bulks) <= 3 and sum(pump.bulks) == len(records)
    assert mongo_db["analytics"].count_documents({}) == len(records)


@pytest.mark.integration
def test_mongo_document_too_large_even_when_trimmed_is_refused_alone(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = make_records("huge", 4)
    records[1] = dataclasses.replace(records[1], username="n" * 8192)
    with opened(mongo_pump(mongo_db, MongoPump, max_document_size_bytes=4096)) as pump:
        result = pump.write(records, deadline=soon())
    assert isinstance(result, WriteResult)
    assert [
        (record.id, "even without request" in reason) for record, reason in result.rejected
    ] == [(records[1].id, True)]
    assert mongo_db["analytics"].count_documents({}) == 3


def _bulk_error(index: int, code: int, message: str, **extra: Any) -> BulkWriteError:
    return BulkWriteError(
        {
            "writeErrors": [{"index": index, "code": code, "errmsg": message, **extra}],
            "writeConcernErrors": [],
            "nInserted": 0,
        }
    )


@pytest.mark.integration
def test_mongo_refused_document_goes_alone_to_the_dead_letters(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = make_records("refused", 4)
    with opened(mongo_pump(mongo_db, RecordingMongoPump)) as pump:
        pump.fail_with = _bulk_error(1, 121, "Document failed validation")
        result = pump.write(records, deadline=soon())
    assert isinstance(result, WriteResult)
    assert [(record.id, reason) for record, reason in result.rejected] == [
        (records[1].id, "MongoDB refused the document (code 121): Document failed validation")
    ]
    assert mongo_db["analytics"].count_documents({}) == 3


@pytest.mark.integration
def test_mongo_duplicate_key_from_a_racing_upsert_counts_as_written(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = make_records("race", 3)
    with opened(mongo_pump(mongo_db, RecordingMongoPump)) as pump:
        pump.write(records[1:2], deadline=soon())
        pump.fail_with = _bulk_error(1, 11000, "E11000 duplicate key", keyPattern={"_id": 1})
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
    assert mongo_db["analytics"].count_documents({}) == 3


@pytest.mark.integration
@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (AutoReconnect("connection reset"), PumpTemporaryError),
        (NotPrimaryError("not primary"), PumpTemporaryError),
        (OperationFailure("shutting down", code=91), PumpTemporaryError),
        (_bulk_error(0, 10107, "not writable primary"), PumpTemporaryError),
        (_bulk_error(0, 11602, "interrupted due to repl state change"), PumpTemporaryError),
        (OperationFailure("auth failed", code=18), PumpPermanentError),
    ],
    ids=["network", "not-primary", "shutdown", "not-writable-primary", "stepdown", "auth"],
)
def test_mongo_errors_are_classified(
    mongo_db: Database[dict[str, Any]], failure: Exception, expected: type[PumpError]
) -> None:
    with opened(mongo_pump(mongo_db, RecordingMongoPump)) as pump:
        pump.fail_with = failure
        with pytest.raises(expected):
            pump.write(make_records("classify", 3), deadline=soon())


@pytest.mark.integration
def test_mongo_capped_option_creates_the_collection_at_open(
    mongo_db: Database[dict[str, Any]],
) -> None:
    # Only that it exists before any write: the stand-in accepts but ignores capping.
    with opened(mongo_pump(mongo_db, MongoPump, collection_cap_enable=True)) as pump:
        assert "analytics" in mongo_db.list_collection_names()
        assert pump.write(make_records("capped", 3), deadline=soon()) == ALL_WRITTEN
    assert mongo_db["analytics"].count_documents({}) == 3


# -- mongo-aggregate -----------------------------------------------------------------------


class HalfWayAggregatePump(MongoAggregatePump):
    """Applies only the first half of each bulk, then fails like a dropped connection."""

    def _bulk_write(
        self, collection: Collection[dict[str, Any]], operations: list[UpdateOne]
    ) -> None:
        super()._bulk_write(collection, operations[: len(operations) // 2])
        raise AutoReconnect("connection lost half-way")


class RacedAggregatePump(MongoAggregatePump):
    """Loses the race for the first document: another worker inserts it (for another batch)
    between this upsert's match and its insert, so the server answers 11000 for it."""

    records: Sequence[AnalyticsRecord] = ()

    def _bulk_write(
        self, collection: Collection[dict[str, Any]], operations: list[UpdateOne]
    ) -> None:
        super()._bulk_write(collection, operations[1:])
        # The first update is the first record's bucket total.
        first_id = next(iter(expected_aggregates(self.records)))
        collection.insert_one(
            {"_id": first_id, "hits": 0, "allowed": 0, "denied": 0, "batches": ["other"]}
        )
        raise BulkWriteError(
            {
                "writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}],
                "writeConcernErrors": [],
                "nInserted": 0,
            }
        )


def aggregate_pump(database: Database[dict[str, Any]], cls: type[P], **meta: Any) -> P:
    meta = {"mongo_url": mongo_url_for(database.name), "collection_name": "agg", **meta}
    pump = cls.create("agg", meta, timeout_s=10)
    assert isinstance(pump, cls)
    return pump


def aggregates(database: Database[dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    return {
        doc["_id"]: (doc["hits"], doc["allowed"], doc["denied"]) for doc in database["agg"].find()
    }


def expected_aggregates(
    records: Sequence[AnalyticsRecord], *, minutes: int = 1, dimensions: Sequence[str] = ()
) -> dict[str, tuple[int, int, int]]:
    counts: dict[str, list[int]] = {}
    for record in records:
        start = record.timestamp - record.timestamp % (minutes * 60)
        bucket = f"{datetime.fromtimestamp(start, UTC):%Y-%m-%dT%H:%M}Z"
        values = [("all", ""), ("username", record.username), ("effect", record.effect)]
        resource = request_resource(record.request)
        if resource:
            values.append(("resource", resource))
        for dimension, value in values:
            if dimension in dimensions:
                continue
            counter = counts.setdefault(f"{dimension}|{bucket}|{value}", [0, 0, 0])
            counter[0] += 1
            counter[1] += record.effect == "allow"
            counter[2] += record.effect == "deny"
    return {key: (hits, allowed, denied) for key, (hits, allowed, denied) in counts.items()}


def varied_records(batch: str | None = None) -> list[AnalyticsRecord]:
    """Records over three minutes, three users, both effects, some without a resource."""
    records = make_records("agg", 30, batch=batch, timestamp=NOW_S - NOW_S % 60)
    out = []
    for index, record in enumerate(records):
        request = record.request
        if index % 5 == 0:
            request = "not json"
        elif index % 7 == 0:
            request = json.dumps({"action": "read"})
        out.append(
            dataclasses.replace(
                record,
                timestamp=record.timestamp + index * 6,
                username=f"user-{index % 3}",
                request=request,
            )
        )
    return out


@pytest.mark.integration
def test_aggregate_counts_per_bucket_dimension_and_value(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = varied_records()
    with opened(aggregate_pump(mongo_db, MongoAggregatePump)) as pump:
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
    assert aggregates(mongo_db) == expected_aggregates(records)
    doc = mongo_db["agg"].find_one({"dimension": "all"})
    assert doc is not None and doc["value"] == "" and doc["timestamp"].second == 0


@pytest.mark.integration
def test_aggregate_bucket_length_and_ignored_dimensions(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = varied_records()
    with opened(
        aggregate_pump(
            mongo_db, MongoAggregatePump, aggregation_time=5, ignore_aggregations=["resource"]
        )
    ) as pump:
        pump.write(records, deadline=soon())
    assert aggregates(mongo_db) == expected_aggregates(records, minutes=5, dimensions=["resource"])


@pytest.mark.integration
def test_aggregate_redelivery_after_a_crash_half_way_counts_each_record_once(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = varied_records()
    with (
        opened(aggregate_pump(mongo_db, HalfWayAggregatePump)) as crashing,
        pytest.raises(PumpTemporaryError),
    ):
        crashing.write(records, deadline=soon())
    partial = aggregates(mongo_db)
    assert 0 < len(partial) < len(expected_aggregates(records))
    with opened(aggregate_pump(mongo_db, MongoAggregatePump)) as pump:
        assert pump.write(copies(records), deadline=soon()) == ALL_WRITTEN
        assert pump.write(copies(records), deadline=soon()) == ALL_WRITTEN
    assert aggregates(mongo_db) == expected_aggregates(records)


@pytest.mark.integration
def test_aggregate_update_that_lost_an_insert_race_is_applied_once(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = varied_records()
    with opened(aggregate_pump(mongo_db, RacedAggregatePump)) as pump:
        pump.records = records
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
    assert aggregates(mongo_db) == expected_aggregates(records)


@pytest.mark.integration
def test_aggregate_concurrent_deliveries_of_one_batch_count_once(
    mongo_db: Database[dict[str, Any]],
) -> None:
    batches = [varied_records() for _ in range(5)]
    pumps = [aggregate_pump(mongo_db, MongoAggregatePump) for _ in range(3)]
    errors: list[BaseException] = []

    def deliver(pump: Pump) -> None:
        try:
            for batch in batches:
                pump.write(copies(batch), deadline=soon())
        except BaseException as exc:
            errors.append(exc)

    for pump in pumps:
        pump.open()
    try:
        threads = [threading.Thread(target=deliver, args=(pump,)) for pump in pumps]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for pump in pumps:
            pump.close()
    assert not errors
    assert aggregates(mongo_db) == expected_aggregates([r for batch in batches for r in batch])


@pytest.mark.integration
def test_aggregate_remembers_exactly_the_documented_window(
    mongo_db: Database[dict[str, Any]],
) -> None:
    """With ``applied_batches_kept: 2`` a redelivery is recognised while its key is among the
    last two that updated the document, and counted again after that (the documented window)."""
    first, second, third = (make_records("window", 1, batch=f"b{n}") for n in range(3))
    second = [dataclasses.replace(second[0], username=first[0].username)]
    third = [dataclasses.replace(third[0], username=first[0].username)]
    with opened(aggregate_pump(mongo_db, MongoAggregatePump, applied_batches_kept=2)) as pump:
        for batch in (first, second, third):
            pump.write(batch, deadline=soon())
        pump.write(copies(third), deadline=soon())  # still remembered: not counted
        pump.write(copies(first), deadline=soon())  # beyond the window: counted again
    user_doc = mongo_db["agg"].find_one({"dimension": "username"})
    assert user_doc is not None and user_doc["hits"] == 4 and len(user_doc["batches"]) == 2


# -- elasticsearch -------------------------------------------------------------------------


def item_429(action: dict[str, Any]) -> dict[str, Any]:
    """A bulk response item as Elasticsearch answers a document it has no room for now."""
    error = {"type": "es_rejected_execution_exception", "reason": "queue full"}
    return {"index": {"_id": action["index"]["_id"], "status": 429, "error": error}}


class FlakyElasticsearchPump(ElasticsearchPump):
    """Answers 429 for the documents whose username is in ``flaky`` on the first ``refusals``
    requests (the other documents really go to the server); records each request's size."""

    def __init__(self, name: str, meta: Any, *, timeout_s: float) -> None:
        super().__init__(name, meta, timeout_s=timeout_s)
        self.flaky: frozenset[str] = frozenset()
        self.refusals = 1
        self.sizes: list[int] = []

    @property
    def calls(self) -> int:
        return len(self.sizes)

    def _send_bulk(self, client: Elasticsearch, operations: list[dict[str, Any]]) -> list[Any]:
        self.sizes.append(len(operations) // 2)
        pairs = list(zip(operations[::2], operations[1::2], strict=True))
        refused = {
            index
            for index, (_action, document) in enumerate(pairs)
            if self.calls <= self.refusals and document["username"] in self.flaky
        }
        sent = [part for index, pair in enumerate(pairs) if index not in refused for part in pair]
        answers = iter(super()._send_bulk(client, sent) if sent else [])
        return [
            item_429(action) if index in refused else next(answers)
            for index, (action, _document) in enumerate(pairs)
        ]


def es_pump(sink_url: str, index_name: str, cls: type[P], **meta: Any) -> P:
    meta = {"elasticsearch_url": sink_url, "index_name": index_name, **meta}
    pump = cls.create("es", meta, timeout_s=10)
    assert isinstance(pump, cls)
    return pump


@pytest.mark.integration
def test_es_template_mappings_and_rolling_daily_index(
    es: Elasticsearch, es_url: str, es_index: str
) -> None:
    day_one = make_records("day1", 3, timestamp=1_795_500_000)  # 2026-11-24
    day_two = make_records("day2", 2, timestamp=1_795_500_000 + 86_400)
    with opened(es_pump(es_url, es_index, ElasticsearchPump, rolling_index=True)) as pump:
        assert pump.write(day_one + day_two, deadline=soon()) == ALL_WRITTEN
    template = es.indices.get_index_template(name=es_index).body["index_templates"][0]
    assert template["index_template"]["index_patterns"] == [es_index, f"{es_index}-*"]
    indices = sorted(es.indices.get(index=f"{es_index}*").body)
    assert indices == [f"{es_index}-2026.11.24", f"{es_index}-2026.11.25"]
    mapping = es.indices.get_mapping(index=indices[0]).body[indices[0]]["mappings"]["properties"]
    assert mapping["@timestamp"]["type"] == "date"
    assert mapping["expireAt"]["type"] == "date"
    assert (mapping["username"]["type"], mapping["effect"]["type"]) == ("keyword", "keyword")
    es.indices.refresh(index=indices[0])
    source = es.get(index=indices[0], id=day_one[0].id).body["_source"]
    assert source["@timestamp"] == "2026-11-24T06:00:00+00:00"
    assert source["expireAt"] == "2030-06-01T12:00:00+00:00"
    assert source["request"] == day_one[0].request


@pytest.mark.integration
def test_es_mapping_error_goes_alone_to_the_dead_letters(
    es: Elasticsearch, es_url: str, es_index: str
) -> None:
    # An index whose username is numeric: a name that is not a number cannot be indexed.
    es.indices.create(index=es_index, mappings={"properties": {"username": {"type": "long"}}})
    records = [
        dataclasses.replace(record, username=str(100 + n))
        for n, record in enumerate(make_records("map", 4))
    ]
    records[2] = dataclasses.replace(records[2], username="alice")
    with opened(es_pump(es_url, es_index, ElasticsearchPump)) as pump:
        result = pump.write(records, deadline=soon())
    assert isinstance(result, WriteResult)
    assert [
        (record.id, "400 document_parsing_exception" in reason)
        for record, reason in result.rejected
    ] == [(records[2].id, True)]
    es.indices.refresh(index=es_index)
    assert es.count(index=es_index)["count"] == 3


@pytest.mark.integration
def test_es_items_refused_with_429_are_sent_again_and_the_rest_committed(
    es: Elasticsearch, es_url: str, es_index: str
) -> None:
    records = make_records("flaky", 10)
    with opened(es_pump(es_url, es_index, FlakyElasticsearchPump)) as pump:
        pump.flaky = frozenset({records[3].username, records[7].username})
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
        assert pump.sizes == [10, 2]
    assert es_usernames(es, es_index) == {record.username: 1 for record in records}


@pytest.mark.integration
def test_es_items_still_refused_raise_temporary_and_redelivery_is_idempotent(
    es: Elasticsearch, es_url: str, es_index: str
) -> None:
    records = make_records("stuck", 6)
    with opened(es_pump(es_url, es_index, FlakyElasticsearchPump, bulk_item_retries=2)) as pump:
        pump.flaky = frozenset({records[0].username})
        pump.refusals = 99
        with pytest.raises(PumpTemporaryError, match="still refuses 1 document"):
            pump.write(records, deadline=soon())
        assert pump.calls == 3
    # The batch comes back whole; the five documents already in are overwritten, not doubled.
    with opened(es_pump(es_url, es_index, ElasticsearchPump)) as pump:
        assert pump.write(copies(records), deadline=soon()) == ALL_WRITTEN
    assert es_usernames(es, es_index) == {record.username: 1 for record in records}


@pytest.mark.integration
def test_es_bulks_are_cut_at_bulk_size(es: Elasticsearch, es_url: str, es_index: str) -> None:
    records = make_records("cut", 10)
    with opened(es_pump(es_url, es_index, FlakyElasticsearchPump, bulk_size=4)) as pump:
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
        assert pump.sizes == [4, 4, 2]
    assert sum(es_usernames(es, es_index).values()) == 10


class TooLargeElasticsearchPump(FlakyElasticsearchPump):
    """Answers 413 to any request of more than two documents, and for one document always."""

    huge: str = ""

    def _send_bulk(self, client: Elasticsearch, operations: list[dict[str, Any]]) -> list[Any]:
        if len(operations) > 4 or operations[1]["username"] == self.huge:
            meta = ApiResponseMeta(
                status=413,
                http_version="1.1",
                headers=HttpHeaders(),
                duration=0.0,
                node=NodeConfig("http", "localhost", 9200),
            )
            raise ApiError("Request Entity Too Large", meta=meta, body={})
        return super()._send_bulk(client, operations)


@pytest.mark.integration
def test_es_request_too_large_is_split_and_a_lone_huge_document_refused(
    es: Elasticsearch, es_url: str, es_index: str
) -> None:
    records = make_records("413", 7)
    with opened(es_pump(es_url, es_index, TooLargeElasticsearchPump)) as pump:
        pump.huge = records[5].username
        result = pump.write(records, deadline=soon())
    assert isinstance(result, WriteResult)
    assert [(record.id, "413" in reason) for record, reason in result.rejected] == [
        (records[5].id, True)
    ]
    assert sum(es_usernames(es, es_index).values()) == 6


@pytest.mark.integration
def test_es_expired_go_zero_time_is_left_out(es: Elasticsearch, es_url: str, es_index: str) -> None:
    record = dataclasses.replace(make_records("zero", 1)[0], expire_at=GO_ZERO_TIME)
    with opened(es_pump(es_url, es_index, ElasticsearchPump)) as pump:
        pump.write([record], deadline=soon())
    es.indices.refresh(index=es_index)
    assert "expireAt" not in es.get(index=es_index, id=record.id).body["_source"]
