"""CSV files in iam's layout: one file per hour (``2026-November-26-13.csv``), a header row of
iam's field names, rows appended.

Several worker processes may append to the same file: a batch is formatted in memory and written
with one ``write`` on an ``O_APPEND`` descriptor, so batches never interleave, and a new file is
created complete with its header (written aside, then linked into place) so no row can precede
it. Delivery is at-least-once: a batch delivered twice is appended twice.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from app.record import GO_FIELD_NAMES, AnalyticsRecord
from pumps.base import Pump
from pumps.errors import PumpPermanentError, PumpTemporaryError

_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


class CSVMeta(BaseModel):
    """``meta`` of the csv pump."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    csv_dir: str = Field(min_length=1)


def hourly_file_name(moment: time.struct_time) -> str:
    """iam's file name for the hour of ``moment`` (local time), e.g. ``2026-November-26-9.csv``."""
    return f"{moment.tm_year}-{_MONTHS[moment.tm_mon - 1]}-{moment.tm_mday}-{moment.tm_hour}.csv"


def go_time_string(value: datetime | None) -> str:
    """A datetime as Go's ``time.Time.String()`` prints a UTC time."""
    if value is None:
        value = datetime(1, 1, 1, tzinfo=UTC)
    value = value.astimezone(UTC) if value.tzinfo else value
    text = value.strftime("%Y-%m-%d %H:%M:%S")
    if value.year < 1000:
        text = f"{value.year:04d}" + text[text.index("-") :]
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + " +0000 UTC"


def csv_row(record: AnalyticsRecord) -> list[str]:
    """A record's values in iam's column order."""
    return [
        str(record.timestamp),
        record.username,
        record.effect,
        record.conclusion,
        record.request,
        record.policies,
        record.deciders,
        go_time_string(record.expire_at),
    ]


#: A field is quoted when it holds one of these (RFC 4180's rule, as Go's encoding/csv and Python's
#: csv module read it): the separator, the quote, or either line-break character.
_NEEDS_QUOTES = re.compile(r'[",\r\n]').search


def csv_field(text: str) -> str:
    """One field as it appears in the file: as is, or quoted with inner quotes doubled."""
    if _NEEDS_QUOTES(text) is None:
        return text
    return '"' + text.replace('"', '""') + '"'


def csv_text(records: Sequence[AnalyticsRecord]) -> str:
    """The rows of a batch as CSV text, one line per record in :func:`csv_row`'s order.

    Built with string operations that run in C per field (one search, rarely a replace), which
    is several times faster than the csv module's character-by-character writer. Records of one
    batch nearly always share their expiry, so each distinct expiry is formatted once per batch.
    """
    expiry_text: dict[datetime | None, str] = {}
    q = csv_field
    lines = []
    for r in records:
        expiry = expiry_text.get(r.expire_at)
        if expiry is None:
            expiry = expiry_text[r.expire_at] = q(go_time_string(r.expire_at))
        lines.append(
            f"{r.timestamp},{q(r.username)},{q(r.effect)},{q(r.conclusion)},{q(r.request)},"
            f"{q(r.policies)},{q(r.deciders)},{expiry}\n"
        )
    return "".join(lines)


class CSVPump(Pump):
    """Appends records to hourly CSV files under ``meta.csv_dir``."""

    Meta = CSVMeta

    @property
    def directory(self) -> Path:
        """The folder the files are written to."""
        assert isinstance(self.meta, CSVMeta)
        return Path(self.meta.csv_dir)

    def open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PumpTemporaryError(f"cannot create {self.directory}: {exc.strerror}") from exc

    def write(self, records: Sequence[AnalyticsRecord]) -> None:
        if not records:
            return
        data = csv_text(records).encode("utf-8")
        path = self.directory / hourly_file_name(time.localtime())
        try:
            self._ensure_file(path)
            descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                written = os.write(descriptor, data)
            finally:
                os.close(descriptor)
        except PermissionError as exc:
            raise PumpPermanentError(f"cannot write {path}: {exc.strerror}") from exc
        except OSError as exc:
            raise PumpTemporaryError(f"cannot write {path}: {exc.strerror}") from exc
        if written != len(data):
            raise PumpTemporaryError(f"short write to {path}: {written} of {len(data)} bytes")

    def _ensure_file(self, path: Path) -> None:
        if path.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        header = (",".join(GO_FIELD_NAMES) + "\n").encode("ascii")
        descriptor, temporary = tempfile.mkstemp(dir=self.directory, prefix=".header-")
        try:
            os.write(descriptor, header)
            os.close(descriptor)
            os.chmod(temporary, 0o644)
            # If another process created it first, it did so header and all.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)

    def check(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory, prefix=".health-"):
                pass
        except OSError as exc:
            raise PumpTemporaryError(f"{self.directory} is not writable: {exc}") from exc
