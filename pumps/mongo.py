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
* Every client timeout derives from the pump's ``timeout``, so a server that is down gives a
  temporary error within that time instead of pymongo's 30 s default (or iam's endless retry loop).

The shared connection pieces (:class:`MongoConnectionMeta`, :func:`mongo_client`,
:func:`wrap_mongo_error`, :class:`MongoBasePump`) are used by :mod:`pumps.mongo_aggregate` too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, ClassVar

import pymongo
from bson.errors import BSONError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    CollectionInvalid,
    ConfigurationError,
    DocumentTooLarge,
    OperationFailure,
    PyMongoError,
)
from pymongo.uri_parser import parse_uri

from app.config import mask_url
from app.record import AnalyticsRecord
from pumps.base import Pump, WriteResult
from pumps.errors import PumpError, PumpPermanentError, PumpTemporaryError

logger = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

DEFAULT_DATABASE_NAME = "iam_analytics"
DEFAULT_COLLECTION_NAME = "iam_analytics"
DEFAULT_MAX_INSERT_BATCH_SIZE_BYTES = 10 * MIB
DEFAULT_MAX_DOCUMENT_SIZE_BYTES = 10 * MIB
DEFAULT_COLLECTION_CAP_MAX_SIZE_BYTES = 5 * GIB
#: MongoDB's own limit on one document (``maxBsonObjectSize``).
MONGODB_MAX_DOCUMENT_SIZE_BYTES = 16 * MIB
#: The health check's own deadline, however long the pump's timeout is.
CHECK_TIMEOUT_S = 2.0
#: A write ends this long before the pump's timeout, so the pump's own error (naming the cause)
#: arrives before the write task's soft time limit.
TIMEOUT_MARGIN_S = 1.0
#: The shortest budget an operation gets, whatever the pump's timeout.
MIN_OPERATION_BUDGET_S = 0.5

DUPLICATE_KEY_ERROR_CODE = 11000
#: Server error codes that mean "try again later": not primary, shutting down, interrupted,
#: network and time limits, lock and write conflicts, and rate limits of hosted services.
RETRYABLE_ERROR_CODES = frozenset(
    {
        6,  # HostUnreachable
        7,  # HostNotFound
        24,  # LockTimeout
        46,  # LockBusy
        50,  # MaxTimeMSExpired
        89,  # NetworkTimeout
        91,  # ShutdownInProgress
        112,  # WriteConflict
        189,  # PrimarySteppedDown
        262,  # ExceededTimeLimit
        9001,  # SocketException
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11602,  # InterruptedDueToReplStateChange
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
        16500,  # request rate too large (Cosmos DB's MongoDB API)
    }
)
#: Server error codes that mean the credentials or their rights are wrong: no retry will help.
AUTH_ERROR_CODES = frozenset({13, 18})  # Unauthorized, AuthenticationFailed
#: Index creation codes that mean "an index on these keys exists with other options".
INDEX_CONFLICT_ERROR_CODES = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict
#: Why a record without an id is refused: upserting it would overwrite another such record.
NO_ID_REASON = "record has no id, so it cannot be upserted once"
#: The fields dropped from a document that is too large.
TRIMMED_FIELDS = ("request", "policies", "deciders")

_BSON_DOCUMENT_FRAME_BYTES = 5  # int32 length + trailing NUL
_BSON_STRING_FRAME_BYTES = 5  # int32 length + trailing NUL
_BSON_FIXED_VALUE_BYTES = {int: 8, datetime: 8, bool: 1}


class MongoDBType(IntEnum):
    """iam's ``mongo_db_type``."""

    STANDARD = 0
    AWS_DOCUMENT_DB = 1


def _validate_mongo_url(value: str) -> str:
    if not value.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError("must start with mongodb:// or mongodb+srv://")
    if value.startswith("mongodb://"):
        # A plain URL is parsed without I/O; an SRV one needs DNS, so it is checked at open().
        try:
            parse_uri(value)
        except (ConfigurationError, ValueError) as exc:
            raise ValueError(f"not a valid MongoDB URL: {exc}") from None
    return value


def validate_collection_name(value: str) -> str:
    """Check a MongoDB collection name; raise ValueError naming the rule it breaks."""
    if not value or "$" in value or "\x00" in value or value.startswith(".") or value.endswith("."):
        raise ValueError(
            "a collection name is not empty, has no '$' and no leading or trailing '.'"
        )
    return value


class MongoConnectionMeta(BaseModel):
    """The connection keys shared by the ``mongo`` and ``mongo-aggregate`` pumps (iam's names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mongo_url: str = Field(min_length=1)
    mongo_use_ssl: bool = False
    mongo_ssl_insecure_skip_verify: bool = False
    mongo_ssl_allow_invalid_hostnames: bool = False
    mongo_ssl_ca_file: str = ""
    mongo_ssl_pem_keyfile: str = ""
    mongo_db_type: MongoDBType = MongoDBType.STANDARD

    @field_validator("mongo_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _validate_mongo_url(value)


class MongoMeta(MongoConnectionMeta):
    """``meta`` of the mongo pump (iam's keys; a 0 size means iam's default, as in iam)."""

    collection_name: str = DEFAULT_COLLECTION_NAME
    collection_cap_enable: bool = False
    collection_cap_max_size_bytes: int = Field(default=DEFAULT_COLLECTION_CAP_MAX_SIZE_BYTES, ge=0)
    max_insert_batch_size_bytes: int = Field(default=DEFAULT_MAX_INSERT_BATCH_SIZE_BYTES, ge=0)
    max_document_size_bytes: int = Field(
        default=DEFAULT_MAX_DOCUMENT_SIZE_BYTES, ge=0, le=MONGODB_MAX_DOCUMENT_SIZE_BYTES
    )

    @field_validator("collection_name")
    @classmethod
    def _collection(cls, value: str) -> str:
        return validate_collection_name(value)

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


def mongo_client(meta: MongoConnectionMeta, *, timeout_s: float) -> MongoClient[dict[str, Any]]:
    """A client whose every timeout is ``timeout_s``; it connects in the background.

    Raises :class:`PumpTemporaryError` when the URL cannot be resolved (an SRV record's DNS).
    """
    timeout_ms = max(1, int(timeout_s * 1000))
    options: dict[str, Any] = {
        "serverSelectionTimeoutMS": timeout_ms,
        "connectTimeoutMS": timeout_ms,
        "socketTimeoutMS": timeout_ms,
        "appname": "iam-pump",
        "tz_aware": True,
    }
    if meta.mongo_use_ssl:
        options["tls"] = True
        if meta.mongo_ssl_insecure_skip_verify:
            options["tlsInsecure"] = True
        elif meta.mongo_ssl_allow_invalid_hostnames:
            options["tlsAllowInvalidHostnames"] = True
        if meta.mongo_ssl_ca_file:
            options["tlsCAFile"] = meta.mongo_ssl_ca_file
        if meta.mongo_ssl_pem_keyfile:
            options["tlsCertificateKeyFile"] = meta.mongo_ssl_pem_keyfile
    if meta.mongo_db_type is MongoDBType.AWS_DOCUMENT_DB:
        options["retryWrites"] = False
    try:
        return MongoClient(meta.mongo_url, **options)
    except ConfigurationError as exc:
        raise PumpTemporaryError(
            f"cannot use MongoDB URL {mask_url(meta.mongo_url)}: {exc}"
        ) from exc


def operation_budget_s(timeout_s: float) -> float:
    """How long one pump operation may take: the pump's timeout less a margin."""
    return max(MIN_OPERATION_BUDGET_S, timeout_s - TIMEOUT_MARGIN_S)


def wrap_mongo_error(exc: PyMongoError, *, doing: str) -> PumpError:
    """The pump error for a driver error: permanent for refused credentials, else temporary.

    Unknown errors count as temporary: the write task retries them and, if they persist, keeps
    the batch as a dead letter anyway, whereas a permanent error would skip the retries.
    """
    message = f"MongoDB {doing} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, OperationFailure) and exc.code in AUTH_ERROR_CODES:
        return PumpPermanentError(message)
    return PumpTemporaryError(message)


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


def expiry_of(record: AnalyticsRecord) -> datetime | None:
    """The record's ``expireAt`` as an aware datetime, or None for "never" (unset, Go zero time)."""
    expire_at = record.expire_at
    if expire_at is None or expire_at.year <= 1:
        return None
    return expire_at if expire_at.tzinfo is not None else expire_at.replace(tzinfo=UTC)


def record_document(record: AnalyticsRecord) -> dict[str, Any]:
    """The stored form of a record, without ``_id``: iam's JSON field names."""
    document: dict[str, Any] = {
        "timestamp": record.timestamp,
        "username": record.username,
        "effect": record.effect,
        "conclusion": record.conclusion,
        "request": record.request,
        "policies": record.policies,
        "deciders": record.deciders,
    }
    expire_at = expiry_of(record)
    if expire_at is not None:
        document["expireAt"] = expire_at
    return document


class MongoBasePump(Pump):
    """A pump that owns one MongoDB client and collection; subclasses prepare and write.

    :meth:`open` builds the client and runs :meth:`_prepare` (indexes, collection options) under
    the pump's time budget; if that fails the client is closed and the error raised, so the next
    attempt opens afresh. :meth:`check` pings with a short deadline; :meth:`close` is idempotent.
    """

    upserts: ClassVar[bool] = True
    handles_record_size: ClassVar[bool] = True

    _client: MongoClient[dict[str, Any]] | None = None
    _collection: Collection[dict[str, Any]] | None = None

    @property
    def connection_meta(self) -> MongoConnectionMeta:
        """The validated ``meta``."""
        assert isinstance(self.meta, MongoConnectionMeta)
        return self.meta

    @property
    def collection_name(self) -> str:
        """The collection written to."""
        name = getattr(self.meta, "collection_name", DEFAULT_COLLECTION_NAME)
        return str(name)

    @property
    def budget_s(self) -> float:
        """How long one write (all its bulks and retries) may take."""
        return operation_budget_s(self.timeout_s)

    def open(self) -> None:
        if self._client is not None:
            return
        meta = self.connection_meta
        client = mongo_client(meta, timeout_s=self.timeout_s)
        try:
            database = client.get_default_database(default=DEFAULT_DATABASE_NAME)
            with pymongo.timeout(self.budget_s):
                self._prepare(database)
        except PyMongoError as exc:
            client.close()
            raise wrap_mongo_error(exc, doing=f"setup of {self.collection_name!r}") from exc
        except BaseException:
            client.close()
            raise
        self._client = client
        self._collection = database[self.collection_name]
        logger.info(
            "pump %s: MongoDB %s, database %r, collection %r",
            self.name,
            mask_url(meta.mongo_url),
            database.name,
            self.collection_name,
        )

    def _prepare(self, database: Database[dict[str, Any]]) -> None:
        """Create what the collection needs (indexes, options); idempotent. Runs in :meth:`open`."""

    def _create_index(
        self, collection: Collection[dict[str, Any]], keys: list[tuple[str, int]], **options: Any
    ) -> None:
        """Create an index; one that exists with other options is logged and kept as it is."""
        try:
            collection.create_index(keys, **options)
        except OperationFailure as exc:
            if exc.code not in INDEX_CONFLICT_ERROR_CODES:
                raise
            logger.warning(
                "pump %s: an index on %s of %r exists with other options; kept as it is: %s",
                self.name,
                keys,
                collection.name,
                exc,
            )

    @property
    def collection(self) -> Collection[dict[str, Any]]:
        """The open collection; raises :class:`PumpTemporaryError` if the pump is not open."""
        if self._collection is None:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        return self._collection

    def check(self) -> None:
        if self._client is None:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        try:
            with pymongo.timeout(min(self.budget_s, CHECK_TIMEOUT_S)):
                self._client.admin.command("ping")
        except PyMongoError as exc:
            raise wrap_mongo_error(exc, doing="ping") from exc

    def close(self) -> None:
        client, self._client, self._collection = self._client, None, None
        if client is not None:
            client.close()


class MongoPump(MongoBasePump):
    """Upserts one document per record; see the module docstring."""

    Meta = MongoMeta

    @property
    def settings(self) -> MongoMeta:
        """The validated ``meta``."""
        assert isinstance(self.meta, MongoMeta)
        return self.meta

    def _prepare(self, database: Database[dict[str, Any]]) -> None:
        meta = self.settings
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
        self._create_index(collection, [("expireAt", pymongo.ASCENDING)], expireAfterSeconds=0)

    def _create_capped(self, database: Database[dict[str, Any]]) -> None:
        meta = self.settings
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
            if exc.code != 48:  # NamespaceExists: another worker made it first
                raise
            return
        logger.info(
            "pump %s: created capped collection %r (%d bytes)",
            self.name,
            name,
            meta.collection_cap_max_size_bytes,
        )

    def write(self, records: Sequence[AnalyticsRecord]) -> WriteResult | None:
        """Upsert the records by id; return those MongoDB refused one by one.

        Raises :class:`PumpTemporaryError` when a retry may help (the whole batch is then
        redelivered; the bulks written before the failure are upserts, so they are not doubled).
        """
        if not records:
            return None
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
            with pymongo.timeout(self.budget_s):
                for chunk in self._chunks(entries):
                    rejected += self._write_chunk(collection, chunk)
        except PyMongoError as exc:
            raise wrap_mongo_error(exc, doing=f"write to {collection.name!r}") from exc
        return WriteResult(rejected=rejected) if rejected else None

    def _prepared(self, record: AnalyticsRecord) -> tuple[dict[str, Any], int] | str:
        """The record's document and its size, trimmed if too large; or why it cannot be stored."""
        limit = self.settings.max_document_size_bytes
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
        limit = self.settings.max_insert_batch_size_bytes
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

    def _bulk_write(
        self, collection: Collection[dict[str, Any]], operations: list[UpdateOne]
    ) -> None:
        """Send one bulk (a seam: tests wrap it to see the bulks or inject server errors)."""
        collection.bulk_write(operations, ordered=False)

    def _refused(
        self, exc: BulkWriteError, records: list[AnalyticsRecord]
    ) -> list[tuple[AnalyticsRecord, str]]:
        details: dict[str, Any] = dict(exc.details or {})
        concern_errors = details.get("writeConcernErrors") or []
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
        if retryable or concern_errors:
            first = retryable[0] if retryable else f"write concern: {concern_errors[0]}"
            raise PumpTemporaryError(
                f"MongoDB bulk write: {len(retryable) + len(concern_errors)} retryable error(s), "
                f"first: {first}"
            )
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
