"""What the ``mongo`` and ``mongo-aggregate`` pumps share: connection ``meta`` (iam's keys), the
client, error classification, and :class:`MongoBasePump`, which owns one client and collection.

Every client timeout derives from the pump's ``timeout``, and every operation runs under
``pymongo.timeout`` with the budget of the deadline it was given, so a server that is down gives
a temporary error in time instead of pymongo's 30 s default (or iam's endless retry loop).
Network, server selection, "not primary", shutdown, timeouts and write concern errors are
temporary (retried; safe, as both pumps' writes are idempotent); refused credentials are
permanent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import pymongo
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import ConfigurationError, OperationFailure, PyMongoError
from pymongo.uri_parser import parse_uri

from app.config import mask_url
from pumps.base import Pump
from pumps.deadline import CHECK_TIMEOUT_S, Deadline
from pumps.errors import PumpError, PumpPermanentError, PumpTemporaryError

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_NAME = "iam_analytics"
DEFAULT_COLLECTION_NAME = "iam_analytics"

DUPLICATE_KEY_ERROR_CODE = 11000
NAMESPACE_EXISTS_ERROR_CODE = 48
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
    """The keys shared by the ``mongo`` and ``mongo-aggregate`` pumps (iam's names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mongo_url: str = Field(min_length=1)
    mongo_use_ssl: bool = False
    mongo_ssl_insecure_skip_verify: bool = False
    mongo_ssl_allow_invalid_hostnames: bool = False
    mongo_ssl_ca_file: str = ""
    mongo_ssl_pem_keyfile: str = ""
    mongo_db_type: MongoDBType = MongoDBType.STANDARD
    collection_name: str = DEFAULT_COLLECTION_NAME

    @field_validator("mongo_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _validate_mongo_url(value)

    @field_validator("collection_name")
    @classmethod
    def _collection(cls, value: str) -> str:
        return validate_collection_name(value)


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


def wrap_mongo_error(exc: PyMongoError, *, doing: str) -> PumpError:
    """The pump error for a driver error: permanent for refused credentials, else temporary.

    Unknown errors count as temporary: the write task retries them and, if they persist, keeps
    the batch as a dead letter anyway, whereas a permanent error would skip the retries.
    """
    message = f"MongoDB {doing} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, OperationFailure) and exc.code in AUTH_ERROR_CODES:
        return PumpPermanentError(message)
    return PumpTemporaryError(message)


def raise_if_retryable(retryable: Sequence[str], details: dict[str, Any], *, doing: str) -> None:
    """Raise :class:`PumpTemporaryError` if a bulk had retryable or write concern errors.

    ``retryable`` describes the retryable write errors; ``details`` is the bulk error's details.
    """
    concern_errors = details.get("writeConcernErrors") or []
    if retryable or concern_errors:
        first = retryable[0] if retryable else f"write concern: {concern_errors[0]}"
        raise PumpTemporaryError(
            f"MongoDB {doing}: {len(retryable) + len(concern_errors)} retryable error(s), "
            f"first: {first}"
        )


ConnectionMetaT = TypeVar("ConnectionMetaT", bound=MongoConnectionMeta)


class MongoBasePump(Pump[ConnectionMetaT]):
    """A pump that owns one MongoDB client and collection; subclasses prepare and write.

    :meth:`open` builds the client and runs :meth:`_prepare` (indexes, collection options) by
    its deadline; if that fails the client is closed and the error raised, so the next attempt
    opens afresh. :meth:`check` pings within :data:`CHECK_TIMEOUT_S`; :meth:`close` is idempotent.
    """

    upserts: ClassVar[bool] = True
    handles_record_size: ClassVar[bool] = True

    _client: MongoClient[dict[str, Any]] | None = None
    _collection: Collection[dict[str, Any]] | None = None

    def open(self, *, deadline: Deadline | None = None) -> None:
        if self._client is not None:
            return
        budget_s = self.open_deadline(deadline).operation_budget_s()
        client = mongo_client(self.meta, timeout_s=self.timeout_s)
        name = self.meta.collection_name
        try:
            database = client.get_default_database(default=DEFAULT_DATABASE_NAME)
            with pymongo.timeout(budget_s):
                self._prepare(database)
        except PyMongoError as exc:
            client.close()
            raise wrap_mongo_error(exc, doing=f"setup of {name!r}") from exc
        except BaseException:
            client.close()
            raise
        self._client = client
        self._collection = database[name]
        logger.info(
            "pump %s: MongoDB %s, database %r, collection %r",
            self.name,
            mask_url(self.meta.mongo_url),
            database.name,
            name,
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

    def _bulk_write(
        self, collection: Collection[dict[str, Any]], operations: list[UpdateOne]
    ) -> None:
        """Send one unordered bulk (a seam: tests wrap it to see bulks or inject server errors)."""
        collection.bulk_write(operations, ordered=False)

    def check(self) -> None:
        if self._client is None:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        try:
            with pymongo.timeout(CHECK_TIMEOUT_S):
                self._client.admin.command("ping")
        except PyMongoError as exc:
            raise wrap_mongo_error(exc, doing="ping") from exc

    def close(self) -> None:
        client, self._client, self._collection = self._client, None, None
        if client is not None:
            client.close()
