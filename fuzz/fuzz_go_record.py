"""Fuzz the list-record decoder: one record as iam-authz-server RPUSHes it to the Redis list.

Target: :func:`app.codec.decode_go_record` (a msgpack map keyed by Go field names).
Documented error: :class:`app.codec.MalformedRecordError`, whose message is the reason the
record is set aside; anything else is a bug. Contract checked beyond not crashing: a decoded
row has the record's types, and encoding it as Go bytes and decoding again gives the same row.

Each input is tried twice: as raw bytes, and as the seed of a structured record
(:func:`fuzz.values.go_record_map`) packed to msgpack.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import atheris

from fuzz.runner import check, fuzz, instrumented
from fuzz.values import go_record_map, pack

with instrumented():
    from app.codec import MalformedRecordError, decode_go_record, encode_go_row

#: The errors decode_go_record documents.
DOCUMENTED_ERRORS = (MalformedRecordError,)


def check_row(row: list[Any]) -> None:
    """A decoded row: the record's eight values, well typed, stable through a round trip."""
    check(len(row) == 8, f"row of {len(row)} values")
    check(type(row[0]) is int, f"TimeStamp decoded as {type(row[0]).__name__}")
    check(all(type(value) is str for value in row[1:7]), "a string field is not a str")
    expire_at = row[7]
    check(isinstance(expire_at, datetime), "ExpireAt is not a datetime")
    check(expire_at.tzinfo is not None, "ExpireAt is a naive datetime")
    again = decode_go_record(encode_go_row(row))
    check(again == row, f"round trip changed the row: {row!r:.200} -> {again!r:.200}")


def decode(raw: bytes) -> None:
    """Decode one record's bytes; a rejection must say why."""
    try:
        row = decode_go_record(raw)
    except DOCUMENTED_ERRORS as exc:
        check(bool(str(exc)), "a rejected record carries no reason")
        return
    check_row(row)


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point."""
    decode(data)
    decode(pack(go_record_map(atheris.FuzzedDataProvider(data))))


if __name__ == "__main__":
    fuzz(test_one_input)
