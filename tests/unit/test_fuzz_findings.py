"""Inputs the decoders once failed on with an undocumented error (found by fuzzing, fuzz/).

Each decoder may raise only its documented error: MalformedRecordError, MalformedBatchError or
ConfigError; a bad record inside a good batch comes back as a Rejected with its reason.
"""

from __future__ import annotations

import msgpack
import pytest

from app.codec import (
    MalformedBatchError,
    decode_clean_batch,
    decode_envelope,
    encode_clean_batch,
    encode_envelope,
    record_to_row,
)
from app.record import AnalyticsRecord

GOOD_ROW = record_to_row(AnalyticsRecord(1_700_000_000, "alice", "allow", "ok", "{}", "[]", "[]"))


def test_an_envelope_id_that_is_not_utf8_is_a_malformed_batch() -> None:
    # It used to come back as an id with surrogates, which ingest then failed to re-encode.
    payload = encode_envelope("batch-\u00e9", [GOOD_ROW]).replace(b"\xc3\xa9", b"\xff\xfe")
    with pytest.raises(MalformedBatchError, match="not valid UTF-8"):
        decode_envelope(payload)


def test_a_go_item_that_is_not_bytes_and_not_utf8_is_rejected() -> None:
    # The reject's raw form was packed strictly and raised UnicodeEncodeError.
    payload = msgpack.packb({"id": "b", "go": [["\udcff"]]}, unicode_errors="surrogatepass")
    batch_id, good, rejected = decode_envelope(payload)
    assert (batch_id, good) == ("b", [])
    assert [(reject.position, reject.reason) for reject in rejected] == [
        (0, "Go record is not bytes")
    ]


def test_a_row_nested_deeper_than_repr_can_go_is_rejected() -> None:
    # The reason quoted repr(row), which raised RecursionError.
    nested = b"\x91" * 1000 + b"\xc0"
    payload = msgpack.packb({"id": "b", "records": []})[:-1] + b"\x91" + nested
    batch_id, good, rejected = decode_envelope(payload)
    assert (batch_id, good, len(rejected)) == ("b", [], 1)
    assert rejected[0].reason == "expected a row of 8 values, got list of 1 item(s)"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"id": "b"}),
        msgpack.packb({"id": 7, "records": []}),
        msgpack.packb({"id": "b", "records": [[0, 1]]}),
        msgpack.packb({"id": "b", "records": 5}),
        encode_clean_batch("b", [[0, *GOOD_ROW[:1], 42, *GOOD_ROW[2:]]]),
        encode_clean_batch("b", [[-1, *GOOD_ROW]]),
        encode_clean_batch("b", [["0", *GOOD_ROW]]),
        msgpack.packb({"id": "b", "records": ["abcdefghi"]}),
    ],
    ids=[
        "empty",
        "not-msgpack",
        "a-list",
        "no-records",
        "id-not-a-string",
        "short-row",
        "records-not-a-list",
        "username-an-int",
        "negative-position",
        "position-a-string",
        "row-a-string",
    ],
)
def test_a_payload_that_is_not_a_clean_batch_raises_malformed_batch(payload: bytes) -> None:
    # It raised KeyError, TypeError or ValueError, or returned records of the wrong types.
    with pytest.raises(MalformedBatchError):
        decode_clean_batch(payload)
