"""MongoDB: one document per record, upserted by its id (iam's ``mongo`` pump, made safe).

``meta`` takes iam's keys, so an existing ``iam-pump.yaml`` works as it is::

    mongo_url                          mongodb://user:pass@host:27017/iam_analytics; the database
                                       is the URL's path (``iam_analytics`` when it names none)
    collection_name                    default ``iam_analytics``
    collection_cap_enable              create the collection capped, if it does not exist yet
    collection_cap_max_size_bytes      the capped size; 0 means 5 GiB, as in iam
    max_insert_batch_size_bytes        one bulk write carries at most this much; 0 means 10 MiB
    max_document_size_bytes            larger records are trimmed; 0 means 10 MiB, at most 16 MiB
    mongo_use_ssl                      TLS, with the four keys below as in iam
    mongo_ssl_insecure_skip_verify     accept any certificate and host name
    mongo_ssl_allow_invalid_hostnames  verify the certificate but not the host name
    mongo_ssl_ca_file                  CA bundle (PEM)
    mongo_ssl_pem_keyfile              client certificate and key (PEM)
    mongo_db_type                      0 MongoDB, 1 AWS DocumentDB (no capped collections and no
                                       retryable writes there)

Where iam loses or duplicates data, this pump does not:

* Every record is upserted by its id (``_id``, ``$setOnInsert``) in unordered bulk writes, so a
  redelivered batch writes nothing twice and one refused document does not stop the others.
* ``expireAt`` carries a TTL index (made once per process, in :meth:`MongoPump.open`), so MongoDB
  forgets a record when its producer said to. A Go zero time means "no expiry" and is left out: a
  TTL index would delete such a document at once.
* A document over ``max_document_size_bytes`` is stored without its request, policies and
  deciders and marked ``trimmed: true`` (iam dropped only policies and deciders, and a document
  over MongoDB's 16 MiB failed its whole batch, tyk-pump #154). One still too large after that is
  refused alone, with the reason, and becomes a dead letter. Bulks are cut at
  ``max_insert_batch_size_bytes``.
* Errors are classified. Network, server selection, "not primary", shutdown, timeouts and write
  concern errors raise :class:`~pumps.errors.PumpTemporaryError` (the batch is retried, which is
  safe since writes are upserts); refused credentials raise
  :class:`~pumps.errors.PumpPermanentError`; a document the server refuses (validation, too large,
  bad field) is returned in :class:`~pumps.base.WriteResult` with the reason.
* Every write runs by the deadline it is handed (:mod:`pumps.deadline`), so a server that is
  down gives a temporary error in time instead of pymongo's 30 s default (or iam's endless
  retry loop).

The connection keys, client, error classification and open/check/close are shared with
:mod:`pumps.mongo_aggregate` and live in :mod:`pumps.mongo_connection`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import datetime
from operator import attrgetter
from typing import Any

import pymongo
from bson.errors import BSONError
from pydantic import Field, field_validator
from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    CollectionInvalid,
    DocumentTooLarge,
    OperationFailure,
    PyMongoError,
)

from app.record import EXPIRY_FIELD, RECORD_FIELDS, AnalyticsRecord, expiry
from pumps.base import NO_ID_REASON, WriteResult
from pumps.deadline import Deadline
from pumps.errors import PumpPermanentError
from pumps.mongo_connection import (
    DUPLICATE_KEY_ERROR_CODE,
    NAMESPACE_EXISTS_ERROR_CODE,
    RETRYABLE_ERROR_CODES,
    MongoBasePump,
    MongoConnectionMeta,
    MongoDBType,
    raise_if_retryable,
    wrap_mongo_error,
)

logger = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

DEFAULT_MAX_INSERT_BATCH_SIZE_BYTES = 10 * MIB
DEFAULT_MAX_DOCUMENT_SIZE_BYTES = 10 * MIB
DEFAULT_COLLECTION_CAP_MAX_SIZE_BYTES = 5 * GIB
#: MongoDB's own limit on one document (``maxBsonObjectSize``).
MONGODB_MAX_DOCUMENT_SIZE_BYTES = 16 * MIB
#: The fields dropped from a document that is too large.
TRIMMED_FIELDS = ("request", "policies", "deciders")

_BSON_DOCUMENT_FRAME_BYTES = 5  # int32 length + trailing NUL
_BSON_STRING_FRAME_BYTES = 5  # int32 length + trailing NUL
_BSON_FIXED_VALUE_BYTES = {int: 8, datetime: 8, bool: 1}


class MongoMeta(MongoConnectionMeta):
    """``meta`` of the mongo pump (iam's keys; a 0 size means iam's default, as in iam)."""

    collection_cap_enable: bool = False
    collection_cap_max_size_bytes: int = Field(default=DEFAULT_COLLECTION_CAP_MAX_SIZE_BYTES, ge=0)
    max_insert_batch_size_bytes: int = Field(default=DEFAULT_MAX_INSERT_BATCH_SIZE_BYTES, ge=0)
    max_document_size_bytes: int = Field(
        default=DEFAULT_MAX_DOCUMENT_SIZE_BYTES, ge=0, le=MONGODB_MAX_DOCUMENT_SIZE_BYTES
    )

    @field_validator("collection_cap_max_size_bytes")
    @classmethod
    def _cap_default(cls, value: int) -> int:
        return value or DEFAULT_COLLECTION_CAP_MAX_SIZE_BYTES

    @field_validator("max_insert_batch_size_bytes")
    @classmethod
    def _batch_default(cls, value: int) -> int:
        return value or DEFAULT_MAX_INSERT_BATCH_SIZE_BYTES

    @field_validator("max_document_size_bytes")
    @classmethod
    def _document_default(cls, value: int) -> int:
        return value or DEFAULT_MAX_DOCUMENT_SIZE_BYTES


def bson_size_bytes(document: dict[str, Any]) -> int:
    """The encoded size of a flat document of strings, ints, datetimes and booleans.

    Exact for those types (ints counted as int64, so never under), and O(1) per ASCII string,
    so it costs far less than encoding the document to measure it.
    """
    size = _BSON_DOCUMENT_FRAME_BYTES
    for key, value in document.items():
        size += 2 + len(key)  # type byte, key, NUL
        if isinstance(value, str):
            size += _BSON_STRING_FRAME_BYTES + (
                len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
            )
        else:
            size += _BSON_FIXED_VALUE_BYTES.get(type(value), 8)
    return size


#: The document fields besides the expiry, and a getter of their values, in schema order.
_DOCUMENT_NAMES = tuple(spec.json_name for spec in RECORD_FIELDS if spec is not EXPIRY_FIELD)
_document_values = attrgetter(
    *(spec.attribute for spec in RECORD_FIELDS if spec is not EXPIRY_FIELD)
)


def record_document(record: AnalyticsRecord) -> dict[str, Any]:
    """The stored form of a record, without ``_id``: iam's JSON field names.

    ``expireAt`` is left out for a record that never expires: a TTL index would delete a
    document with a year-1 time at once.
    """
    document: dict[str, Any] = dict(zip(_DOCUMENT_NAMES, _document_values(record), strict=True))
    expire_at = expiry(record)
    if expire_at is not None:
        document[EXPIRY_FIELD.json_name] = expire_at
    return document


class MongoPump(MongoBasePump[MongoMeta]):
    """Upserts one document per record; see the module docstring."""

    Meta = MongoMeta

    def _prepare(self, database: Database[dict[str, Any]]) -> None:
        meta = self.meta
        name = meta.collection_name
        if meta.collection_cap_enable:
            self._create_capped(database)
        collection = database[name]
        if (collection.options() or {}).get("capped"):
            logger.info(
                "pump %s: %r is capped; MongoDB allows no TTL index there, so records leave it "
                "by size, not by expireAt",
                self.name,
                name,
            )
            return
        self._create_index(
            collection, [(EXPIRY_FIELD.json_name, pymongo.ASCENDING)], expireAfterSeconds=0
        )

    def _create_capped(self, database: Database[dict[str, Any]]) -> None:
        meta = self.meta
        name = meta.collection_name
        if meta.mongo_db_type is MongoDBType.AWS_DOCUMENT_DB:
            logger.warning(
                "pump %s: DocumentDB has no capped collections; %r is not", self.name, name
            )
            return
        if name in database.list_collection_names(filter={"name": name}):
            # As iam: capping an existing collection could lose data.
            logger.warning("pump %s: %r exists already; it is not capped", self.name, name)
            return
        try:
            database.create_collection(
                name, capped=True, size=meta.collection_cap_max_size_bytes, check_exists=False
            )
        except CollectionInvalid:
            return  # another worker made it first
        except OperationFailure as exc:
            if exc.code != NAMESPACE_EXISTS_ERROR_CODE:  # else another worker made it first
                raise
            return
        logger.info(
            "pump %s: created capped collection %r (%d bytes)",
            self.name,
            name,
            meta.collection_cap_max_size_bytes,
        )

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Upsert the records by id by ``deadline``; return those MongoDB refused one by one.

        Raises :class:`PumpTemporaryError` when a retry may help (the whole batch is then
        redelivered; the bulks written before the failure are upserts, so they are not doubled).
        """
        if not records:
            return WriteResult()
        collection = self.collection
        rejected: list[tuple[AnalyticsRecord, str]] = []
        entries: list[tuple[AnalyticsRecord, dict[str, Any], int]] = []
        for record in records:
            prepared = self._prepared(record) if record.id else NO_ID_REASON
            if isinstance(prepared, str):
                rejected.append((record, prepared))
            else:
                entries.append((record, *prepared))
        try:
            with pymongo.timeout(deadline.operation_budget_s()):
                for chunk in self._chunks(entries):
                    rejected += self._write_chunk(collection, chunk)
        except PyMongoError as exc:
            raise wrap_mongo_error(exc, doing=f"write to {collection.name!r}") from exc
        return WriteResult(rejected=rejected)

    def _prepared(self, record: AnalyticsRecord) -> tuple[dict[str, Any], int] | str:
        """The record's document and its size, trimmed if too large; or why it cannot be stored."""
        limit = self.meta.max_document_size_bytes
        document = record_document(record)
        document["_id"] = record.id
        size = bson_size_bytes(document)
        if size <= limit:
            return document, size
        for field in TRIMMED_FIELDS:
            document[field] = ""
        document["trimmed"] = True
        trimmed_size = bson_size_bytes(document)
        if trimmed_size > limit:
            return (
                f"document is {trimmed_size} bytes even without {', '.join(TRIMMED_FIELDS)}, "
                f"over max_document_size_bytes ({limit})"
            )
        logger.warning(
            "pump %s: record %s is %d bytes, over max_document_size_bytes (%d): stored without "
            "%s, marked trimmed",
            self.name,
            record.id,
            size,
            limit,
            ", ".join(TRIMMED_FIELDS),
        )
        return document, trimmed_size

    def _chunks(
        self, entries: list[tuple[AnalyticsRecord, dict[str, Any], int]]
    ) -> Iterator[list[tuple[AnalyticsRecord, dict[str, Any]]]]:
        """Consecutive runs of entries of at most ``max_insert_batch_size_bytes`` (at least one)."""
        limit = self.meta.max_insert_batch_size_bytes
        chunk: list[tuple[AnalyticsRecord, dict[str, Any]]] = []
        chunk_bytes = 0
        for record, document, size in entries:
            if chunk and chunk_bytes + size > limit:
                yield chunk
                chunk, chunk_bytes = [], 0
            chunk.append((record, document))
            chunk_bytes += size
        if chunk:
            yield chunk

    def _write_chunk(
        self,
        collection: Collection[dict[str, Any]],
        chunk: list[tuple[AnalyticsRecord, dict[str, Any]]],
    ) -> list[tuple[AnalyticsRecord, str]]:
        """One unordered bulk of upserts; returns the records refused one by one."""
        operations = [
            UpdateOne({"_id": document.pop("_id")}, {"$setOnInsert": document}, upsert=True)
            for _record, document in chunk
        ]
        try:
            self._bulk_write(collection, operations)
        except BulkWriteError as exc:
            return self._refused(exc, [record for record, _document in chunk])
        except (BSONError, DocumentTooLarge) as exc:
            # Refused by the driver before sending (it stops at the first bad document): find the
            # bad ones and write the rest.
            return self._write_encodable(collection, chunk, operations, exc)
        return []

    def _refused(
        self, exc: BulkWriteError, records: list[AnalyticsRecord]
    ) -> list[tuple[AnalyticsRecord, str]]:
        details: dict[str, Any] = dict(exc.details or {})
        retryable = []
        rejected = []
        for error in details.get("writeErrors") or []:
            code = error.get("code")
            index = error.get("index")
            message = str(error.get("errmsg", "")).strip()
            if code == DUPLICATE_KEY_ERROR_CODE and error.get("keyPattern", {"_id": 1}) == {
                "_id": 1
            }:
                # Two upserts of one id raced; the other stored the same document.
                continue
            if code in RETRYABLE_ERROR_CODES:
                retryable.append(f"code {code}: {message}")
            elif isinstance(index, int) and 0 <= index < len(records):
                rejected.append(
                    (records[index], f"MongoDB refused the document (code {code}): {message}")
                )
            else:
                retryable.append(f"code {code} for an unknown operation {index!r}: {message}")
        raise_if_retryable(retryable, details, doing="bulk write")
        return rejected

    def _write_encodable(
        self,
        collection: Collection[dict[str, Any]],
        chunk: list[tuple[AnalyticsRecord, dict[str, Any]]],
        operations: list[UpdateOne],
        exc: Exception,
    ) -> list[tuple[AnalyticsRecord, str]]:
        import bson

        good: list[UpdateOne] = []
        good_records: list[AnalyticsRecord] = []
        rejected: list[tuple[AnalyticsRecord, str]] = []
        for (record, document), operation in zip(chunk, operations, strict=True):
            try:
                encoded = bson.encode(document)
            except BSONError as error:
                rejected.append((record, f"document cannot be encoded as BSON: {error}"))
                continue
            if len(encoded) > MONGODB_MAX_DOCUMENT_SIZE_BYTES:
                rejected.append((record, f"document is {len(encoded)} bytes, over MongoDB's limit"))
                continue
            good.append(operation)
            good_records.append(record)
        if not rejected:
            raise PumpPermanentError(f"MongoDB driver refused the bulk: {exc}") from exc
        if good:
            try:
                self._bulk_write(collection, good)
            except BulkWriteError as error:
                rejected += self._refused(error, good_records)
        return rejected
