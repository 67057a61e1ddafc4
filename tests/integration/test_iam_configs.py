"""iam's own config files run unchanged: the production ``iam-pump.yaml`` of marmotedu/iam.

``tests/fixtures/iam/iam-pump.yaml`` is a verbatim copy of ``configs/iam-pump.yaml`` from
marmotedu/iam (commit 16c723d3). An operator fills its ``${...}`` variables from the environment
and starts the pump on it; so does this test, against a Redis of its own (the file uses
database 0) and the MongoDB server the store tests use, then reads the records back by id.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymongo
import pytest
import yaml
from elasticsearch import Elasticsearch

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from tests.servers_influx import InfluxServer
from tests.servers_kafka import BROKER_VERSION, KafkaServer, read_topic
from tests.servers_syslog import Rsyslog, new_tag
from tests.support import (
    REPO,
    Proc,
    RedisServer,
    celery_env,
    free_port,
    read_csv_rows,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "iam"
RECORDS = 1000  # the file caps the collection at 1 MB


def health(address: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


def start_pump(config: Path, env: dict[str, str], log: Path) -> Proc:
    return Proc(
        [sys.executable, "-m", "app.cli", "run", "--config", str(config), "--concurrency", "2"],
        env=env,
        log=log,
        cwd=REPO,
    )


def ship(config: Path, run: str, count: int) -> None:
    """What iam-authz-server does: the reporter, configured from the same file."""
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    analytics.start()
    for index in range(count):
        record = AnalyticsRecord(
            timestamp=int(time.time()),
            username=f"user-{index % 7}",
            effect="allow" if index % 3 else "deny",
            conclusion="",
            request=f"{run}-{index}",
            policies="",
            deciders="",
            expire_at=datetime(2100, 1, 1, tzinfo=UTC),
        )
        while not analytics.record_hit(record):
            time.sleep(0.001)
    assert analytics.stop().shipped_records == count


def test_iams_production_config_runs_unchanged(
    tmp_path: Path,
    mongo_uri: str,
    procs: list[Proc],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = RedisServer(tmp_path / "redis")
    database = f"iam_{int(time.time() * 1000) % 10**9}"
    address = f"127.0.0.1:{free_port()}"
    variables = {
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(server.port),
        "REDIS_PASSWORD": "",
        "IAM_PUMP_COLLECTION_NAME": "iam_analytics",
        "IAM_PUMP_MONGO_URL": f"{mongo_uri.rstrip('/')}/{database}",
        "IAM_LOG_DIR": str(tmp_path / "log"),
        # The file binds 0.0.0.0:7070; a test must not take a port others may use.
        "IAM_PUMP_HEALTH_CHECK_ADDRESS": address,
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "log").mkdir()
    config = tmp_path / "iam-pump.yaml"
    config.write_bytes((FIXTURES / "iam-pump.yaml").read_bytes())
    mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        variables["IAM_PUMP_MONGO_URL"], serverSelectionTimeoutMS=5000
    )
    try:
        pump = start_pump(config, dict(os.environ), tmp_path / "run.log")
        procs.append(pump)
        pump.wait_for_output("ready.", 90)
        assert wait_until(lambda: health(address)[0] == 200, 30), health(address)
        checks = health(address)[1]["checks"]
        assert checks.get("pump:mongo") == "ok", checks

        ship(config, "iam", RECORDS)
        collection = mongo[database]["iam_analytics"]

        def stored() -> list[str]:
            return [doc["request"] for doc in collection.find({}, {"request": 1, "_id": 0})]

        # The file's purge-delay is 10 s: the Go pump's cadence, kept.
        assert wait_until(lambda: len(stored()) >= RECORDS, 90), pump.output()[-3000:]
        time.sleep(1)
        requests = stored()
        assert len(requests) == len(set(requests)) == RECORDS
        assert set(requests) == {f"iam-{index}" for index in range(RECORDS)}
    finally:
        mongo.drop_database(database)
        mongo.close()
        server.stop()


def test_a_config_naming_all_eight_iam_pump_types_runs(
    tmp_path: Path,
    mongo_uri: str,
    es_url: str,
    kafka_server: KafkaServer,
    influx_server: InfluxServer,
    influx_database: str,
    rsyslog: Rsyslog,
    procs: list[Proc],
) -> None:
    """iam's eight types, each entry's type taken from its key as iam does, every real server."""
    server = RedisServer(tmp_path / "redis")
    run = f"all{uuid.uuid4().hex[:8]}"
    health_address = f"127.0.0.1:{free_port()}"
    prometheus_address = f"127.0.0.1:{free_port()}"
    tag = new_tag()
    config = {
        "purge-delay": 1,
        "health-check-address": health_address,
        "redis": {"host": "127.0.0.1", "port": server.port},
        "pumps": {
            "csv": {"meta": {"csv_dir": str(tmp_path / "csv")}},
            "mongo": {
                "meta": {
                    "mongo_url": f"{mongo_uri.rstrip('/')}/{run}",
                    "collection_name": "iam_analytics",
                }
            },
            "elasticsearch": {"meta": {"elasticsearch_url": es_url, "index_name": run}},
            "kafka": {
                "meta": {
                    "broker": [kafka_server.bootstrap],
                    "topic": run,
                    "broker_version": BROKER_VERSION,
                    "meta_data": {"source": "all-eight"},
                }
            },
            "influx": {
                "meta": {
                    "database_name": influx_database,
                    "address": influx_server.url,
                    "tags": ["effect"],
                }
            },
            "prometheus": {"meta": {"listen_address": prometheus_address}},
            "syslog": {
                "meta": {
                    "transport": "tcp",
                    "network_addr": f"127.0.0.1:{rsyslog.tcp_port}",
                    "log_level": 134,
                    "tag": tag,
                }
            },
            "dummy": {},
        },
    }
    path = tmp_path / "all-eight.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000
    )
    elasticsearch = Elasticsearch(es_url, request_timeout=30)
    try:
        pump = start_pump(path, celery_env(path), tmp_path / "run.log")
        procs.append(pump)
        pump.wait_for_output("ready.", 120)
        assert wait_until(lambda: health(health_address)[0] == 200, 60), health(health_address)
        checks = health(health_address)[1]["checks"]
        assert {name for name, state in checks.items() if state == "ok"} >= {
            f"pump:{name}" for name in config["pumps"]
        }, checks

        ship(path, run, RECORDS)
        wanted = {f"{run}-{index}" for index in range(RECORDS)}

        def prometheus_total() -> float:
            with urllib.request.urlopen(f"http://{prometheus_address}/metrics", timeout=10) as r:
                text = r.read().decode()
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("iam_user_authorization_status_total{")
            )

        def es_requests() -> list[str]:
            if not elasticsearch.indices.exists(index=run):
                return []
            elasticsearch.indices.refresh(index=run)
            found = elasticsearch.search(index=run, size=RECORDS + 100, source=["request"])
            return [hit["_source"]["request"] for hit in found["hits"]["hits"]]

        found: dict[str, Callable[[], list[str]]] = {
            "csv": lambda: [row["Request"] for row in read_csv_rows(tmp_path / "csv")],
            "mongo": lambda: [
                doc["request"] for doc in mongo[run]["iam_analytics"].find({}, {"request": 1})
            ],
            "elasticsearch": es_requests,
            "kafka": lambda: [
                value["request"] for _key, value in read_topic(kafka_server.bootstrap, run)
            ],
            "influx": lambda: [
                point["request"]
                for point in influx_server.client(influx_database)
                .query('SELECT "request" FROM "analytics"')
                .get_points()
            ],
            "syslog": lambda: [
                str(line.record()["request"])
                for line in rsyslog.lines(tag)
                if line.record() is not None
            ],
        }
        for name, read in found.items():
            assert wait_until(lambda read=read: len(set(read())) >= RECORDS, 120), (
                name,
                len(set(read())),
                pump.output()[-3000:],
            )
        rsyslog.settle(tag)
        for name, read in found.items():
            requests = read()
            assert set(requests) == wanted, name
            if name != "kafka" and name != "syslog":  # at-least-once sinks may hold copies
                assert len(requests) == RECORDS, (name, len(requests))
        assert wait_until(lambda: prometheus_total() == RECORDS, 30), prometheus_total()
        assert "pump dummy: writing" in pump.output()  # the dummy pump's log line, as iam's
    finally:
        mongo.drop_database(run)
        mongo.close()
        if elasticsearch.indices.exists(index=run):
            elasticsearch.indices.delete(index=run)
        elasticsearch.close()
        server.stop()
