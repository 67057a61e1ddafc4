"""Wire formats: iam's msgpack records and the batches that travel through Celery.

Three byte formats exist, all msgpack:

* **Go record** - what iam-authz-server RPUSHes to ``analytics-iam-system-analytics``: a map keyed
  by the Go field names (:data:`app.record.GO_FIELD_NAMES`), ``ExpireAt`` as a msgpack timestamp
  (extension type -1).
* **Batch envelope** - one Celery ``ingest`` task's argument: ``{"id": str, "records": [row, ...]}``
  from the Python reporter, or ``{"id": str, "go": [bytes, ...]}`` from the Redis-list purge, where
  each item is one Go record exactly as it was read.
* **Clean batch** - what ``ingest`` hands to every pump's write task once it has validated the
  records: ``{"id": str, "records": [[position, *row], ...]}``. The position is the record's
  index in the envelope, so ``<batch id>-<position>`` names a record the same way on every
  redelivery.

A row is the record's values in :data:`app.record.RECORD_FIELDS` order: ``[timestamp, username,
effect, conclusion, request, policies, deciders, expire_at]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack

from app.record import (
    GO_FIELD_NAMES,
    GO_ZERO_TIME,
    RECORD_FIELDS,
    AnalyticsRecord,
    FieldKind,
    field_values,
    go_expiry,
)

_ROW_LENGTH = len(RECORD_FIELDS)
#: Where each kind of value sits in a row.
_INT_INDEXES = tuple(i for i, spec in enumerate(RECORD_FIELDS) if spec.kind is FieldKind.INT)
_STRING_INDEXES = tuple(i for i, spec in enumerate(RECORD_FIELDS) if spec.kind is FieldKind.STR)
_TIME_INDEXES = tuple(i for i, spec in enumerate(RECORD_FIELDS) if spec.kind is FieldKind.TIME)
#: The one time field is the expiry.
(_EXPIRE_AT_INDEX,) = _TIME_INDEXES


class MalformedRecordError(ValueError):
    """Raised when one record cannot be decoded or has the wrong shape (message: the reason)."""


class MalformedBatchError(ValueError):
    """Raised when a whole payload is not a batch envelope (not msgpack, wrong shape, no id)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record set aside while decoding: its position in the batch, its raw form and why."""

    position: int
    raw: bytes
    reason: str


def to_timestamp(value: datetime) -> msgpack.Timestamp:
    """A datetime as a msgpack timestamp; naive datetimes are taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return msgpack.Timestamp.from_datetime(value)


def encode_go_record(record: AnalyticsRecord) -> bytes:
    """One record as iam-authz-server writes it to Redis (byte-compatible with its msgpack)."""
    return encode_go_row(record_to_row(record))


def encode_go_row(row: Sequence[Any]) -> bytes:
    """A row as iam-authz-server's msgpack map; a time may be a datetime or a Timestamp."""
    values = list(row)
    for index in _TIME_INDEXES:
        if isinstance(values[index], datetime):
            values[index] = to_timestamp(values[index])
    return bytes(msgpack.packb(dict(zip(GO_FIELD_NAMES, values, strict=True))))


def decode_go_record(raw: bytes) -> list[Any]:
    """A Go record's bytes as a validated row; raises :class:`MalformedRecordError`."""
    try:
        value = msgpack.unpackb(raw, raw=False, timestamp=3, strict_map_key=True)
    except UnicodeDecodeError as exc:
        raise MalformedRecordError(_not_utf8(exc)) from exc
    except Exception as exc:
        raise MalformedRecordError(f"not msgpack: {exc}") from exc
    if not isinstance(value, dict):
        raise MalformedRecordError(f"expected a msgpack map, got {type(value).__name__}")
    missing = [name for name in GO_FIELD_NAMES if name not in value]
    if missing:
        raise MalformedRecordError(f"missing field(s) {', '.join(missing)}")
    return validate_row([value[name] for name in GO_FIELD_NAMES], names=GO_FIELD_NAMES)


def validate_row(row: Any, *, names: Sequence[str] = GO_FIELD_NAMES) -> list[Any]:
    """Check a row's shape and types; return it with its times as aware datetimes."""
    if not isinstance(row, list | tuple) or len(row) != _ROW_LENGTH:
        raise MalformedRecordError(f"expected a row of {_ROW_LENGTH} values, got {_shape(row)}")
    for index in _INT_INDEXES:
        value = row[index]
        if not isinstance(value, int) or isinstance(value, bool):
            raise MalformedRecordError(
                f"{names[index]} must be an integer, got {type(value).__name__}"
            )
    for index in _STRING_INDEXES:
        if not isinstance(row[index], str):
            raise MalformedRecordError(
                f"{names[index]} must be a string, got {type(row[index]).__name__}"
            )
    checked = list(row)
    for index in _TIME_INDEXES:
        checked[index] = _checked_time(checked[index], names[index])
    return checked


def _shape(value: Any) -> str:
    # What a value is, never what it holds: reasons are logged and kept, record content is not.
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def _not_utf8(exc: UnicodeError) -> str:
    # The position, not the offending bytes or character, which are record content.
    start = getattr(exc, "start", None)
    return "string is not valid UTF-8" + (
        f" (byte {start} of a string)" if isinstance(start, int) else ""
    )


def _checked_time(value: Any, name: str) -> datetime:
    # A Go producer sends nil for a time it never set; that is Go's zero time.
    if isinstance(value, msgpack.Timestamp):
        try:
            converted: datetime = value.to_datetime()
        except (OverflowError, ValueError) as exc:
            raise MalformedRecordError(f"{name} is outside a datetime's range") from exc
        return converted
    if value is None:
        return GO_ZERO_TIME
    if not isinstance(value, datetime):
        raise MalformedRecordError(
            f"{name} must be a msgpack timestamp, got {type(value).__name__}"
        )
    return value


def record_to_row(record: AnalyticsRecord) -> list[Any]:
    """The row form of a record (used by the reporter when it packs a batch)."""
    row = list(field_values(record))
    row[_EXPIRE_AT_INDEX] = to_timestamp(go_expiry(record))
    return row


def encode_envelope(batch_id: str, rows: Sequence[Sequence[Any]]) -> bytes:
    """A reporter batch: rows already in row form."""
    return bytes(msgpack.packb({"id": batch_id, "records": rows}, datetime=True))


def encode_go_envelope(batch_id: str, items: Sequence[bytes]) -> bytes:
    """A batch of Go records exactly as read from the Redis list."""
    return bytes(msgpack.packb({"id": batch_id, "go": list(items)}))


def decode_envelope(payload: bytes) -> tuple[str, list[list[Any]], list[Rejected]]:
    """Validate every record of an envelope; return its id, the good rows and the rejects.

    Each good row is prefixed with its position. A bad record never fails the batch; a payload
    that is not an envelope at all raises :class:`MalformedBatchError`.
    """
    envelope, utf8_checked = _unpack_envelope(payload)
    if not isinstance(envelope, dict) or not isinstance(envelope.get("id"), str):
        raise MalformedBatchError("batch is not a map with a string 'id'")
    batch_id: str = envelope["id"]
    if not utf8_checked and not _is_utf8(batch_id):
        raise MalformedBatchError("batch id is not valid UTF-8")
    good: list[list[Any]] = []
    rejected: list[Rejected] = []
    if "go" in envelope:
        items = envelope["go"]
        if not isinstance(items, list):
            raise MalformedBatchError("batch 'go' is not a list")
        for position, item in enumerate(items):
            try:
                if not isinstance(item, bytes):
                    raise MalformedRecordError("Go record is not bytes")
                good.append([position, *decode_go_record(item)])
            except MalformedRecordError as exc:
                raw = item if isinstance(item, bytes) else _repack(item)
                rejected.append(Rejected(position, raw, str(exc)))
        return batch_id, good, rejected
    rows = envelope.get("records")
    if not isinstance(rows, list):
        raise MalformedBatchError("batch has neither 'records' nor 'go' list")
    for position, row in enumerate(rows):
        try:
            if not utf8_checked:
                _check_strings(row)
            good.append([position, *validate_row(row)])
        except MalformedRecordError as exc:
            rejected.append(Rejected(position, _repack(row), str(exc)))
    return batch_id, good, rejected


def _unpack_envelope(payload: bytes) -> tuple[Any, bool]:
    # Nearly every batch is valid UTF-8 throughout, its times in datetime's range: decoded
    # strictly, its strings need no check one by one (True). Otherwise it is decoded leniently,
    # times kept as msgpack timestamps, and each record checked (False), so that one bad string
    # or time sets aside its record rather than the batch.
    try:
        return msgpack.unpackb(payload, raw=False, timestamp=3), True
    except Exception:
        pass
    try:
        lenient = msgpack.unpackb(payload, raw=False, timestamp=0, unicode_errors="surrogateescape")
    except Exception as exc:
        raise MalformedBatchError(f"batch is not msgpack: {exc}") from exc
    return lenient, False


def _is_utf8(text: str) -> bool:
    # A string decoded leniently holds surrogates where its bytes were not UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_strings(row: Any) -> None:
    # The envelope is decoded leniently so one bad string cannot sink the batch; a string that
    # needed escaping was not UTF-8 and its record is set aside.
    if isinstance(row, list):
        for value in row:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise MalformedRecordError(_not_utf8(exc)) from exc


def _repack(value: Any) -> bytes:
    try:
        return bytes(
            msgpack.packb(value, datetime=True, unicode_errors="surrogateescape", default=repr)
        )
    except Exception:
        return _shape(value).encode("utf-8")


def encode_clean_batch(batch_id: str, rows: Sequence[Sequence[Any]]) -> bytes:
    """The validated batch every pump receives (rows prefixed with their position)."""
    return bytes(msgpack.packb({"id": batch_id, "records": rows}, datetime=True))


def decode_clean_batch(payload: bytes) -> tuple[str, list[AnalyticsRecord]]:
    """The records of a clean batch, each with its stable id.

    Raises :class:`MalformedBatchError` if the payload is not a clean batch (not msgpack, not a
    map with a string ``id`` and a ``records`` list, a row of the wrong length or types).

    A row's values are in :data:`~app.record.RECORD_FIELDS` order, which is the order of
    :class:`~app.record.AnalyticsRecord`'s attributes (a test pins both), so a record is built
    by position. The row is unpacked into names rather than sliced: slicing each row costs a
    tenth more per batch, and this runs for every batch in every write task.
    """
    try:
        batch = msgpack.unpackb(payload, raw=False, timestamp=3)
    except Exception as exc:
        raise MalformedBatchError(f"clean batch is not msgpack: {exc}") from exc
    try:
        batch_id = batch["id"]
        records = [
            AnalyticsRecord(
                ts,
                user,
                effect,
                conclusion,
                request,
                policies,
                deciders,
                expire_at,
                f"{batch_id}-{position}",
            )
            for position, ts, user, effect, conclusion, request, policies, deciders, expire_at in (
                batch["records"]
            )
            # A row ingest did not write is left out, and the count below catches it.
            if type(position) is int
            and position >= 0
            and type(ts) is int
            and type(user) is str
            and type(effect) is str
            and type(conclusion) is str
            and type(request) is str
            and type(policies) is str
            and type(deciders) is str
            and (expire_at is None or type(expire_at) is datetime)
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedBatchError(f"not a clean batch: {exc!r:.120}") from exc
    if not isinstance(batch_id, str) or len(records) != len(batch["records"]):
        raise MalformedBatchError("not a clean batch: no string 'id', or a row of the wrong types")
    return batch_id, records


def records_to_clean_rows(records: Iterable[AnalyticsRecord]) -> list[list[Any]]:
    """Records (with ids of the form ``<batch>-<position>``) back into clean rows."""
    rows = []
    for record in records:
        position = int(record.id.rsplit("-", 1)[1])
        rows.append([position, *record_to_row(record)])
    return rows
