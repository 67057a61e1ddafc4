"""The analytics record: one per authorization request, with iam's fields.

:data:`RECORD_FIELDS` is the one description of those fields - their order, their name in iam's
Go struct (msgpack keys, CSV header) and in iam's JSON (MongoDB, Elasticsearch, stdout), their
kind - and everything that lays a record out (the codec's rows, the CSV columns, the stored
documents, the size estimate) is derived from it. :func:`expiry` is the one reading of "when may
a store forget this record", where Go's zero time means never.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from operator import attrgetter


class FieldKind(Enum):
    """What a record field holds."""

    INT = "int"
    STR = "str"
    TIME = "time"


@dataclass(frozen=True, slots=True)
class RecordField:
    """One field of the record as every format names it."""

    #: The :class:`AnalyticsRecord` attribute.
    attribute: str
    #: iam's Go struct field: the msgpack map key and the CSV header.
    go_name: str
    #: iam's JSON name: the key in MongoDB, Elasticsearch and stdout documents.
    json_name: str
    kind: FieldKind


#: The record's fields in iam's Go struct order, which is a public contract: it is the msgpack
#: map's order, the CSV column order and the codec's row layout. :class:`AnalyticsRecord`
#: declares its attributes in the same order (a test pins it), so a row builds a record by position.
RECORD_FIELDS: tuple[RecordField, ...] = (
    RecordField("timestamp", "TimeStamp", "timestamp", FieldKind.INT),
    RecordField("username", "Username", "username", FieldKind.STR),
    RecordField("effect", "Effect", "effect", FieldKind.STR),
    RecordField("conclusion", "Conclusion", "conclusion", FieldKind.STR),
    RecordField("request", "Request", "request", FieldKind.STR),
    RecordField("policies", "Policies", "policies", FieldKind.STR),
    RecordField("deciders", "Deciders", "deciders", FieldKind.STR),
    RecordField("expire_at", "ExpireAt", "expireAt", FieldKind.TIME),
)

#: Field names in iam's Go struct order; also the CSV header and the msgpack map keys.
GO_FIELD_NAMES: tuple[str, ...] = tuple(spec.go_name for spec in RECORD_FIELDS)
#: Field names in iam's JSON, in the same order: documents, messages, InfluxDB fields and tags.
JSON_NAMES: tuple[str, ...] = tuple(spec.json_name for spec in RECORD_FIELDS)
#: The string fields, in order.
STRING_FIELDS: tuple[RecordField, ...] = tuple(
    spec for spec in RECORD_FIELDS if spec.kind is FieldKind.STR
)
#: The one time field: when a store may forget the record (see :func:`expiry`).
(EXPIRY_FIELD,) = (spec for spec in RECORD_FIELDS if spec.kind is FieldKind.TIME)
#: The record's values in :data:`RECORD_FIELDS` order, as a tuple (one C call per record).
field_values = attrgetter(*(spec.attribute for spec in RECORD_FIELDS))
#: The record's string values in :data:`STRING_FIELDS` order, as a tuple.
string_values = attrgetter(*(spec.attribute for spec in STRING_FIELDS))

#: The Go zero time (0001-01-01 00:00:00 UTC), which a Go producer sends for an unset ExpireAt.
GO_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)
#: How far ahead iam-authz-server stamps ExpireAt when it asks for no expiry (100 years of 365
#: days): stores keep such a record, and a TTL index never reaches it.
NO_EXPIRY = timedelta(days=365 * 100)


@dataclass(slots=True)
class AnalyticsRecord:
    """One authorization decision, as iam-authz-server records it.

    ``timestamp`` is Unix seconds. ``expire_at`` tells stores that support it (MongoDB's TTL
    index) when to forget the record; the reporter fills it from ``record-expiration-time`` when
    it is left as ``None`` (by default 100 years ahead, as iam does). ``id`` is assigned by the
    pipeline (batch id and position) and is the same on every redelivery, so upserting sinks
    write each record once.
    """

    timestamp: int = field(default_factory=lambda: int(time.time()))
    username: str = ""
    effect: str = ""
    conclusion: str = ""
    request: str = ""
    policies: str = ""
    deciders: str = ""
    expire_at: datetime | None = None
    id: str = ""

    def to_dict(self) -> dict[str, object]:
        """The record as a plain dict with iam's JSON field names (``expireAt`` as a datetime)."""
        return {"id": self.id, **dict(zip(JSON_NAMES, field_values(self), strict=True))}


def expiry(record: AnalyticsRecord) -> datetime | None:
    """When a store may forget the record, as an aware datetime; None for never.

    Never is an unset ``expire_at`` or a Go zero time (any time in year 1: Go producers send
    the zero time for "unset", and a TTL index would delete such a record at once). A naive
    time is taken as UTC.
    """
    expire_at = record.expire_at
    if expire_at is None or expire_at.year <= 1:
        return None
    return expire_at if expire_at.tzinfo is not None else expire_at.replace(tzinfo=UTC)


def go_expiry(record: AnalyticsRecord) -> datetime:
    """:func:`expiry` as Go formats carry it (msgpack, CSV): never is the Go zero time."""
    expire_at = expiry(record)
    return GO_ZERO_TIME if expire_at is None else expire_at


@functools.lru_cache(maxsize=4096)  # a batch's records mostly share their expiry
def go_time_text(moment: datetime) -> str:
    """A time as Go's ``encoding/json`` writes a ``time.Time`` in UTC: RFC 3339, ``Z``, a
    fraction only when there is one, without its trailing zeros."""
    moment = moment.astimezone(UTC)
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"


def expire_at_after(seconds: float, now: datetime | None = None) -> datetime:
    """The ``expire_at`` of a record that may be forgotten ``seconds`` after ``now``.

    ``seconds`` of 0 (or less) means no expiry, which iam stamps as 100 years ahead.
    """
    start = now if now is not None else datetime.now(UTC)
    return start + (timedelta(seconds=seconds) if seconds > 0 else NO_EXPIRY)
