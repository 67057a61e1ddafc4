"""Fuzz the clean-batch decoder: what every write task (and the dead-letter command) reads.

Target: :func:`app.codec.decode_clean_batch`.
Documented error: :class:`app.codec.MalformedBatchError`; anything else is a bug. Contract
checked beyond not crashing: every record has the record's types and the id
``<batch id>-<position>``, and the records encode back to a clean batch that decodes to the
same records.

Each input is tried twice: as raw bytes, and as the seed of a structured clean batch (rows of
a position and a :func:`fuzz.values.go_record_map` record's values) packed to msgpack.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import atheris

from fuzz.runner import check, fuzz, instrumented
from fuzz.values import GO_KEYS, any_value, go_record_map, pack

with instrumented():
    from app.codec import (
        MalformedBatchError,
        decode_clean_batch,
        encode_clean_batch,
        records_to_clean_rows,
    )
    from app.record import go_expiry

#: The errors decode_clean_batch documents.
DOCUMENTED_ERRORS = (MalformedBatchError,)


def decode(payload: bytes) -> None:
    """Decode one clean batch and check what comes back."""
    try:
        batch_id, records = decode_clean_batch(payload)
    except DOCUMENTED_ERRORS as exc:
        check(bool(str(exc)), "a rejected batch carries no reason")
        return
    check(type(batch_id) is str, "the batch id is not a string")
    for record in records:
        check(type(record.timestamp) is int, "timestamp is not an int")
        strings = [record.username, record.effect, record.conclusion, record.request]
        strings += [record.policies, record.deciders]
        check(all(type(value) is str for value in strings), "a string field is not a str")
        check(record.expire_at is None or isinstance(record.expire_at, datetime), "expire_at")
        prefix, _, position = record.id.rpartition("-")
        check(prefix == batch_id and position.isdigit(), f"record id {record.id!r:.100}")
    rows = records_to_clean_rows(records)
    again_id, again = decode_clean_batch(encode_clean_batch(batch_id, rows))
    check(again_id == batch_id, "the round trip changed the batch id")
    check(len(again) == len(records), "the round trip lost or added records")
    for before, after in zip(records, again, strict=True):
        # Encoding writes "never expires" as Go's zero time (app.record.go_expiry).
        check(
            after.id == before.id
            and after.to_dict() | {"expireAt": None} == before.to_dict() | {"expireAt": None}
            and after.expire_at == go_expiry(before),
            f"the round trip changed a record: {before!r:.200} -> {after!r:.200}",
        )


def clean_batch(fdp: atheris.FuzzedDataProvider) -> dict[str, Any]:
    """A structured clean batch: rows of a position and a record's values."""
    rows: list[Any] = []
    for position in range(fdp.ConsumeIntInRange(0, 6)):
        record = go_record_map(fdp)
        if fdp.ConsumeIntInRange(0, 9) == 0:
            rows.append(any_value(fdp))
        else:
            at = position if fdp.ConsumeIntInRange(0, 7) else any_value(fdp)
            rows.append([at, *(record.get(key) for key in GO_KEYS)])
    batch_id: Any = fdp.ConsumeUnicode(12) if fdp.ConsumeIntInRange(0, 9) else any_value(fdp)
    return {"id": batch_id, "records": rows}


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point."""
    decode(data)
    decode(pack(clean_batch(atheris.FuzzedDataProvider(data))))


if __name__ == "__main__":
    fuzz(test_one_input)
