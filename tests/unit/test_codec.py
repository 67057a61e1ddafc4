from __future__ import annotations

import struct
from datetime import UTC, datetime

import msgpack
import pytest

from app.codec import (
    MalformedBatchError,
    MalformedRecordError,
    decode_clean_batch,
    decode_envelope,
    decode_go_record,
    encode_clean_batch,
    encode_envelope,
    encode_go_envelope,
    encode_go_record,
    record_to_row,
)
from app.record import GO_FIELD_NAMES, GO_ZERO_TIME, AnalyticsRecord


def go_string(text: bytes) -> bytes:
    assert len(text) < 32
    return bytes([0xA0 | len(text)]) + text


def go_timestamp96(seconds: int, nanoseconds: int = 0) -> bytes:
    # ext 8 (0xc7), length 12, type -1, then uint32 nanoseconds + int64 seconds, as Go writes it.
    return b"\xc7\x0c\xff" + struct.pack(">I", nanoseconds) + struct.pack(">q", seconds)


def hand_built_go_record(*, expire: bytes, username: bytes = b"alice") -> bytes:
    """Bytes laid out the way vmihailenco/msgpack encodes iam's AnalyticsRecord struct."""
    out = b"\x88"  # fixmap of 8
    out += go_string(b"TimeStamp") + b"\xd3" + struct.pack(">q", 1_700_000_000)
    out += go_string(b"Username") + go_string(username)
    out += go_string(b"Effect") + go_string(b"allow")
    out += go_string(b"Conclusion") + go_string(b"ok")
    out += go_string(b"Request") + go_string(b'{"resource":"r1"}')
    out += go_string(b"Policies") + go_string(b"[]")
    out += go_string(b"Deciders") + go_string(b"[]")
    out += go_string(b"ExpireAt") + expire
    return out


def test_decodes_hand_built_go_bytes_with_the_zero_time() -> None:
    row = decode_go_record(hand_built_go_record(expire=go_timestamp96(-62135596800)))
    assert row == [
        1_700_000_000,
        "alice",
        "allow",
        "ok",
        '{"resource":"r1"}',
        "[]",
        "[]",
        GO_ZERO_TIME,
    ]


def test_decodes_hand_built_go_bytes_with_a_real_time_and_nanoseconds() -> None:
    row = decode_go_record(hand_built_go_record(expire=go_timestamp96(1_700_086_400, 5_000)))
    assert row[7] == datetime(2023, 11, 15, 22, 13, 20, 5, tzinfo=UTC)


def test_go_record_round_trip_keeps_every_field() -> None:
    record = AnalyticsRecord(
        timestamp=1_700_000_000,
        username="ünïcode",
        effect="deny",
        conclusion="c",
        request="r" * 300,
        policies="p",
        deciders="d",
        expire_at=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    raw = encode_go_record(record)
    assert list(msgpack.unpackb(raw, timestamp=3)) == list(GO_FIELD_NAMES)
    assert decode_go_record(raw) == [*record_to_row(record)[:7], record.expire_at]


def test_encoding_matches_the_hand_built_layout() -> None:
    record = AnalyticsRecord(
        timestamp=1_700_000_000,
        username="alice",
        effect="allow",
        conclusion="ok",
        request='{"resource":"r1"}',
        policies="[]",
        deciders="[]",
        expire_at=GO_ZERO_TIME,
    )
    # msgpack-python packs the int compactly where Go writes int64: same values, both decode.
    assert msgpack.unpackb(encode_go_record(record), timestamp=3) == msgpack.unpackb(
        hand_built_go_record(expire=go_timestamp96(-62135596800)), timestamp=3
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x88\xa9TimeSt", "not msgpack"),
        (b"\xc1", "not msgpack"),
        (msgpack.packb([1, 2]), "expected a msgpack map"),
        (msgpack.packb({"TimeStamp": 1}), "missing field(s) Username"),
        (hand_built_go_record(expire=b"\xa3bad"), "ExpireAt must be a msgpack timestamp"),
        (hand_built_go_record(expire=go_timestamp96(0), username=b"\xff\xfe"), "not valid UTF-8"),
    ],
)
def test_malformed_go_records_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedRecordError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode_go_record(raw)


def test_wrong_types_are_named() -> None:
    fields = dict(zip(GO_FIELD_NAMES, [1, 2, "", "", "", "", "", None], strict=True))
    with pytest.raises(MalformedRecordError, match="Username must be a string"):
        decode_go_record(msgpack.packb(fields))
    fields = dict(zip(GO_FIELD_NAMES, [True, "", "", "", "", "", "", None], strict=True))
    with pytest.raises(MalformedRecordError, match="TimeStamp must be an integer"):
        decode_go_record(msgpack.packb(fields))


def test_go_envelope_keeps_good_records_and_positions_of_bad_ones() -> None:
    good = encode_go_record(AnalyticsRecord(username="a"))
    envelope = encode_go_envelope("b1", [good, b"\xc1garbage", good])
    batch_id, rows, rejected = decode_envelope(envelope)
    assert batch_id == "b1"
    assert [row[0] for row in rows] == [0, 2]
    assert [(item.position, item.raw) for item in rejected] == [(1, b"\xc1garbage")]


def test_reporter_envelope_sets_aside_bad_rows_including_invalid_utf8() -> None:
    good = record_to_row(AnalyticsRecord(username="a", expire_at=GO_ZERO_TIME))
    bad_utf8 = msgpack.packb(["x"]).replace(b"x", b"\xff")
    payload = msgpack.packb(
        {"id": "b2", "records": [good, ["short"], good]}, datetime=True
    ).replace(b"\x91\xa5short", b"\x91" + bad_utf8[1:] + b"")
    batch_id, rows, rejected = decode_envelope(payload)
    assert batch_id == "b2"
    assert [row[0] for row in rows] == [0, 2]
    assert len(rejected) == 1 and rejected[0].position == 1
    assert "UTF-8" in rejected[0].reason


def test_unreadable_envelope_raises() -> None:
    with pytest.raises(MalformedBatchError):
        decode_envelope(b"\x00\x01")
    with pytest.raises(MalformedBatchError):
        decode_envelope(msgpack.packb({"records": []}))


def test_clean_batch_ids_are_batch_and_position() -> None:
    rows = [record_to_row(AnalyticsRecord(username=name)) for name in "abc"]
    batch_id, good, _ = decode_envelope(encode_envelope("B", rows))
    clean = encode_clean_batch(batch_id, good[1:])
    _, records = decode_clean_batch(clean)
    assert [(r.id, r.username) for r in records] == [("B-1", "b"), ("B-2", "c")]


def test_the_record_declares_its_attributes_in_schema_order() -> None:
    """Rows build records by position, so the dataclass order is the schema's."""
    import dataclasses

    from app.record import RECORD_FIELDS

    attributes = [spec.attribute for spec in RECORD_FIELDS]
    assert [field.name for field in dataclasses.fields(AnalyticsRecord)] == [*attributes, "id"]
    assert tuple(spec.go_name for spec in RECORD_FIELDS) == GO_FIELD_NAMES


def test_expiry_reads_the_go_zero_time_as_never() -> None:
    from app.record import expiry, go_expiry

    assert expiry(AnalyticsRecord(expire_at=None)) is None
    assert expiry(AnalyticsRecord(expire_at=GO_ZERO_TIME)) is None
    assert go_expiry(AnalyticsRecord(expire_at=None)) == GO_ZERO_TIME
    naive = datetime(2030, 1, 1)
    assert expiry(AnalyticsRecord(expire_at=naive)) == naive.replace(tzinfo=UTC)
