"""What the MongoDB pumps add to the contract: iam's documents, bulk splitting, error
classification, and aggregates counted once (server at ``MONGO_URI``; each test in its own
database, dropped afterwards)."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import AutoReconnect, BulkWriteError, NotPrimaryError, OperationFailure

from app.record import GO_ZERO_TIME, AnalyticsRecord
from pumps.base import Pump, WriteResult
from pumps.errors import PumpError, PumpPermanentError, PumpTemporaryError
from pumps.mongo import MongoPump
from pumps.mongo_aggregate import MongoAggregatePump, request_resource
from pumps.testing import copies, make_records, opened
from pumps.testing.contract import soon
from pumps.testing.records import EXPIRE_AT, NOW_S
from tests.stores import mongo_url_for

pytestmark = pytest.mark.integration

P = TypeVar("P", bound=Pump)
ALL_WRITTEN = WriteResult()
OVERSIZED_REQUEST_BYTES = 64 * 1024
SIZE_LIMIT_BYTES = 16 * 1024


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


def test_mongo_duplicate_key_from_a_racing_upsert_counts_as_written(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = make_records("race", 3)
    with opened(mongo_pump(mongo_db, RecordingMongoPump)) as pump:
        pump.write(records[1:2], deadline=soon())
        pump.fail_with = _bulk_error(1, 11000, "E11000 duplicate key", keyPattern={"_id": 1})
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
    assert mongo_db["analytics"].count_documents({}) == 3


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


def test_mongo_capped_option_creates_the_collection_at_open(
    mongo_db: Database[dict[str, Any]],
) -> None:
    # Only that it exists before any write: the stand-in accepts but ignores capping.
    with opened(mongo_pump(mongo_db, MongoPump, collection_cap_enable=True)) as pump:
        assert "analytics" in mongo_db.list_collection_names()
        assert pump.write(make_records("capped", 3), deadline=soon()) == ALL_WRITTEN
    assert mongo_db["analytics"].count_documents({}) == 3


def test_mongo_trims_an_oversized_record_and_marks_it(mongo_db: Database[dict[str, Any]]) -> None:
    records = make_records("big", 5)
    big = records[2] = dataclasses.replace(records[2], request="x" * OVERSIZED_REQUEST_BYTES)
    with opened(mongo_pump(mongo_db, MongoPump, max_document_size_bytes=SIZE_LIMIT_BYTES)) as pump:
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
    stored = {doc["_id"]: doc for doc in mongo_db["analytics"].find()}
    assert stored.keys() == {record.id for record in records}
    assert stored[big.id]["trimmed"] is True
    assert (stored[big.id]["request"], stored[big.id]["policies"]) == ("", "")
    assert stored[big.id]["username"] == big.username
    assert all("trimmed" not in doc for key, doc in stored.items() if key != big.id)


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


def test_aggregate_counts_per_bucket_dimension_and_value(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = varied_records()
    with opened(aggregate_pump(mongo_db, MongoAggregatePump)) as pump:
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
    assert aggregates(mongo_db) == expected_aggregates(records)
    doc = mongo_db["agg"].find_one({"dimension": "all"})
    assert doc is not None and doc["value"] == "" and doc["timestamp"].second == 0


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


def test_aggregate_update_that_lost_an_insert_race_is_applied_once(
    mongo_db: Database[dict[str, Any]],
) -> None:
    records = varied_records()
    with opened(aggregate_pump(mongo_db, RacedAggregatePump)) as pump:
        pump.records = records
        assert pump.write(records, deadline=soon()) == ALL_WRITTEN
    assert aggregates(mongo_db) == expected_aggregates(records)


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
