"""The CSV pump on a disk that fills up (a real tmpfs of a few pages): a write that does not fit
fails as a temporary error and leaves only whole rows; once space is freed its retry appends the
batch once. Also an error reported only when the written descriptor is closed (NFS, quotas)."""

from __future__ import annotations

import csv
import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.record import GO_FIELD_NAMES, AnalyticsRecord
from pumps.csv import CSVPump
from pumps.deadline import Deadline
from pumps.errors import PumpTemporaryError
from tests.conftest import mounted_small_disk
from tests.support import fill_up

#: Small enough to fill in a few writes, large enough for a header and a few batches.
DISK_BYTES = 64 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_small_disk(tmp_path / "disk", DISK_BYTES) as directory:
        yield directory


def _pump(directory: Path, cls: type[CSVPump] = CSVPump) -> CSVPump:
    pump = cls.create("csv", {"csv_dir": str(directory / "csv")}, timeout_s=5)
    assert isinstance(pump, CSVPump)
    pump.open()
    return pump


def _batch(tag: str, count: int = 40) -> list[AnalyticsRecord]:
    return [AnalyticsRecord(username=f"{tag}-{i}", request="r" * 200) for i in range(count)]


def _usernames(directory: Path) -> list[str]:
    [path] = directory.glob("*.csv")
    text = path.read_bytes()
    assert not text or text.endswith(b"\n"), "a torn row at the end of the file"
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == list(GO_FIELD_NAMES)
        rows = list(reader)
    assert all(len(row) == len(GO_FIELD_NAMES) for row in rows)
    return [row[1] for row in rows]


def test_a_full_disk_fails_the_write_retryably_and_leaves_whole_rows(small_disk: Path) -> None:
    pump = _pump(small_disk)
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"x" * (DISK_BYTES // 2))  # freed later, to make room
    written: list[str] = []
    failure: PumpTemporaryError | None = None
    for round_ in range(100):  # ~10 KB a batch: the disk fills within a few batches
        batch = _batch(f"b{round_}")
        try:
            pump.write(batch, deadline=Deadline.after(5))
        except PumpTemporaryError as exc:
            failure = exc
            break
        written += [record.username for record in batch]
    assert failure is not None and "No space left on device" in str(failure)
    assert _usernames(small_disk / "csv") == written
    # Still full: the retry fails the same way and adds nothing.
    with pytest.raises(PumpTemporaryError):
        pump.write(batch, deadline=Deadline.after(5))
    assert _usernames(small_disk / "csv") == written
    ballast.unlink()
    pump.write(batch, deadline=Deadline.after(5))
    assert _usernames(small_disk / "csv") == written + [record.username for record in batch]


def test_a_disk_too_full_for_the_header_creates_no_file(small_disk: Path) -> None:
    pump = _pump(small_disk)
    ballast = fill_up(small_disk / "csv")
    with pytest.raises(PumpTemporaryError):
        pump.write(_batch("h"), deadline=Deadline.after(5))
    assert list((small_disk / "csv").glob("*.csv")) == []
    assert list((small_disk / "csv").glob(".header-*")) == []
    ballast.unlink()
    batch = _batch("h")
    pump.write(batch, deadline=Deadline.after(5))
    assert _usernames(small_disk / "csv") == [record.username for record in batch]


class FailingAtCloseCSVPump(CSVPump):
    """The rows are all written, then closing reports ENOSPC once (as NFS does on write-back)."""

    fail_close = False

    def _close_writer(self, descriptor: int) -> None:
        super()._close_writer(descriptor)
        if self.fail_close:
            self.fail_close = False
            raise OSError(errno.ENOSPC, "No space left on device")


def test_an_error_at_close_cuts_the_batch_back_and_its_retry_writes_once(tmp_path: Path) -> None:
    pump = _pump(tmp_path, FailingAtCloseCSVPump)
    assert isinstance(pump, FailingAtCloseCSVPump)
    before, batch = _batch("before"), _batch("batch")
    pump.write(before, deadline=Deadline.after(5))
    pump.fail_close = True
    with pytest.raises(PumpTemporaryError, match="No space left"):
        pump.write(batch, deadline=Deadline.after(5))
    assert _usernames(tmp_path / "csv") == [record.username for record in before]
    pump.write(batch, deadline=Deadline.after(5))
    assert _usernames(tmp_path / "csv") == [r.username for r in before + batch]
