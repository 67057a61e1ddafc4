"""Elasticsearch: one document per record, indexed in bulk under the record id.

``meta`` takes iam's keys (so an iam-pump.yaml works) and adds TLS, bulk size and retries; see
:mod:`pumps.elasticsearch_meta`.

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

from elastic_transport import TransportError
from elasticsearch import ApiError, Elasticsearch

from app.config import mask_url
from app.record import EXPIRY_FIELD, STRING_FIELDS, AnalyticsRecord, expiry, string_values
from pumps.base import Pump, WriteResult
from pumps.deadline import CHECK_TIMEOUT_S, Deadline
from pumps.elasticsearch_meta import ElasticsearchMeta
from pumps.errors import PumpPermanentError, PumpTemporaryError

logger = logging.getLogger(__name__)

#: Backoff before the first resend of refused documents; doubled each time, with jitter.
ITEM_RETRY_BACKOFF_BASE_S = 0.2
ITEM_RETRY_BACKOFF_MAX_S = 2.0
#: Daily index names remembered (one per day seen), so odd timestamps cannot grow it unbounded.
MAX_CACHED_INDEX_NAMES = 1000
#: Above Elasticsearch's built-in templates (100), so ours wins for our indices.
TEMPLATE_PRIORITY = 200
#: JSON framing and field names of one document and its action line, for the byte estimate.
_DOCUMENT_OVERHEAD_BYTES = 300

#: Per-item statuses worth sending again: too many requests, and server-side failures.
RETRYABLE_ITEM_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Whole-request statuses worth retrying later.
RETRYABLE_REQUEST_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REQUEST_TOO_LARGE_STATUS = 413

#: Where the record's time goes: Elasticsearch's conventional name, not iam's ``timestamp``.
TIMESTAMP_FIELD_NAME = "@timestamp"
#: String fields matched as whole values (and aggregated on); the others are full text.
KEYWORD_FIELD_NAMES = frozenset({"username", "effect"})
#: The document's string fields (iam's JSON names), in schema order.
_STRING_NAMES = tuple(spec.json_name for spec in STRING_FIELDS)

#: The mappings the index template installs.
MAPPINGS: dict[str, Any] = {
    "properties": {
        TIMESTAMP_FIELD_NAME: {"type": "date"},
        **{
            name: {"type": "keyword" if name in KEYWORD_FIELD_NAMES else "text"}
            for name in _STRING_NAMES
        },
        EXPIRY_FIELD.json_name: {"type": "date"},
    }
}


def record_document(record: AnalyticsRecord) -> dict[str, Any]:
    """The indexed form of a record: iam's field names, times as ISO 8601 strings in UTC.

    ``expireAt`` is left out for a record that never expires (it would read as year 1).
    Raises ValueError (or OverflowError, OSError) when the timestamp is not a usable time.
    """
    document: dict[str, Any] = {
        TIMESTAMP_FIELD_NAME: datetime.fromtimestamp(record.timestamp, UTC).isoformat(),
        **dict(zip(_STRING_NAMES, string_values(record), strict=True)),
    }
    expire_at = expiry(record)
    if expire_at is not None:
        document[EXPIRY_FIELD.json_name] = expire_at.astimezone(UTC).isoformat()
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


class ElasticsearchPump(Pump[ElasticsearchMeta]):
    """Indexes records in bulk under their ids; see the module docstring."""

    Meta = ElasticsearchMeta
    upserts: ClassVar[bool] = True

    _client: Elasticsearch | None = None

    def __init__(self, name: str, meta: ElasticsearchMeta, *, timeout_s: float) -> None:
        super().__init__(name, meta, timeout_s=timeout_s)
        self._index_by_day: dict[int, str] = {}

    def open(self, *, deadline: Deadline | None = None) -> None:
        if self._client is not None:
            return
        budget_s = self.open_deadline(deadline).operation_budget_s()
        meta = self.meta
        if meta.ignored_keys:
            logger.warning(
                "pump %s: meta key(s) %s are iam's and mean nothing here; ignored",
                self.name,
                ", ".join(meta.ignored_keys),
            )
        client = self._make_client()
        try:
            self._install_template(client, budget_s=budget_s)
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
        meta = self.meta
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

    def _install_template(self, client: Elasticsearch, *, budget_s: float) -> None:
        index_name = self.meta.index_name
        try:
            client.options(request_timeout=budget_s).indices.put_index_template(
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
            self._client.options(request_timeout=CHECK_TIMEOUT_S).info()
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

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Index the records under their ids by ``deadline``; return those refused for good.

        Raises :class:`PumpTemporaryError` when the cluster cannot be reached or keeps refusing
        documents with 429/5xx; the batch is then redelivered whole, which is idempotent since
        each document's ``_id`` is its record id.
        """
        if not records:
            return WriteResult()
        client = self._client
        if client is None:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        # All requests and resends of this write share one budget, fixed now.
        budget = Deadline.after(deadline.operation_budget_s())
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
            rejected += self._write_chunk(client, chunk, budget)
        return WriteResult(rejected=rejected)

    def _index_for(self, timestamp: int) -> str:
        meta = self.meta
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
        meta = self.meta
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
        self, client: Elasticsearch, chunk: list[_Entry], budget: Deadline
    ) -> list[tuple[AnalyticsRecord, str]]:
        """Send one chunk, resending 429/5xx documents; return the documents refused for good."""
        rejected: list[tuple[AnalyticsRecord, str]] = []
        pending = chunk
        attempt = 0
        while True:
            items = self._send(client, pending, budget)
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
            if attempt > self.meta.bulk_item_retries or pause_s >= budget.remaining_s():
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

    def _send(self, client: Elasticsearch, entries: list[_Entry], budget: Deadline) -> list[Any]:
        """One bulk request's items, in order; a request too large is split in halves."""
        remaining_s = budget.remaining_s()
        if remaining_s <= 0:
            raise PumpTemporaryError("Elasticsearch write ran out of its time budget")
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
            return self._send(client, entries[:half], budget) + self._send(
                client, entries[half:], budget
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
