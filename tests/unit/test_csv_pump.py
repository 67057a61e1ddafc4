from __future__ import annotations

import csv
import errno
import multiprocessing
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.record import GO_FIELD_NAMES, AnalyticsRecord
from pumps.csv import CSVPump, go_time_string, hourly_file_name
from pumps.deadline import Deadline
from pumps.errors import PumpTemporaryError


def make_pump(directory: Path) -> CSVPump:
    pump = CSVPump.create("csv", {"csv_dir": str(directory)}, timeout_s=5)
    assert isinstance(pump, CSVPump)
    pump.open()
    return pump


def test_file_name_is_iams() -> None:
    moment = time.struct_time((2026, 11, 6, 9, 5, 0, 4, 310, 0))
    assert hourly_file_name(moment) == "2026-November-6-9.csv"


def test_times_print_like_go() -> None:
    assert go_time_string(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01 00:00:00 +0000 UTC"
    assert go_time_string(datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=UTC)) == (
        "2026-01-02 03:04:05.12 +0000 UTC"
    )


def test_header_once_then_rows_with_every_field(tmp_path: Path) -> None:
    pump = make_pump(tmp_path)
    record = AnalyticsRecord(
        timestamp=1,
        username="a,b",
        effect="allow",
        conclusion='quote "x"',
        request="line\nbreak",
        policies="p",
        deciders="d",
        expire_at=datetime(2030, 1, 1, tzinfo=UTC),
    )
    pump.write([record], deadline=Deadline.after(5))
    pump.write([record], deadline=Deadline.after(5))
    [path] = tmp_path.glob("*.csv")
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(GO_FIELD_NAMES)
    assert (
        rows[1]
        == rows[2]
        == [
            "1",
            "a,b",
            "allow",
            'quote "x"',
            "line\nbreak",
            "p",
            "d",
            "2030-01-01 00:00:00 +0000 UTC",
        ]
    )


def _append(directory: str, worker: int) -> None:
    pump = CSVPump.create("csv", {"csv_dir": directory}, timeout_s=5)
    pump.open()
    for batch in range(20):
        pump.write(
            [
                AnalyticsRecord(username=f"w{worker}", request=f"{worker}-{batch}-{i}" + "x" * 200)
                for i in range(100)
            ],
            deadline=Deadline.after(5),
        )


def test_processes_appending_at_once_never_interleave(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append, args=(str(tmp_path), n)) for n in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    rows = []
    for path in tmp_path.glob("*.csv"):
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            assert next(reader) == list(GO_FIELD_NAMES)
            rows += list(reader)
    assert len(rows) == 4 * 20 * 100
    assert all(len(row) == len(GO_FIELD_NAMES) for row in rows)
    assert len({row[4] for row in rows}) == len(rows)


def test_unwritable_directory_fails_the_health_check(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    pump = CSVPump.create("csv", {"csv_dir": str(blocker / "sub")}, timeout_s=5)
    with pytest.raises(PumpTemporaryError):
        pump.open()


def test_batch_text_reads_back_field_for_field() -> None:
    import io
    import random

    from pumps.csv import csv_row, csv_text

    alphabet = ["a", '"', ",", "\r", "\n", " ", "\t", "ü", "\\", "'", "\u2028", "\x00"]
    rng = random.Random(7)

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))

    expiries = [datetime(2030, 1, 1, tzinfo=UTC), None, datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)]
    records = [
        AnalyticsRecord(
            timestamp=i,
            username=text(),
            effect=text(),
            conclusion=text(),
            request=text(),
            policies=text(),
            deciders=text(),
            expire_at=expiries[i % 3],
        )
        for i in range(3000)
    ]
    written = csv_text(records)
    assert list(csv.reader(io.StringIO(written, newline=""))) == [csv_row(r) for r in records]
    # Where the csv module quotes correctly (no bare carriage return), the text is the same.
    plain = [r for r in records if "\r" not in "".join(csv_row(r))]
    expected = io.StringIO()
    csv.writer(expected, lineterminator="\n").writerows(csv_row(r) for r in plain)
    assert csv_text(plain) == expected.getvalue()


class FailingMidWriteCSVPump(CSVPump):
    """Lets the kernel take only part of the batch, then fails with ``error``, once."""

    error: OSError | None = None

    def _write_some(self, descriptor: int, data: bytes) -> int:
        error, self.error = self.error, None
        if error is None:
            return super()._write_some(descriptor, data)
        super()._write_some(descriptor, data[: len(data) // 2])
        raise error


def _batch(tag: str) -> list[AnalyticsRecord]:
    return [AnalyticsRecord(username=f"{tag}-{i}", request="r" * 100) for i in range(50)]


def _rows(directory: Path) -> list[list[str]]:
    [path] = directory.glob("*.csv")
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == list(GO_FIELD_NAMES)
        return list(reader)


@pytest.mark.parametrize(
    "error",
    [OSError(errno.EIO, "short write"), OSError(errno.ENOSPC, "No space left on device")],
    ids=["short-write", "enospc"],
)
def test_a_write_failing_half_way_leaves_whole_rows_and_its_retry_writes_once(
    tmp_path: Path, error: OSError
) -> None:
    pump = FailingMidWriteCSVPump.create("csv", {"csv_dir": str(tmp_path)}, timeout_s=5)
    pump.open()
    before = _batch("before")
    pump.write(before, deadline=Deadline.after(5))
    batch = _batch("batch")
    pump.error = error
    with pytest.raises(PumpTemporaryError):
        pump.write(batch, deadline=Deadline.after(5))
    rows = _rows(tmp_path)
    assert [row[1] for row in rows] == [record.username for record in before]
    pump.write(batch, deadline=Deadline.after(5))
    assert [row[1] for row in _rows(tmp_path)] == [r.username for r in before + batch]


class TricklingCSVPump(CSVPump):
    """The kernel takes at most 1000 bytes per write, as it may near a full disk or on a signal."""

    def _write_some(self, descriptor: int, data: bytes) -> int:
        return super()._write_some(descriptor, data[:1000])


def test_short_writes_are_continued_until_the_batch_is_whole(tmp_path: Path) -> None:
    pump = TricklingCSVPump.create("csv", {"csv_dir": str(tmp_path)}, timeout_s=5)
    pump.open()
    batch = _batch("trickle")
    assert pump.write(batch, deadline=Deadline.after(5)).rejected == []
    assert [row[1] for row in _rows(tmp_path)] == [record.username for record in batch]
