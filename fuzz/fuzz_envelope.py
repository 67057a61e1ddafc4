"""Fuzz the envelope decoder: one ``ingest`` task's batch, from the reporter or the purge.

Target: :func:`app.codec.decode_envelope`.
Documented error: :class:`app.codec.MalformedBatchError` (the payload is not an envelope at
all); a bad record never fails the batch but comes back as a :class:`~app.codec.Rejected` with
its reason. Anything else is a bug. Contract checked beyond not crashing: a well-formed envelope
is never rejected whole; every record of the envelope comes back exactly once, good or rejected
(none lost, none doubled); good rows are
valid rows; rejects carry their raw bytes and a reason; the clean batch built from the good
rows decodes to the same records.

Each input is tried twice: as raw bytes, and as the seed of a structured envelope
(:func:`fuzz.values.go_record_map` records, as Go bytes or as rows) packed to msgpack.
"""

from __future__ import annotations

from typing import Any

import atheris
import msgpack

from fuzz.runner import check, fuzz, instrumented
from fuzz.values import GO_KEYS, any_value, go_record_map, pack

with instrumented():
    from app.codec import (
        MalformedBatchError,
        decode_clean_batch,
        decode_envelope,
        encode_clean_batch,
        validate_row,
    )

#: The errors decode_envelope documents.
DOCUMENTED_ERRORS = (MalformedBatchError,)


def items_of(payload: bytes) -> list[Any] | None:
    """The envelope's records read independently of the decoder; None if it is no envelope.

    An envelope is a map with a UTF-8 string ``id`` and a ``go`` list, or no ``go`` and a
    ``records`` list; whatever the records hold, the decoder must not reject it whole.
    """
    try:
        envelope = msgpack.unpackb(payload, raw=False, unicode_errors="surrogateescape")
        envelope["id"].encode("utf-8")
    except Exception:
        return None
    items = envelope.get("go") if "go" in envelope else envelope.get("records")
    return items if isinstance(items, list) else None


def decode(payload: bytes) -> None:
    """Decode one envelope and check what comes back."""
    try:
        batch_id, good, rejected = decode_envelope(payload)
    except DOCUMENTED_ERRORS as exc:
        check(bool(str(exc)), "a rejected batch carries no reason")
        check(items_of(payload) is None, f"a whole envelope was rejected for one record: {exc}")
        return
    check(isinstance(batch_id, str), "the batch id is not a string")
    positions = [row[0] for row in good] + [reject.position for reject in rejected]
    items = items_of(payload)
    check(items is not None, "a payload that is no envelope was accepted")
    count = len(items or ())
    check(
        sorted(positions) == list(range(count)),
        f"{count} records in, positions out {sorted(positions)!r:.200}",
    )
    for row in good:
        check(validate_row(row[1:]) == row[1:], f"a good row does not validate: {row!r:.200}")
    for reject in rejected:
        check(isinstance(reject.raw, bytes), "a rejected record's raw form is not bytes")
        check(isinstance(reject.reason, str) and bool(reject.reason), "a reject has no reason")
    clean_id, records = decode_clean_batch(encode_clean_batch(batch_id, good))
    check(clean_id == batch_id, "the clean batch changed the batch id")
    check(len(records) == len(good), "the clean batch lost or added records")
    for row, record in zip(good, records, strict=True):
        check(record.id == f"{batch_id}-{row[0]}", f"record id {record.id!r}")
        values = [record.timestamp, record.username, record.effect, record.conclusion]
        values += [record.request, record.policies, record.deciders, record.expire_at]
        check(values == row[1:], f"the clean batch changed a record: {row!r:.200}")


def envelope(fdp: atheris.FuzzedDataProvider) -> dict[str, Any]:
    """A structured envelope: a Go batch (records as bytes) or a reporter batch (rows)."""
    go = fdp.ConsumeBool()
    items: list[Any] = []
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        record = go_record_map(fdp)
        if fdp.ConsumeIntInRange(0, 9) == 0:
            items.append(any_value(fdp))
        elif go:
            items.append(pack(record))
        else:
            items.append([record.get(key) for key in GO_KEYS])
    batch_id: Any = fdp.ConsumeUnicode(12) if fdp.ConsumeIntInRange(0, 9) else any_value(fdp)
    return {"id": batch_id, "go" if go else "records": items}


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point."""
    decode(data)
    decode(pack(envelope(atheris.FuzzedDataProvider(data))))


if __name__ == "__main__":
    fuzz(test_one_input)
