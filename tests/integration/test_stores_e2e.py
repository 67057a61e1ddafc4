"""End to end into MongoDB and Elasticsearch: Go records on the Redis list and records from
``record_hit`` go through a real ``celery worker`` and ``celery beat`` into the ``mongo``,
``mongo-aggregate`` and ``elasticsearch`` pumps, and each arrives exactly once.

The servers come from ``MONGO_URI`` and ``ES_URL`` (skipped locally when absent, failing in CI);
the test uses its own database and index and removes them afterwards.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from elasticsearch import Elasticsearch
from pymongo.database import Database

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from app.codec import encode_go_record
from tests.stores import ES_URL, mongo_url_for
from tests.support import (
    Proc,
    base_config,
    start_beat,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

EXPIRE_AT = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
GO_RECORDS = 3000
PYTHON_RECORDS = 3000
DELIVERY_TIMEOUT_S = 120
PUMP_TIMEOUT_S = 10


@pytest.fixture
def es_index(es_url: str) -> Iterator[tuple[Elasticsearch, str]]:
    """A client and an index name of this test's own; both index and template are removed."""
    client = Elasticsearch(es_url.split(","), request_timeout=10)
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    try:
        yield client, name
    finally:
        for index in client.indices.get(index=f"{name}*").body:
            client.indices.delete(index=index)
        if client.indices.exists_index_template(name=name):
            client.indices.delete_index_template(name=name)
        client.close()


def make_record(run: str, source: str, index: int) -> AnalyticsRecord:
    """A record told apart by its request's ``n``; users and effects repeat, for the counters."""
    return AnalyticsRecord(
        timestamp=1_795_500_000 + index,
        username=f"user-{index % 7}",
        effect="allow" if index % 3 else "deny",
        conclusion=f"conclusion {index}",
        request=json.dumps({"resource": f"res-{index % 5}", "run": run, "n": f"{source}-{index}"}),
        policies='[{"id": "p1"}]',
        deciders="[]",
        expire_at=EXPIRE_AT,
    )


def report(records: list[AnalyticsRecord], config_path: Path) -> None:
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config_path)))
    analytics.start()
    for record in records:
        while not analytics.record_hit(record):  # a full buffer refuses: offer it again
            time.sleep(0.001)
    stats = analytics.stop()
    assert stats.shipped_records == len(records), stats


def es_sources(client: Elasticsearch, index: str) -> list[dict[str, Any]]:
    client.indices.refresh(index=index)
    hits = client.search(index=index, query={"match_all": {}}, size=10_000).body["hits"]["hits"]
    return [{"_id": hit["_id"], **hit["_source"]} for hit in hits]


def es_count(client: Elasticsearch, index: str) -> int:
    if not client.indices.exists(index=index):
        return 0
    client.indices.refresh(index=index)
    return int(client.count(index=index)["count"])


def aggregate_hits(database: Database[dict[str, Any]]) -> int:
    return sum(doc["hits"] for doc in database["agg"].find({"dimension": "all"}))


def test_go_and_reporter_records_reach_mongo_aggregates_and_elasticsearch_once(
    tmp_path: Path,
    redis_db: redis.Redis,
    procs: list[Proc],
    mongo_db: Database[dict[str, Any]],
    es_index: tuple[Elasticsearch, str],
) -> None:
    es, index = es_index
    run = uuid.uuid4().hex[:8]
    list_key = f"test-{run}"
    mongo_url = mongo_url_for(mongo_db.name)
    pumps = {
        "mongo": {
            "type": "mongo",
            "timeout": PUMP_TIMEOUT_S,
            "meta": {"mongo_url": mongo_url, "collection_name": "analytics"},
        },
        "agg": {
            "type": "mongo-aggregate",
            "timeout": PUMP_TIMEOUT_S,
            "meta": {"mongo_url": mongo_url, "collection_name": "agg"},
        },
        "es": {
            "type": "elasticsearch",
            "timeout": PUMP_TIMEOUT_S,
            "meta": {"elasticsearch_url": ES_URL, "index_name": index},
        },
    }
    settings = base_config(tmp_path, pumps=pumps)
    settings["analytics-key"] = list_key
    config = write_config(tmp_path / "c.yaml", settings)
    procs.append(start_worker(config, tmp_path / "worker.log"))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))

    go_records = [make_record(run, "go", i) for i in range(GO_RECORDS)]
    python_records = [make_record(run, "py", i) for i in range(PYTHON_RECORDS)]
    for start in range(0, len(go_records), 1000):
        chunk = go_records[start : start + 1000]
        redis_db.rpush(list_key, *(encode_go_record(record) for record in chunk))
    report(python_records, config)
    expected = go_records + python_records
    total = len(expected)

    def delivered() -> bool:
        return (
            mongo_db["analytics"].count_documents({}) >= total
            and aggregate_hits(mongo_db) >= total
            and es_count(es, index) >= total
        )

    assert wait_until(delivered, DELIVERY_TIMEOUT_S, interval_s=1.0), (
        f"mongo {mongo_db['analytics'].count_documents({})}, aggregate {aggregate_hits(mongo_db)}"
        f", es {es_count(es, index)} of {total}; worker log:\n{procs[0].output()[-3000:]}"
    )
    time.sleep(2)  # anything written twice would arrive now

    wanted = Counter(record.request for record in expected)
    stored = list(mongo_db["analytics"].find())
    assert Counter(doc["request"] for doc in stored) == wanted
    assert all(doc["_id"].rpartition("-")[2].isdigit() for doc in stored)
    assert all(doc["expireAt"] == EXPIRE_AT for doc in stored)

    indexed = es_sources(es, index)
    assert Counter(doc["request"] for doc in indexed) == wanted
    assert {doc["_id"] for doc in indexed} == {doc["_id"] for doc in stored}

    by_user = Counter(record.username for record in expected)
    by_effect = Counter(record.effect for record in expected)
    counted: dict[str, Counter[str]] = {"username": Counter(), "effect": Counter()}
    for doc in mongo_db["agg"].find({"dimension": {"$in": ["username", "effect"]}}):
        counted[doc["dimension"]][doc["value"]] += doc["hits"]
    assert aggregate_hits(mongo_db) == total
    assert counted == {"username": by_user, "effect": by_effect}

    assert redis_db.llen(list_key) == 0
    assert not redis_db.keys("*dead-letters*")
