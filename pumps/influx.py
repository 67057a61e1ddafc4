"""InfluxDB 1.x: one point per record in measurement ``analytics``, through the ``influxdb`` client.

``meta`` takes iam's keys (:mod:`pumps.influx_meta`): which record attributes are fields and
which are tags, as iam maps them. Where iam loses or duplicates data, this pump does not:

* **A point's time comes from the record, not the clock.** iam stamps every point with the write
  time, so a redelivered batch adds new points. Here a point's time is the record's second plus
  a nanosecond offset derived from its id (:func:`time_offset_ns`), and its tags come from the
  record, so a redelivered batch rewrites the same points (InfluxDB keeps one point per series
  and time) and two records of the same second and tags are two points.
* **Offsets within a batch never collide.** An id is ``<batch id>-<position>``; the offset is
  the batch's hash plus the position, mod 10^9, so the records of one batch get distinct
  offsets, and so do the records purged from iam's list in one epoch (see
  :func:`time_offset_ns`). Records of two reporter batches land on the same nanosecond with
  probability 10^-9 per pair; only when they also share their second and every tag value do
  they make one point (the later write's fields replace the earlier's: one record is lost). The
  README gives the numbers.
* **The database is created at open** (``CREATE DATABASE`` does nothing when it exists); iam
  writes to a database someone else made, and every write fails until then. A user without the
  right to create it gets a warning and the writes go on.
* **Errors are not swallowed.** iam ignores the write's result. Here a server that is down or
  answers 5xx gives :class:`~pumps.errors.PumpTemporaryError` (the batch is retried: rewriting
  the same points is harmless), refused credentials a permanent one. A request InfluxDB refuses
  with 400 (a field type conflict, an unparsable point) is split in halves until the refused
  records are found, each returned with InfluxDB's reason; the rest is written. When InfluxDB
  says it dropped every point of a request, they are all refused at once, without halving.

The line protocol is written here rather than by the client's ``make_lines``: that one escapes a
newline in a string field as the two characters ``\\n``, which InfluxDB 1.x stores as they are,
so a pretty-printed request would come back altered. The client sends the lines, owns the HTTP
session, authentication and error types.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import requests
from influxdb import InfluxDBClient
from influxdb.exceptions import InfluxDBClientError, InfluxDBServerError

from app.config import mask_url
from app.record import AnalyticsRecord, go_expiry, go_time_text
from pumps.base import NO_ID_REASON, Pump, WriteResult
from pumps.deadline import CHECK_TIMEOUT_S, Deadline
from pumps.errors import PumpPermanentError, PumpTemporaryError
from pumps.influx_meta import InfluxMeta

logger = logging.getLogger(__name__)

#: iam's measurement name.
MEASUREMENT = "analytics"
#: The field holding the record id, on every point.
ID_FIELD = "id"
NANOSECONDS_PER_SECOND = 1_000_000_000
#: The times InfluxDB 1.x can store (models.MinNanoTime, models.MaxNanoTime).
MIN_TIME_NS = -9_223_372_036_854_775_806
MAX_TIME_NS = 9_223_372_036_854_775_806
#: InfluxDB refuses a series key (measurement and tags) longer than this.
MAX_SERIES_KEY_BYTES = 65_535
#: Lines per request are cut at this many characters (at most 16 MiB of UTF-8), under InfluxDB's
#: default ``max-body-size`` (25 MB); a request refused as too large (413) is split anyway.
MAX_REQUEST_CHARACTERS = 4 * 1024 * 1024
#: A count in an id longer than this is not one the pipeline made: it is hashed with the rest.
_MAX_COUNT_DIGITS = 15


#: InfluxDB statuses: the request as a whole was refused (bad points), or too large.
BAD_REQUEST_STATUS = 400
REQUEST_TOO_LARGE_STATUS = 413
AUTH_STATUSES = frozenset({401, 403})
#: How InfluxDB's answer to a partial write counts the points it dropped.
_DROPPED = re.compile(r"\bdropped=(\d+)")


@functools.lru_cache(maxsize=4096)  # a batch's records share their prefix
def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def time_offset_ns(record_id: str) -> int:
    """The nanoseconds a record's point lies after the start of its second, from its id alone.

    An id ends in one or two counts (``<batch id>-<position>``, and a batch purged from iam's
    list is itself ``<epoch>-<records removed before it>``): the hash of what precedes them plus
    the counts, mod 10^9. So the records of one batch never share an offset, nor do the records
    purged in one epoch. Any other id: its hash. The same on every machine and every run.
    """
    prefix, counted = record_id, 0
    for _ in range(2):
        head, dash, tail = prefix.rpartition("-")
        if not (dash and tail.isascii() and tail.isdigit() and len(tail) <= _MAX_COUNT_DIGITS):
            break
        prefix, counted = head, counted + int(tail)
    return (_hash(prefix) + counted) % NANOSECONDS_PER_SECOND


def _string_field(value: str) -> str:
    """A string field's value: InfluxDB 1.x unescapes ``\\\\`` and ``\\"`` in it, nothing else
    (a newline is kept as it is)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tag_value(value: str) -> str:
    """A tag value: comma, space and ``=`` are escaped. Line protocol cannot carry a line break,
    nor every backslash, in a tag value: a line break becomes a space and a backslash ``/``."""
    return (
        value.replace("\\", "/")
        .replace(",", "\\,")
        .replace(" ", "\\ ")
        .replace("=", "\\=")
        .replace("\n", "\\ ")
        .replace("\r", "\\ ")
    )


#: How each attribute is written as a field (a line-protocol value) and as a tag (raw text).
_FIELD_VALUES: dict[str, Callable[[AnalyticsRecord], str]] = {
    "timestamp": lambda record: f"{record.timestamp}i",
    "username": lambda record: _string_field(record.username),
    "effect": lambda record: _string_field(record.effect),
    "conclusion": lambda record: _string_field(record.conclusion),
    "request": lambda record: _string_field(record.request),
    "policies": lambda record: _string_field(record.policies),
    "deciders": lambda record: _string_field(record.deciders),
    "expireAt": lambda record: _string_field(go_time_text(go_expiry(record))),
}
_TAG_VALUES: dict[str, Callable[[AnalyticsRecord], str]] = {
    "timestamp": lambda record: str(record.timestamp),
    "username": lambda record: record.username,
    "effect": lambda record: record.effect,
    "conclusion": lambda record: record.conclusion,
    "request": lambda record: record.request,
    "policies": lambda record: record.policies,
    "deciders": lambda record: record.deciders,
    "expireAt": lambda record: go_time_text(go_expiry(record)),
}


class _BudgetSession(requests.Session):
    """An HTTP session whose every request waits at most ``budget_s``: the client takes one
    fixed timeout, a write's budget is what its deadline leaves."""

    budget_s: float = CHECK_TIMEOUT_S

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["timeout"] = self.budget_s
        return super().request(*args, **kwargs)


class InfluxPump(Pump[InfluxMeta]):
    """Writes one point per record; see the module docstring."""

    Meta = InfluxMeta
    upserts: ClassVar[bool] = True

    _client: InfluxDBClient | None = None
    _session: _BudgetSession | None = None

    def __init__(self, name: str, meta: InfluxMeta, *, timeout_s: float) -> None:
        super().__init__(name, meta, timeout_s=timeout_s)
        self._fields = [(name, _FIELD_VALUES[name]) for name in meta.field_names]
        self._tags = [(name, _TAG_VALUES[name]) for name in meta.tag_names]

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self, *, deadline: Deadline | None = None) -> None:
        if self._client is not None:
            return
        meta = self.meta
        address = urlsplit(meta.address)
        https = address.scheme == "https"
        session = _BudgetSession()
        session.budget_s = self.open_deadline(deadline).operation_budget_s()
        client = InfluxDBClient(
            host=address.hostname,
            port=address.port or (443 if https else 8086),
            username=meta.username or None,
            password=meta.password or None,
            database=meta.database_name,
            ssl=https,
            verify_ssl=https,
            retries=1,  # one try per call: the write task owns retries (0 would retry forever)
            path=address.path.rstrip("/"),
            session=session,
        )
        try:
            self._create_database(client)
        except BaseException:
            client.close()
            raise
        self._client, self._session = client, session
        logger.info(
            "pump %s: InfluxDB %s, database %s, measurement %s, fields %s, tags %s",
            self.name,
            mask_url(meta.address),
            meta.database_name,
            MEASUREMENT,
            ",".join([ID_FIELD, *meta.field_names]),
            ",".join(meta.tag_names) or "-",
        )

    def _create_database(self, client: InfluxDBClient) -> None:
        name = self.meta.database_name
        try:
            client.create_database(name)
        except InfluxDBClientError as exc:
            if exc.code == 403 or "not authorized" in str(exc):
                logger.warning(
                    "pump %s: not allowed to create database %r (%s); writing to it as it is",
                    self.name,
                    name,
                    _reason(exc),
                )
                return
            raise self._wrap(exc, doing=f"create database {name!r}") from exc
        except (InfluxDBServerError, requests.RequestException) as exc:
            raise self._wrap(exc, doing=f"create database {name!r}") from exc

    def check(self) -> None:
        client, session = self._client, self._session
        if client is None or session is None:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        session.budget_s = CHECK_TIMEOUT_S
        try:
            client.ping()
        except (InfluxDBClientError, InfluxDBServerError, requests.RequestException) as exc:
            raise self._wrap(exc, doing="ping") from exc

    def close(self) -> None:
        client, self._client, self._session = self._client, None, None
        if client is not None:
            client.close()

    # -- writing -----------------------------------------------------------------------------

    def line(self, record: AnalyticsRecord) -> str:
        """The record's point in line protocol; ValueError names what InfluxDB cannot store."""
        time_ns = record.timestamp * NANOSECONDS_PER_SECOND + time_offset_ns(record.id)
        if not MIN_TIME_NS <= time_ns <= MAX_TIME_NS:
            raise ValueError(f"timestamp {record.timestamp} is outside the times InfluxDB stores")
        series = MEASUREMENT
        for name, value_of in self._tags:
            value = value_of(record)
            if value:  # InfluxDB has no empty tag values: the tag is left out
                series += f",{name}={_tag_value(value)}"
        if len(series) > MAX_SERIES_KEY_BYTES // 4 and (
            len(series.encode("utf-8")) > MAX_SERIES_KEY_BYTES
        ):
            raise ValueError(
                f"tag values of {len(series.encode('utf-8'))} bytes: InfluxDB takes a series key "
                f"of at most {MAX_SERIES_KEY_BYTES}"
            )
        fields = "".join(f",{name}={value_of(record)}" for name, value_of in self._fields)
        return f"{series} {ID_FIELD}={_string_field(record.id)}{fields} {time_ns}"

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Write one point per record by ``deadline``; return the records refused for good.

        Raises :class:`PumpTemporaryError` when InfluxDB cannot be reached or fails (5xx); the
        batch is then written again later, which rewrites the same points.
        """
        if not records:
            return WriteResult()
        client, session = self._client, self._session
        if client is None or session is None:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        # Every request of this write, halves included, shares one budget, fixed now.
        budget = Deadline.after(deadline.operation_budget_s())
        rejected: list[tuple[AnalyticsRecord, str]] = []
        points: list[tuple[AnalyticsRecord, str]] = []
        for record in records:
            if not record.id:
                rejected.append((record, NO_ID_REASON))
                continue
            try:
                points.append((record, self.line(record)))
            except ValueError as exc:
                rejected.append((record, str(exc)))
        for chunk in _chunks(points):
            rejected += self._send(client, session, chunk, budget)
        return WriteResult(rejected=rejected)

    def _send(
        self,
        client: InfluxDBClient,
        session: _BudgetSession,
        points: list[tuple[AnalyticsRecord, str]],
        budget: Deadline,
    ) -> list[tuple[AnalyticsRecord, str]]:
        """Write ``points``; a request refused as bad or too large is split until the refused
        points are alone, and those are returned with InfluxDB's reason."""
        remaining_s = budget.remaining_s()
        if remaining_s <= 0:
            raise PumpTemporaryError("InfluxDB write ran out of its time budget")
        session.budget_s = remaining_s
        try:
            client.write_points(
                [line for _, line in points],
                time_precision="n",
                database=self.meta.database_name,
                protocol="line",
            )
        except InfluxDBClientError as exc:
            if exc.code not in {BAD_REQUEST_STATUS, REQUEST_TOO_LARGE_STATUS}:
                raise self._wrap(exc, doing="write") from exc
            if len(points) == 1 or _dropped(exc) == len(points):
                # One point, or InfluxDB says it dropped them all: each is refused for this.
                reason = f"InfluxDB refused the point: {_reason(exc)}"
                return [(record, reason) for record, _ in points]
            logger.info(
                "pump %s: InfluxDB refused a write of %d points (%s); writing halves to find "
                "the refused ones",
                self.name,
                len(points),
                _reason(exc),
            )
            middle = len(points) // 2
            return self._send(client, session, points[:middle], budget) + self._send(
                client, session, points[middle:], budget
            )
        except (InfluxDBServerError, requests.RequestException) as exc:
            raise self._wrap(exc, doing="write") from exc
        return []

    def _wrap(self, exc: Exception, *, doing: str) -> PumpTemporaryError | PumpPermanentError:
        """A driver error as the pump's own: refused credentials are permanent, the rest not."""
        if isinstance(exc, InfluxDBClientError) and exc.code in AUTH_STATUSES:
            return PumpPermanentError(
                f"InfluxDB refused {doing} for user {self.meta.username or '(none)'!r}: "
                f"{_reason(exc)}"
            )
        if isinstance(exc, requests.RequestException):
            return PumpTemporaryError(
                f"InfluxDB at {mask_url(self.meta.address)} is unreachable ({doing}): {exc}"
            )
        return PumpTemporaryError(f"InfluxDB failed {doing}: {_reason(exc)}")


def _reason(exc: Exception) -> str:
    """InfluxDB's own words from an error: the ``error`` of its JSON answer when there is one."""
    content = getattr(exc, "content", None)
    text = content if isinstance(content, str) else str(exc)
    marker = '"error":"'
    if marker in text:
        text = text.split(marker, 1)[1].rsplit('"', 1)[0]
    return text[:500]


def _dropped(exc: InfluxDBClientError) -> int | None:
    """How many points a partial write dropped, as InfluxDB says (``dropped=N``), if it does."""
    match = _DROPPED.search(str(exc))
    return int(match.group(1)) if match else None


def _chunks(
    points: list[tuple[AnalyticsRecord, str]],
) -> Iterator[list[tuple[AnalyticsRecord, str]]]:
    """Runs of points whose lines make a request body of at most :data:`MAX_REQUEST_CHARACTERS`."""
    chunk: list[tuple[AnalyticsRecord, str]] = []
    size = 0
    for point in points:
        characters = len(point[1]) + 1
        if chunk and size + characters > MAX_REQUEST_CHARACTERS:
            yield chunk
            chunk, size = [], 0
        chunk.append(point)
        size += characters
    if chunk:
        yield chunk
