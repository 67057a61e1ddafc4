"""Elasticsearch: one document per record, indexed in bulk under the record id.

``meta`` takes iam's keys (so an iam-pump.yaml works) and adds TLS, bulk size and retries::

    elasticsearch_url       one URL, a comma-separated list, or a YAML list (default
                            http://localhost:9200); credentials in a URL are used
    index_name              default ``iam_analytics``
    rolling_index           write to ``<index_name>-YYYY.MM.DD``, the day of the record (UTC)
    auth_basic_username, auth_basic_password        basic authentication
    auth_api_key_id, auth_api_key                   API key (id and key, or the encoded key alone)
    ssl_ca_file, ssl_cert_file, ssl_key_file        CA bundle and client certificate (PEM)
    ssl_insecure_skip_verify                        accept any certificate
    use_sniffing            discover the cluster's nodes at start and when one fails
    bulk_size               records per bulk request; default 1000
    bulk_item_retries       how often documents refused with 429/5xx are sent again within one
                            write; default 3
    bulk_config             iam's block: ``bulk_actions`` (records per request, if ``bulk_size`` is
                            not given) and ``bulk_size`` (bytes per request, estimated) are used;
                            ``workers`` and ``flush_interval`` belong to iam's background bulk
                            processor, which this pump does not need: ignored with a warning
    document_type, disable_bulk   iam keys without meaning here (Elasticsearch 8 has no mapping
                            types; writes are always bulk); accepted, ignored with a warning

Where iam loses or duplicates data, this pump does not:

* ``_id`` is the record id, so a redelivered batch overwrites its documents instead of adding
  copies (tyk-pump #170). A rolling index is chosen by the record's own time, not the clock, so a
  batch redelivered after midnight lands in the same index too.
* An index template with explicit mappings (``@timestamp`` and ``expireAt`` dates, ``username``
  and ``effect`` keywords) is installed in :meth:`open`. Its patterns are ``<index_name>`` and
  ``<index_name>-*``, exactly the indices this pump writes; ``<index_name>*`` would also claim
  unrelated indices that merely share the prefix (``iam_analytics_archive``).
* Writes are synchronous bulk requests whose response is read item by item: a document refused
  with 429 or 5xx is sent again (a bounded number of times, with a short backoff), one refused for
  any other reason (a mapping error) is returned with the reason and becomes a dead letter, and
  the rest of the batch is committed. If documents are still refused with 429/5xx when the
  retries or the time budget run out, :class:`~pumps.errors.PumpTemporaryError` is raised and the
  whole batch is redelivered later; that is safe because every document is indexed under its
  record id. A request too large for the server (413) is split in halves.
* Every request is bounded by the pump's ``timeout``; a cluster that is down gives a temporary
  error at once, not iam's endless reconnect loop.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import urlsplit

from elastic_transport import TransportError
from elasticsearch import ApiError, Elasticsearch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.config import mask_url
from app.record import AnalyticsRecord
from pumps.base import Pump, WriteResult
from pumps.errors import PumpPermanentError, PumpTemporaryError

logger = logging.getLogger(__name__)

DEFAULT_ELASTICSEARCH_URL = "http://localhost:9200"
DEFAULT_INDEX_NAME = "iam_analytics"
DEFAULT_BULK_SIZE_RECORDS = 1000
MAX_BULK_SIZE_RECORDS = 100_000
DEFAULT_BULK_ITEM_RETRIES = 3
MAX_BULK_ITEM_RETRIES = 10
#: Backoff before the first resend of refused documents; doubled each time, with jitter.
ITEM_RETRY_BACKOFF_BASE_S = 0.2
ITEM_RETRY_BACKOFF_MAX_S = 2.0
#: The health check's own deadline, however long the pump's timeout is.
CHECK_TIMEOUT_S = 2.0
#: A write ends this long before the pump's timeout, so the pump's own error (naming the cause)
#: arrives before the write task's soft time limit.
TIMEOUT_MARGIN_S = 1.0
MIN_OPERATION_BUDGET_S = 0.5
#: Daily index names remembered (one per day seen), so odd timestamps cannot grow it unbounded.
MAX_CACHED_INDEX_NAMES = 1000
#: Above Elasticsearch's built-in templates (100), so ours wins for our indices.
TEMPLATE_PRIORITY = 200
#: JSON framing and field names of one document and its action line, for the byte estimate.
_DOCUMENT_OVERHEAD_BYTES = 300
_MAX_INDEX_NAME_BYTES = 255
_ROLLING_SUFFIX_BYTES = len("-YYYY.MM.DD")
_INDEX_NAME_FORBIDDEN = set('\\/*?"<>| ,#:')

#: Per-item statuses worth sending again: too many requests, and server-side failures.
RETRYABLE_ITEM_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Whole-request statuses worth retrying later.
RETRYABLE_REQUEST_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REQUEST_TOO_LARGE_STATUS = 413

#: The mappings the index template installs.
MAPPINGS: dict[str, Any] = {
    "properties": {
        "@timestamp": {"type": "date"},
        "username": {"type": "keyword"},
        "effect": {"type": "keyword"},
        "conclusion": {"type": "text"},
        "request": {"type": "text"},
        "policies": {"type": "text"},
        "deciders": {"type": "text"},
        "expireAt": {"type": "date"},
    }
}


class IamBulkConfig(BaseModel):
    """iam's ``bulk_config`` block; see the module docstring for what is used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(default=0, ge=0)
    flush_interval: int = Field(default=0, ge=0)
    bulk_actions: int = Field(default=0, ge=0, le=MAX_BULK_SIZE_RECORDS)
    bulk_size: int = Field(default=0, ge=0)


def validate_index_name(value: str) -> str:
    """Check an index name against Elasticsearch's rules; raise ValueError naming the rule."""
    if not value or value in {".", ".."}:
        raise ValueError("an index name may not be empty, '.' or '..'")
    if value != value.lower():
        raise ValueError("an index name must be lowercase")
    if value[0] in "-_+":
        raise ValueError("an index name may not start with '-', '_' or '+'")
    bad = sorted(_INDEX_NAME_FORBIDDEN.intersection(value))
    if bad:
        raise ValueError(f"an index name may not contain {' '.join(repr(c) for c in bad)}")
    if len(value.encode("utf-8")) + _ROLLING_SUFFIX_BYTES > _MAX_INDEX_NAME_BYTES:
        raise ValueError(f"an index name is at most {_MAX_INDEX_NAME_BYTES} bytes with its suffix")
    return value


class ElasticsearchMeta(BaseModel):
    """``meta`` of the elasticsearch pump."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    elasticsearch_url: tuple[str, ...] = (DEFAULT_ELASTICSEARCH_URL,)
    index_name: str = DEFAULT_INDEX_NAME
    rolling_index: bool = False
    auth_basic_username: str = ""
    auth_basic_password: str = ""
    auth_api_key_id: str = ""
    auth_api_key: str = ""
    ssl_ca_file: str = ""
    ssl_cert_file: str = ""
    ssl_key_file: str = ""
    ssl_insecure_skip_verify: bool = False
    use_sniffing: bool = False
    bulk_size: int = Field(default=DEFAULT_BULK_SIZE_RECORDS, ge=1, le=MAX_BULK_SIZE_RECORDS)
    bulk_item_retries: int = Field(
        default=DEFAULT_BULK_ITEM_RETRIES, ge=0, le=MAX_BULK_ITEM_RETRIES
    )
    bulk_config: IamBulkConfig = IamBulkConfig()
    document_type: str = ""
    disable_bulk: bool = False

    @field_validator("elasticsearch_url", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("elasticsearch_url")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one URL is needed")
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(f"expected http(s)://host[:port], got {mask_url(url)!r}")
        return tuple(dict.fromkeys(value))

    @field_validator("index_name")
    @classmethod
    def _index(cls, value: str) -> str:
        return validate_index_name(value)

    @model_validator(mode="after")
    def _auth(self) -> ElasticsearchMeta:
        if bool(self.auth_basic_username) != bool(self.auth_basic_password):
            raise ValueError("auth_basic_username and auth_basic_password go together")
        if self.auth_api_key_id and not self.auth_api_key:
            raise ValueError("auth_api_key_id needs auth_api_key")
        if self.auth_basic_username and self.auth_api_key:
            raise ValueError("use basic authentication or an API key, not both")
        if self.ssl_key_file and not self.ssl_cert_file:
            raise ValueError("ssl_key_file needs ssl_cert_file")
        return self

    @property
    def records_per_request(self) -> int:
        """``bulk_size``, or iam's ``bulk_config.bulk_actions`` when only that is given."""
        if "bulk_size" not in self.model_fields_set and self.bulk_config.bulk_actions:
            return self.bulk_config.bulk_actions
        return self.bulk_size

    @property
    def ignored_keys(self) -> list[str]:
        """iam keys that were given but mean nothing here."""
        ignored: list[str] = [
            key for key in ("document_type", "disable_bulk") if key in self.model_fields_set
        ]
        ignored += [
            f"bulk_config.{key}"
            for key in ("workers", "flush_interval")
            if key in self.bulk_config.model_fields_set
        ]
        return ignored


def iso_time(value: datetime) -> str:
    """A datetime as ISO 8601 in UTC (naive values are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def record_document(record: AnalyticsRecord) -> dict[str, Any]:
    """The indexed form of a record: iam's field names, times as ISO 8601 strings.

    Raises ValueError (or OverflowError, OSError) when the timestamp is not a usable time.
    """
    document: dict[str, Any] = {
        "@timestamp": datetime.fromtimestamp(record.timestamp, UTC).isoformat(),
        "username": record.username,
        "effect": record.effect,
        "conclusion": record.conclusion,
        "request": record.request,
        "policies": record.policies,
        "deciders": record.deciders,
    }
    # A Go zero time means "never"; it would read as year 1 in a date field.
    if record.expire_at is not None and record.expire_at.year > 1:
        document["expireAt"] = iso_time(record.expire_at)
    return document


def estimated_bytes(document: dict[str, Any]) -> int:
    """A cheap estimate of a document's size in a bulk body (strings plus a fixed overhead)."""
    return _DOCUMENT_OVERHEAD_BYTES + sum(
        len(value) for value in document.values() if isinstance(value, str)
    )


@dataclass(slots=True)
class _Entry:
    record: AnalyticsRecord
    action: dict[str, Any]
    document: dict[str, Any]
    size_bytes: int


class ElasticsearchPump(Pump):
    """Indexes records in bulk under their ids; see the module docstring."""

    Meta = ElasticsearchMeta
    upserts: ClassVar[bool] = True

    _client: Elasticsearch | None = None

    def __init__(self, name: str, meta: BaseModel, *, timeout_s: float) -> None:
        super().__init__(name, meta, timeout_s=timeout_s)
        self._index_by_day: dict[int, str] = {}

    @property
    def settings(self) -> ElasticsearchMeta:
        """The validated ``meta``."""
        assert isinstance(self.meta, ElasticsearchMeta)
        return self.meta

    @property
    def budget_s(self) -> float:
        """How long one write (all its requests and resends) may take."""
        return max(MIN_OPERATION_BUDGET_S, self.timeout_s - TIMEOUT_MARGIN_S)

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        if self._client is not None:
            return
        meta = self.settings
        if meta.ignored_keys:
            logger.warning(
                "pump %s: meta key(s) %s are iam's and mean nothing here; ignored",
                self.name,
                ", ".join(meta.ignored_keys),
            )
        client = self._make_client()
        try:
            self._install_template(client)
        except BaseException:
            client.close()
            raise
        self._client = client
        logger.info(
            "pump %s: Elasticsearch %s, index %s%s",
            self.name,
            ", ".join(mask_url(url) for url in meta.elasticsearch_url),
            meta.index_name,
            "-YYYY.MM.DD" if meta.rolling_index else "",
        )

    def _make_client(self) -> Elasticsearch:
        meta = self.settings
        options: dict[str, Any] = {"request_timeout": self.timeout_s}
        if meta.auth_basic_username:
            options["basic_auth"] = (meta.auth_basic_username, meta.auth_basic_password)
        if meta.auth_api_key:
            options["api_key"] = (
                (meta.auth_api_key_id, meta.auth_api_key)
                if meta.auth_api_key_id
                else meta.auth_api_key
            )
        if meta.ssl_ca_file:
            options["ca_certs"] = meta.ssl_ca_file
        if meta.ssl_cert_file:
            options["client_cert"] = meta.ssl_cert_file
        if meta.ssl_key_file:
            options["client_key"] = meta.ssl_key_file
        if meta.ssl_insecure_skip_verify:
            logger.warning("pump %s: TLS certificates are not verified", self.name)
            options["verify_certs"] = False
            options["ssl_show_warn"] = False
        if meta.use_sniffing:
            options["sniff_on_start"] = True
            options["sniff_on_node_failure"] = True
        try:
            return Elasticsearch(list(meta.elasticsearch_url), **options)
        except TransportError as exc:
            raise PumpTemporaryError(f"Elasticsearch is unreachable: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise PumpPermanentError(f"cannot build the Elasticsearch client: {exc}") from exc

    def _install_template(self, client: Elasticsearch) -> None:
        index_name = self.settings.index_name
        try:
            client.options(request_timeout=self.budget_s).indices.put_index_template(
                name=index_name,
                index_patterns=[index_name, f"{index_name}-*"],
                template={"mappings": MAPPINGS},
                priority=TEMPLATE_PRIORITY,
            )
        except ApiError as exc:
            status = exc.meta.status
            if status == 403:
                # Writing may still be allowed; the indices then get dynamic mappings.
                logger.warning(
                    "pump %s: not allowed to install index template %r (%s); indices will get "
                    "dynamic mappings",
                    self.name,
                    index_name,
                    exc,
                )
                return
            raise self._wrap_api_error(exc, doing=f"index template {index_name!r}") from exc
        except TransportError as exc:
            raise PumpTemporaryError(f"Elasticsearch is unreachable: {exc}") from exc

    def check(self) -> None:
        if self._client is None:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        try:
            self._client.options(request_timeout=min(self.budget_s, CHECK_TIMEOUT_S)).info()
        except ApiError as exc:
            if exc.meta.status == 403:
                return  # it answered; these credentials just may not read cluster info
            raise self._wrap_api_error(exc, doing="info") from exc
        except TransportError as exc:
            raise PumpTemporaryError(f"Elasticsearch is unreachable: {exc}") from exc

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- writing ---------------------------------------------------------------------------

    def write(self, records: Sequence[AnalyticsRecord]) -> WriteResult | None:
        """Index the records under their ids; return those Elasticsearch refused for good.

        Raises :class:`PumpTemporaryError` when the cluster cannot be reached or keeps refusing
        documents with 429/5xx; the batch is then redelivered whole, which is idempotent since
        each document's ``_id`` is its record id.
        """
        if not records:
            return None
        client = self._client
        if client is None:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        deadline = time.monotonic() + self.budget_s
        rejected: list[tuple[AnalyticsRecord, str]] = []
        entries = []
        for record in records:
            if not record.id:
                rejected.append((record, "record has no id, so it cannot be indexed once"))
                continue
            try:
                document = record_document(record)
                index = self._index_for(record.timestamp)
            except (OverflowError, OSError, ValueError):
                rejected.append((record, f"timestamp {record.timestamp} is not a usable time"))
                continue
            entries.append(
                _Entry(
                    record,
                    {"index": {"_index": index, "_id": record.id}},
                    document,
                    estimated_bytes(document),
                )
            )
        for chunk in self._chunks(entries):
            rejected += self._write_chunk(client, chunk, deadline)
        return WriteResult(rejected=rejected) if rejected else None

    def _index_for(self, timestamp: int) -> str:
        meta = self.settings
        if not meta.rolling_index:
            return meta.index_name
        day = timestamp // 86_400
        index = self._index_by_day.get(day)
        if index is None:
            index = f"{meta.index_name}-{datetime.fromtimestamp(day * 86_400, UTC):%Y.%m.%d}"
            if len(self._index_by_day) >= MAX_CACHED_INDEX_NAMES:
                self._index_by_day.clear()
            self._index_by_day[day] = index
        return index

    def _chunks(self, entries: list[_Entry]) -> Iterator[list[_Entry]]:
        """Runs of at most ``records_per_request`` entries (and iam's byte limit, if set)."""
        meta = self.settings
        max_records = meta.records_per_request
        max_bytes = meta.bulk_config.bulk_size or None
        chunk: list[_Entry] = []
        chunk_bytes = 0
        for entry in entries:
            if chunk and (
                len(chunk) >= max_records
                or (max_bytes is not None and chunk_bytes + entry.size_bytes > max_bytes)
            ):
                yield chunk
                chunk, chunk_bytes = [], 0
            chunk.append(entry)
            chunk_bytes += entry.size_bytes
        if chunk:
            yield chunk

    def _write_chunk(
        self, client: Elasticsearch, chunk: list[_Entry], deadline: float
    ) -> list[tuple[AnalyticsRecord, str]]:
        """Send one chunk, resending 429/5xx documents; return the documents refused for good."""
        rejected: list[tuple[AnalyticsRecord, str]] = []
        pending = chunk
        attempt = 0
        while True:
            items = self._send(client, pending, deadline)
            again: list[_Entry] = []
            last_reason = ""
            for entry, item in zip(pending, items, strict=True):
                status, reason = _item_outcome(item)
                if 200 <= status < 300:
                    continue
                if status in RETRYABLE_ITEM_STATUSES or status == 0:
                    # 0: an item we cannot read; sending it again is harmless (same _id).
                    again.append(entry)
                    last_reason = reason
                else:
                    rejected.append((entry.record, reason))
            if not again:
                return rejected
            attempt += 1
            pause_s = random.uniform(0.5, 1.0) * min(
                ITEM_RETRY_BACKOFF_MAX_S, ITEM_RETRY_BACKOFF_BASE_S * 2 ** (attempt - 1)
            )
            if attempt > self.settings.bulk_item_retries or time.monotonic() + pause_s >= deadline:
                raise PumpTemporaryError(
                    f"Elasticsearch still refuses {len(again)} document(s) after {attempt} "
                    f"attempt(s), last: {last_reason}; the batch will be sent again (safe: "
                    "documents are indexed under their record ids)"
                )
            logger.info(
                "pump %s: %d document(s) refused for now (%s); sending them again in %.2fs",
                self.name,
                len(again),
                last_reason,
                pause_s,
            )
            time.sleep(pause_s)
            pending = again

    def _send(self, client: Elasticsearch, entries: list[_Entry], deadline: float) -> list[Any]:
        """One bulk request's items, in order; a request too large is split in halves."""
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise PumpTemporaryError(f"Elasticsearch write took longer than {self.budget_s:.1f}s")
        operations: list[dict[str, Any]] = []
        for entry in entries:
            operations += (entry.action, entry.document)
        try:
            items = self._send_bulk(client.options(request_timeout=remaining_s), operations)
        except ApiError as exc:
            if exc.meta.status != REQUEST_TOO_LARGE_STATUS:
                raise self._wrap_api_error(exc, doing="bulk request") from exc
            if len(entries) == 1:
                return [
                    {
                        "index": {
                            "status": REQUEST_TOO_LARGE_STATUS,
                            "error": {
                                "type": "request_too_large",
                                "reason": f"the document alone is over the server's request "
                                f"size limit (about {entries[0].size_bytes} bytes)",
                            },
                        }
                    }
                ]
            half = len(entries) // 2
            return self._send(client, entries[:half], deadline) + self._send(
                client, entries[half:], deadline
            )
        except TransportError as exc:
            raise PumpTemporaryError(f"Elasticsearch is unreachable: {exc}") from exc
        if len(items) != len(entries):
            raise PumpTemporaryError(
                f"Elasticsearch answered {len(items)} items for {len(entries)} documents"
            )
        return items

    def _send_bulk(self, client: Elasticsearch, operations: list[dict[str, Any]]) -> list[Any]:
        """Send one bulk request and return its items (a seam: tests wrap it to inject 429s)."""
        response = client.bulk(operations=operations, refresh=False)
        items: list[Any] = response.body.get("items") or []
        return items

    @staticmethod
    def _wrap_api_error(exc: ApiError, *, doing: str) -> PumpTemporaryError | PumpPermanentError:
        status = exc.meta.status
        message = f"Elasticsearch {doing} failed ({status}): {exc}"
        if status in RETRYABLE_REQUEST_STATUSES:
            return PumpTemporaryError(message)
        return PumpPermanentError(message)


def _item_outcome(item: Any) -> tuple[int, str]:
    """The status of one bulk response item, and the reason when it failed."""
    result: Any = next(iter(item.values()), {}) if isinstance(item, dict) and item else {}
    status = int(result.get("status", 0)) if isinstance(result, dict) else 0
    if 200 <= status < 300:
        return status, ""
    error = result.get("error") if isinstance(result, dict) else None
    if isinstance(error, dict):
        reason = f"{error.get('type', 'error')}: {error.get('reason', '')}"
    else:
        reason = str(error or "no reason given")
    return status, f"Elasticsearch refused the document ({status} {reason})"
