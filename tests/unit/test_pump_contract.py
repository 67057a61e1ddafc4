"""The pump contract (:mod:`pumps.testing`) run against every built-in pump, and the
configuration of the store pumps.

The csv, stdout and memory cases need no server. The MongoDB and Elasticsearch cases use the
servers at ``MONGO_URI`` and ``ES_URL`` (skipped locally when absent, failing in CI), each test in
its own database or index, dropped afterwards. What each store pump adds to the contract is in
``test_mongo_pump.py`` and ``test_elasticsearch_pump.py``. The InfluxDB case runs against the
real ``influxd`` of ``tests/servers_influx.py``; its own tests are in
``tests/integration/test_influx_pump.py``.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from elasticsearch import Elasticsearch
from pymongo.database import Database

from app.errors import ConfigError
from app.record import AnalyticsRecord
from pumps.base import Pump
from pumps.csv import CSVPump
from pumps.dummy import DummyPump
from pumps.elasticsearch import ElasticsearchPump
from pumps.influx import InfluxPump
from pumps.memory import MemoryPump
from pumps.mongo import MongoPump
from pumps.mongo_aggregate import MongoAggregatePump
from pumps.prometheus import CounterKeys, PrometheusPump, read_counts
from pumps.registry import BUILTIN_PUMPS, resolve_pump_class
from pumps.settings import parse_pump_settings
from pumps.stdout import StdoutPump
from pumps.testing import PumpContract
from tests.integration import test_syslog_pump
from tests.servers_influx import InfluxServer
from tests.servers_influx import stored_ids as influx_stored_ids
from tests.stores import MONGO_URI, es_address, mongo_address, mongo_url_for
from tests.support import REDIS_HOST, REDIS_PORT, free_port, read_csv_rows, redis_url


class TestCsvPump(PumpContract):
    pump_class = CSVPump
    pump_type = "csv"

    def meta(self, tmp_path: Path) -> dict[str, Any]:
        return {"csv_dir": str(tmp_path / "csv")}

    def record_key(self, record: AnalyticsRecord) -> str:
        return record.username  # a CSV row has no id

    def stored_ids(self, pump: Pump) -> Counter[str]:
        return Counter(row["Username"] for row in read_csv_rows(self.tmp_path / "csv"))

    def unreachable_meta(self, tmp_path: Path) -> dict[str, Any]:
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        return {"csv_dir": str(blocker / "csv")}


class TestStdoutPump(PumpContract):
    pump_class = StdoutPump
    pump_type = "stdout"

    @pytest.fixture(autouse=True)
    def _stdout(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.lines: list[str] = []

    def stored_ids(self, pump: Pump) -> Counter[str]:
        self.lines += self.capsys.readouterr().out.splitlines()
        return Counter(json.loads(line)["id"] for line in self.lines if line)

    def unreachable_pump(self, *, timeout_s: float) -> Pump:
        class BrokenStdout:
            def write(self, text: str) -> int:
                raise BrokenPipeError(32, "Broken pipe")

            def flush(self) -> None:
                raise BrokenPipeError(32, "Broken pipe")

        self.monkeypatch.setattr(sys, "stdout", BrokenStdout())
        return self.create(timeout_s=timeout_s)


class TestMemoryPump(PumpContract):
    pump_class = MemoryPump
    pump_type = "memory"

    def stored_ids(self, pump: Pump) -> Counter[str]:
        return Counter(record.id for record in MemoryPump.records(pump.name))

    def unreachable_meta(self, tmp_path: Path) -> dict[str, Any]:
        return {"fail_times": 1}


class TestDummyPump(PumpContract):
    """The dummy keeps no records, only their number: every record counts under one key, and
    the sink read back is the sum of the counts the pump logged."""

    pump_class = DummyPump
    pump_type = "dummy"

    @pytest.fixture(autouse=True)
    def _logs(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="pumps.dummy")
        self.caplog = caplog

    def record_key(self, record: AnalyticsRecord) -> str:
        return "records"

    def expected(self, records: list[AnalyticsRecord], copies_each: int) -> Counter[str]:
        return Counter({"records": len(records) * copies_each}) if records else Counter()

    def stored_ids(self, pump: Pump) -> Counter[str]:
        logged = [
            entry.args
            for entry in self.caplog.records
            if entry.name == "pumps.dummy" and isinstance(entry.args, tuple)
        ]
        counts = [int(str(args[1])) for args in logged if args[0] == pump.name]
        assert isinstance(pump, DummyPump) and pump.received == sum(counts)
        return Counter({"records": sum(counts)}) if counts else Counter()


@pytest.mark.integration
class TestMongoPump(PumpContract):
    pump_class = MongoPump
    pump_type = "mongo"
    connects = True

    @pytest.fixture(autouse=True)
    def _database(self, mongo_db: Database[dict[str, Any]]) -> None:
        self.database = mongo_db

    def meta(self, tmp_path: Path) -> dict[str, Any]:
        return {"mongo_url": mongo_url_for(self.database.name), "collection_name": "analytics"}

    def stored_ids(self, pump: Pump) -> Counter[str]:
        return Counter(doc["_id"] for doc in self.database["analytics"].find({}, {"_id": 1}))

    def meta_at(self, tmp_path: Path, port: int) -> dict[str, Any]:
        return {**self.meta(tmp_path), "mongo_url": mongo_url_for(self.database.name, port=port)}

    def unreachable_meta(self, tmp_path: Path) -> dict[str, Any]:
        return self.meta_at(tmp_path, free_port())

    def server_address(self) -> tuple[str, int]:
        return mongo_address(MONGO_URI)


class TestMongoAggregatePump(TestMongoPump):
    """Aggregates keep no record ids: a record is counted under its (unique) username."""

    pump_class = MongoAggregatePump
    pump_type = "mongo-aggregate"

    def record_key(self, record: AnalyticsRecord) -> str:
        return record.username

    def stored_ids(self, pump: Pump) -> Counter[str]:
        counts: Counter[str] = Counter()
        for doc in self.database["analytics"].find({"dimension": "username"}):
            counts[doc["value"]] += doc["hits"]
        return counts


@pytest.mark.integration
class TestElasticsearchPump(PumpContract):
    pump_class = ElasticsearchPump
    pump_type = "elasticsearch"
    connects = True

    @pytest.fixture(autouse=True)
    def _index(self, es: Elasticsearch, es_index: str, es_url: str) -> None:
        self.es, self.index_name, self.url = es, es_index, es_url

    def meta(self, tmp_path: Path) -> dict[str, Any]:
        return {"elasticsearch_url": self.url, "index_name": self.index_name}

    def stored_ids(self, pump: Pump) -> Counter[str]:
        self.es.indices.refresh(index=f"{self.index_name}*")
        hits = self.es.search(index=f"{self.index_name}*", query={"match_all": {}}, size=10_000)
        return Counter(hit["_id"] for hit in hits.body["hits"]["hits"])

    def meta_at(self, tmp_path: Path, port: int) -> dict[str, Any]:
        return {**self.meta(tmp_path), "elasticsearch_url": f"http://127.0.0.1:{port}"}

    def unreachable_meta(self, tmp_path: Path) -> dict[str, Any]:
        return self.meta_at(tmp_path, free_port())

    def server_address(self) -> tuple[str, int]:
        return es_address(self.url)


@pytest.mark.integration
class TestPrometheusPump(PumpContract):
    """The counts live in Redis (the tests' server): a record counts under its (unique)
    username, whatever its code. The network cases cut the pump's Redis."""

    pump_class = PrometheusPump
    pump_type = "prometheus"
    connects = True

    @pytest.fixture(autouse=True)
    def _prefix(self, redis_db: redis.Redis) -> Iterator[None]:
        self.redis = redis_db
        self.key_prefix = f"iam-pump:contract-{uuid.uuid4().hex[:12]}"  # the ACL user's keys
        yield
        for key in redis_db.scan_iter(f"{self.key_prefix}:*"):
            redis_db.delete(key)

    def meta_at(self, tmp_path: Path, port: int) -> dict[str, Any]:
        return {
            "listen_address": f"127.0.0.1:{free_port()}",
            "redis_url": redis_url(port=port),
            "key_prefix": self.key_prefix,
        }

    def meta(self, tmp_path: Path) -> dict[str, Any]:
        return self.meta_at(tmp_path, REDIS_PORT)

    def record_key(self, record: AnalyticsRecord) -> str:
        return record.username

    def stored_ids(self, pump: Pump) -> Counter[str]:
        keys = CounterKeys.for_pump(self.key_prefix, pump.name)
        counts: Counter[str] = Counter()
        for (_code, username), value in read_counts(self.redis, keys).by_label.items():
            counts[username] += value
        return counts

    def unreachable_meta(self, tmp_path: Path) -> dict[str, Any]:
        return self.meta_at(tmp_path, free_port())

    def server_address(self) -> tuple[str, int]:
        return REDIS_HOST, REDIS_PORT


@pytest.mark.integration
class TestInfluxPump(PumpContract):
    pump_class = InfluxPump
    pump_type = "influx"
    connects = True

    @pytest.fixture(autouse=True)
    def _database(self, influx_server: InfluxServer, influx_database: str) -> None:
        self.server, self.database = influx_server, influx_database

    def meta(self, tmp_path: Path) -> dict[str, Any]:
        return {
            "database_name": self.database,
            "address": self.server.url,
            "tags": ["username", "effect"],
        }

    def stored_ids(self, pump: Pump) -> Counter[str]:
        return influx_stored_ids(self.server, self.database)

    def meta_at(self, tmp_path: Path, port: int) -> dict[str, Any]:
        return {**self.meta(tmp_path), "address": f"http://127.0.0.1:{port}"}

    def unreachable_meta(self, tmp_path: Path) -> dict[str, Any]:
        return self.meta_at(tmp_path, free_port())

    def server_address(self) -> tuple[str, int]:
        return self.server.address


def test_every_builtin_pump_runs_the_contract() -> None:
    # Imported here, not at the top, so pytest does not collect its contract twice.
    from tests.integration.test_kafka_pump import TestKafkaPump

    tested = {TestCsvPump, TestStdoutPump, TestMemoryPump, TestDummyPump, TestMongoPump}
    tested |= {TestMongoAggregatePump, TestElasticsearchPump, TestPrometheusPump, TestInfluxPump}
    tested |= {test_syslog_pump.TestSyslogPump, TestKafkaPump}
    assert {case.pump_type for case in tested} == set(BUILTIN_PUMPS)


def test_the_sinks_that_store_once_are_those_that_upsert() -> None:
    upserting = {name for name in BUILTIN_PUMPS if resolve_pump_class(name).upserts}
    assert upserting == {
        "memory",
        "mongo",
        "mongo-aggregate",
        "elasticsearch",
        "prometheus",
        "influx",
    }


def _config(pumps: dict[str, Any]) -> str:
    return json.dumps({"pumps": pumps})


def test_iam_style_meta_loads() -> None:
    settings = parse_pump_settings(
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
                "prometheus": {"meta": {"listen_address": ":9090", "path": ""}},
            }
        )
    )
    prometheus_meta = PrometheusPump.Meta.model_validate(settings.pumps["prometheus"].meta)
    assert (prometheus_meta.listen_address, prometheus_meta.path) == (":9090", "/metrics")
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
        ({"type": "prometheus", "meta": {"path": "/m"}}, "pumps.p.meta.listen_address"),
        ({"type": "prometheus", "meta": {"listen_address": ""}}, "pumps.p.meta.listen_address"),
        (
            {"type": "prometheus", "meta": {"listen_address": "localhost"}},
            "pumps.p.meta.listen_address",
        ),
        (
            {"type": "prometheus", "meta": {"listen_address": ":9090", "path": "metrics"}},
            "pumps.p.meta.path",
        ),
        (
            {"type": "prometheus", "meta": {"listen_address": ":9090", "max_usernames": 0}},
            "pumps.p.meta.max_usernames",
        ),
    ],
)
def test_bad_meta_is_named_at_start_up(pump: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pump_settings(_config({"p": pump}))
    assert path in [problem_path for problem_path, _ in caught.value.problems]
