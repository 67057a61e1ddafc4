"""CSV files in iam's layout: one file per hour (``2026-November-26-13.csv``), a header row of
iam's field names, rows appended.

Several worker processes may append to the same file. A new file is created complete with its
header (written aside, then linked into place) so no row can precede it. A batch is formatted in
memory and appended under an exclusive ``flock`` on the file, so batches never interleave; the
size before the append is remembered, and if any write fails or stops short (a full disk:
``ENOSPC``), or closing the written descriptor reports an error (as NFS and quotas may), the
file is cut back to it, so a failed write leaves no torn row and its retry appends the batch
once. Delivery is at-least-once: a batch delivered twice (after a crash between the write and
the acknowledgement) is appended twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.record import (
    GO_FIELD_NAMES,
    GO_ZERO_TIME,
    RECORD_FIELDS,
    AnalyticsRecord,
    FieldKind,
    field_values,
    go_expiry,
)
from pumps.base import Pump, WriteResult
from pumps.deadline import Deadline
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
    """A datetime as Go's ``time.Time.String()`` prints a UTC time; None as Go's zero time."""
    if value is None:
        value = GO_ZERO_TIME
    value = value.astimezone(UTC) if value.tzinfo else value
    text = value.strftime("%Y-%m-%d %H:%M:%S")
    if value.year < 1000:
        text = f"{value.year:04d}" + text[text.index("-") :]
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + " +0000 UTC"


def csv_row(record: AnalyticsRecord) -> list[str]:
    """A record's values in iam's column order (:data:`~app.record.RECORD_FIELDS`), unquoted."""
    return [
        _CELL_TEXT[spec.kind](record, value)
        for spec, value in zip(RECORD_FIELDS, field_values(record), strict=True)
    ]


_CELL_TEXT: dict[FieldKind, Callable[[AnalyticsRecord, Any], str]] = {
    FieldKind.INT: lambda record, value: str(value),
    FieldKind.STR: lambda record, value: value,
    FieldKind.TIME: lambda record, value: go_time_string(go_expiry(record)),
}


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
    The columns are spelled out rather than looped over :data:`~app.record.RECORD_FIELDS`: that
    loop costs a third more per batch; a test pins this text to :func:`csv_row`, which is derived.
    """
    expiry_text: dict[datetime | None, str] = {}
    q = csv_field
    lines = []
    for r in records:
        expiry = expiry_text.get(r.expire_at)
        if expiry is None:
            expiry = expiry_text[r.expire_at] = q(go_time_string(go_expiry(r)))
        lines.append(
            f"{r.timestamp},{q(r.username)},{q(r.effect)},{q(r.conclusion)},{q(r.request)},"
            f"{q(r.policies)},{q(r.deciders)},{expiry}\n"
        )
    return "".join(lines)


class CSVPump(Pump[CSVMeta]):
    """Appends records to hourly CSV files under ``meta.csv_dir``."""

    Meta = CSVMeta

    @property
    def directory(self) -> Path:
        """The folder the files are written to."""
        return Path(self.meta.csv_dir)

    def open(self, *, deadline: Deadline | None = None) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PumpTemporaryError(f"cannot create {self.directory}: {exc.strerror}") from exc

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Append the records to this hour's file, whole or not at all."""
        if not records:
            return WriteResult()
        data = csv_text(records).encode("utf-8")
        path = self.directory / hourly_file_name(time.localtime())
        try:
            self._ensure_file(path)
            self._append_whole(path, data)
        except PermissionError as exc:
            raise PumpPermanentError(f"cannot write {path}: {exc.strerror}") from exc
        except OSError as exc:
            raise PumpTemporaryError(f"cannot write {path}: {exc.strerror}") from exc
        return WriteResult()

    def _append_whole(self, path: Path, data: bytes) -> None:
        """Append ``data`` under an exclusive lock; on any failure cut the file back and raise.

        One descriptor holds the lock and cuts back; the bytes go through a second one, closed
        while the lock is still held, so an error reported only at close is caught in time.
        """
        guard = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            size = os.fstat(guard).st_size
            try:
                writer = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    _write_all(self._write_some, writer, data, path)
                finally:
                    self._close_writer(writer)
            except BaseException:
                os.ftruncate(guard, size)
                raise
        finally:
            os.close(guard)  # releases the lock

    def _write_some(self, descriptor: int, data: bytes) -> int:
        """Write what the kernel takes of ``data`` and return how much (a seam for tests)."""
        return os.write(descriptor, data)

    def _close_writer(self, descriptor: int) -> None:
        """Close the descriptor the rows went through (a seam for tests: on NFS, or over a
        quota, this is where a failed write-back is reported)."""
        os.close(descriptor)

    def _ensure_file(self, path: Path) -> None:
        if path.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        header = (",".join(GO_FIELD_NAMES) + "\n").encode("ascii")
        descriptor, temporary = tempfile.mkstemp(dir=self.directory, prefix=".header-")
        try:
            try:
                # Whole or not at all: a short header on a full disk must never be linked.
                _write_all(os.write, descriptor, header, path)
            finally:
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


def _write_all(
    write_some: Callable[[int, bytes], int], descriptor: int, data: bytes, path: Path
) -> None:
    # Write until the kernel has taken all of ``data``; a write that takes nothing is an error.
    written = 0
    while written < len(data):
        count = write_some(descriptor, data[written:])
        if count <= 0:
            raise PumpTemporaryError(f"short write to {path}: {written} of {len(data)} bytes")
        written += count
