"""Per-minute aggregates in MongoDB: counters per time bucket and dimension, counted once.

``meta``::

    mongo_url, mongo_use_ssl, ...  the connection keys of the mongo pump (iam's names)
    collection_name                default ``iam_analytics_aggregates``
    aggregation_time               bucket length in minutes, 1 to 60 (tyk-pump's key); default 1
    ignore_aggregations            dimensions not to count, any of username, effect, resource
    applied_batches_kept           how many batch keys each document remembers; default 1000

One document per (bucket, dimension, value), its counters flat and upserted with ``$inc``::

    {"_id": "username|2026-11-26T13:05Z|alice", "timestamp": <bucket start, UTC>,
     "dimension": "username", "value": "alice", "hits": 12, "allowed": 10, "denied": 2,
     "batches": ["<batch key>", ...]}

Dimensions: ``all`` (value ``""``: every record), ``username``, ``effect`` and ``resource``, the
last read from the record's ``request`` (iam's JSON of a ladon request) when it names one. Empty
values are not counted under their dimension (they are under ``all``). ``allowed`` and ``denied``
count effects ``allow`` and ``deny`` (ladon's values, any case); ``hits`` counts every record.

Counted once, even when a batch is delivered twice or a worker dies half-way. Each update
carries the batch key in its filter and in its change::

    filter {"_id": id, "batches": {"$nin": [key]}}
    update {"$inc": counters, "$push": {"batches": {"$each": [key], "$slice": -kept}}, ...}

MongoDB applies one document's update atomically, so a document either has both the counts and
the key or neither: a crash between documents leaves the applied ones marked and the redelivered
batch applies only the rest. When the key is already there the filter matches nothing and the
upsert's insert fails on the duplicate ``_id`` (11000); the pump then repeats that update without
upsert, which applies it if the duplicate came from a concurrent first insert and does nothing if
the key was there. (``$nin: [key]`` means what ``$ne: key`` means on an array; the test stand-in
mishandles ``$ne`` on arrays but not ``$nin``.)

The batch key is the batch id (the record ids less their ``-<position>``) plus a digest of the
positions written, so two different parts of one batch, should they ever be written separately,
are not mistaken for one another. The window: a document remembers its last
``applied_batches_kept`` keys, so a batch redelivered after that many later batches have updated
the same document would be counted again. Redeliveries come within minutes (retries, the broker's
visibility timeout), while a document stops changing when its bucket is over; a batch of 1000
records a second updates a per-minute document 60 times. Each key costs about 40 bytes.

A document the server refuses cannot be pinned on one record (it sums many), so the batch goes
to the dead letters as a whole; replaying it is safe, since the documents it did update are
skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import pymongo
from pydantic import Field
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, PyMongoError

from app.record import AnalyticsRecord
from pumps.base import WriteResult
from pumps.deadline import Deadline
from pumps.errors import PumpPermanentError
from pumps.mongo_connection import (
    DUPLICATE_KEY_ERROR_CODE,
    RETRYABLE_ERROR_CODES,
    MongoBasePump,
    MongoConnectionMeta,
    raise_if_retryable,
    wrap_mongo_error,
)

logger = logging.getLogger(__name__)

DEFAULT_AGGREGATE_COLLECTION_NAME = "iam_analytics_aggregates"
DEFAULT_AGGREGATION_TIME_MIN = 1
MAX_AGGREGATION_TIME_MIN = 60
DEFAULT_APPLIED_BATCHES_KEPT = 1000
MAX_APPLIED_BATCHES_KEPT = 100_000
ALL_DIMENSION = "all"
#: Hex digits of the positions digest in a batch key.
_POSITIONS_DIGEST_HEX = 12

Dimension = Literal["username", "effect", "resource"]
#: A (bucket start in Unix seconds, dimension, value) triple: one aggregate document.
AggregateKey = tuple[int, str, str]


class MongoAggregateMeta(MongoConnectionMeta):
    """``meta`` of the mongo-aggregate pump."""

    collection_name: str = DEFAULT_AGGREGATE_COLLECTION_NAME
    aggregation_time: int = Field(
        default=DEFAULT_AGGREGATION_TIME_MIN, ge=1, le=MAX_AGGREGATION_TIME_MIN
    )
    ignore_aggregations: tuple[Dimension, ...] = ()
    applied_batches_kept: int = Field(
        default=DEFAULT_APPLIED_BATCHES_KEPT, ge=1, le=MAX_APPLIED_BATCHES_KEPT
    )


def request_resource(request: str) -> str:
    """The ``resource`` named by an iam request (a ladon request as JSON), or ``""``."""
    if '"resource"' not in request:
        return ""
    try:
        parsed = json.loads(request)
    except ValueError:
        return ""
    resource = parsed.get("resource") if isinstance(parsed, dict) else None
    return resource if isinstance(resource, str) else ""


def batch_key(records: Sequence[AnalyticsRecord]) -> str:
    """The key that marks these records as applied: their batch id and a digest of positions.

    Raises ValueError when a record id is not ``<batch id>-<position>`` or the batches differ.
    """
    batch_ids = set()
    positions = []
    for record in records:
        batch_id, dash, position = record.id.rpartition("-")
        if not dash or not batch_id or not position.isdigit():
            raise ValueError(f"record id {record.id!r} is not '<batch id>-<position>'")
        batch_ids.add(batch_id)
        positions.append(position)
    if len(batch_ids) != 1:
        raise ValueError(f"records of {len(batch_ids)} batches in one key")
    digest = hashlib.blake2b(",".join(positions).encode("ascii"), digest_size=16).hexdigest()
    return f"{batch_ids.pop()}#{digest[:_POSITIONS_DIGEST_HEX]}"


def document_id(bucket: datetime, dimension: str, value: str) -> str:
    """The ``_id`` of one aggregate document: ``<dimension>|<bucket start>|<value>``.

    The value comes last, so a ``|`` in it is unambiguous, and the dimension first, so that ids
    sort by dimension and time.
    """
    return f"{dimension}|{bucket:%Y-%m-%dT%H:%M}Z|{value}"


class MongoAggregatePump(MongoBasePump[MongoAggregateMeta]):
    """Counts records per time bucket and dimension; see the module docstring."""

    Meta = MongoAggregateMeta

    def _prepare(self, database: Database[dict[str, Any]]) -> None:
        collection = database[self.meta.collection_name]
        self._create_index(
            collection, [("dimension", pymongo.ASCENDING), ("timestamp", pymongo.ASCENDING)]
        )

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Add the records to their buckets' counters, once per batch however often delivered.

        Raises :class:`PumpTemporaryError` when a retry may help (redelivery is safe: the
        documents already updated for this batch are skipped) and :class:`PumpPermanentError`
        when the server refuses an aggregate document.
        """
        if not records:
            return WriteResult()
        collection = self.collection
        rejected: list[tuple[AnalyticsRecord, str]] = []
        updates: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for batch_records in self._by_batch(records, rejected):
            try:
                key = batch_key(batch_records)
            except ValueError as exc:
                rejected += [(record, f"cannot aggregate once: {exc}") for record in batch_records]
                continue
            updates += self._updates(key, self._count(batch_records, rejected))
        if updates:
            try:
                with pymongo.timeout(deadline.operation_budget_s()):
                    self._apply(collection, updates)
            except PyMongoError as exc:
                raise wrap_mongo_error(exc, doing=f"update of {collection.name!r}") from exc
        return WriteResult(rejected=rejected)

    @staticmethod
    def _by_batch(
        records: Sequence[AnalyticsRecord], rejected: list[tuple[AnalyticsRecord, str]]
    ) -> Iterator[list[AnalyticsRecord]]:
        """The records grouped by batch id (the write task passes one batch; this is for safety)."""
        groups: dict[str, list[AnalyticsRecord]] = {}
        for record in records:
            batch_id, dash, _position = record.id.rpartition("-")
            if not dash or not batch_id:
                rejected.append(
                    (record, f"cannot aggregate once: record id {record.id!r} has no batch id")
                )
                continue
            groups.setdefault(batch_id, []).append(record)
        yield from groups.values()

    def _count(
        self, records: list[AnalyticsRecord], rejected: list[tuple[AnalyticsRecord, str]]
    ) -> dict[AggregateKey, list[int]]:
        """[hits, allowed, denied] per (bucket start, dimension, value)."""
        meta = self.meta
        bucket_s = meta.aggregation_time * 60
        with_username = "username" not in meta.ignore_aggregations
        with_effect = "effect" not in meta.ignore_aggregations
        with_resource = "resource" not in meta.ignore_aggregations
        counters: dict[AggregateKey, list[int]] = {}
        for record in records:
            try:
                datetime.fromtimestamp(record.timestamp, UTC)
            except (OverflowError, OSError, ValueError):
                rejected.append((record, f"timestamp {record.timestamp} is not a usable time"))
                continue
            start = record.timestamp - record.timestamp % bucket_s
            effect = record.effect.lower()
            allowed = int(effect == "allow")
            denied = int(effect == "deny")
            values = [(ALL_DIMENSION, "")]
            if with_username and record.username:
                values.append(("username", record.username))
            if with_effect and record.effect:
                values.append(("effect", record.effect))
            if with_resource:
                resource = request_resource(record.request)
                if resource:
                    values.append(("resource", resource))
            for dimension, value in values:
                counter = counters.get((start, dimension, value))
                if counter is None:
                    counters[(start, dimension, value)] = [1, allowed, denied]
                else:
                    counter[0] += 1
                    counter[1] += allowed
                    counter[2] += denied
        return counters

    def _updates(
        self, key: str, counters: dict[AggregateKey, list[int]]
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """One (filter, update) pair per aggregate document."""
        kept = self.meta.applied_batches_kept
        updates = []
        for (start, dimension, value), (hits, allowed, denied) in counters.items():
            bucket = datetime.fromtimestamp(start, UTC)
            updates.append(
                (
                    {"_id": document_id(bucket, dimension, value), "batches": {"$nin": [key]}},
                    {
                        "$inc": {"hits": hits, "allowed": allowed, "denied": denied},
                        "$setOnInsert": {
                            "timestamp": bucket,
                            "dimension": dimension,
                            "value": value,
                        },
                        "$push": {"batches": {"$each": [key], "$slice": -kept}},
                    },
                )
            )
        return updates

    def _apply(
        self,
        collection: Collection[dict[str, Any]],
        updates: list[tuple[dict[str, Any], dict[str, Any]]],
    ) -> None:
        operations = [UpdateOne(query, change, upsert=True) for query, change in updates]
        try:
            self._bulk_write(collection, operations)
        except BulkWriteError as exc:
            again = self._classify(exc, updates)
            for query, change in again:
                # The _id exists (that is what 11000 said), so no upsert is needed: this applies
                # the update if the key is missing (a concurrent insert won) and else does nothing.
                collection.update_one(query, change)

    @staticmethod
    def _classify(
        exc: BulkWriteError, updates: list[tuple[dict[str, Any], dict[str, Any]]]
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The updates to repeat without upsert; raises for any other error."""
        details: dict[str, Any] = dict(exc.details or {})
        again = []
        retryable = []
        refused = []
        for error in details.get("writeErrors") or []:
            code = error.get("code")
            index = error.get("index")
            message = f"code {code}: {str(error.get('errmsg', '')).strip()}"
            if code == DUPLICATE_KEY_ERROR_CODE and isinstance(index, int):
                again.append(updates[index])
            elif code in RETRYABLE_ERROR_CODES:
                retryable.append(message)
            else:
                refused.append(
                    f"{updates[index][0]['_id'] if isinstance(index, int) else '?'}: {message}"
                )
        raise_if_retryable(retryable, details, doing="aggregate update")
        if refused:
            raise PumpPermanentError(
                f"MongoDB refused {len(refused)} aggregate document(s), first {refused[0]}; "
                "replaying the batch is safe, the documents it updated are skipped"
            )
        return again
