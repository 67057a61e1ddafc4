"""Structured inputs: msgpack-able values drawn from fuzzer bytes, to reach the type checks.

Mutating raw msgpack mostly breaks its framing; drawing typed values from the same bytes gives
the decoders well-formed maps and lists whose values have every type msgpack can carry.
"""

from __future__ import annotations

from typing import Any

import atheris
import msgpack

#: The Go record's keys as iam writes them (repeated here: this module imports nothing of ours).
GO_KEYS = (
    "TimeStamp",
    "Username",
    "Effect",
    "Conclusion",
    "Request",
    "Policies",
    "Deciders",
    "ExpireAt",
)


def any_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """One msgpack-able value of any type (nesting at most three deep)."""
    kind = fdp.ConsumeIntInRange(0, 11 if depth < 3 else 8)
    if kind == 0:
        return fdp.ConsumeIntInRange(-(2**63), 2**64 - 1)
    if kind == 1:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 24))
    if kind == 2:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
    if kind == 3:
        return None
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5:
        return fdp.ConsumeRegularFloat()
    if kind == 6:
        return timestamp(fdp)
    if kind == 7:
        return msgpack.ExtType(fdp.ConsumeIntInRange(0, 127), fdp.ConsumeBytes(4))
    if kind == 8:
        return fdp.ConsumeIntInRange(-(2**31), 2**31)
    if kind in (9, 10):
        return [any_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 9))]
    return {
        fdp.ConsumeUnicode(6): any_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))
    }


def timestamp(fdp: atheris.FuzzedDataProvider) -> msgpack.Timestamp:
    """A msgpack timestamp anywhere in its range (most of which no datetime can hold)."""
    wide = fdp.ConsumeBool()
    bound = 2**63 - 1 if wide else 300_000_000_000
    seconds = fdp.ConsumeIntInRange(-bound - 1 if wide else -bound, bound)
    return msgpack.Timestamp(seconds, fdp.ConsumeIntInRange(0, 999_999_999))


def record_value(fdp: atheris.FuzzedDataProvider, key: str) -> Any:
    """Mostly a value of the right type for ``key``, sometimes any value at all."""
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return any_value(fdp)
    if key == "TimeStamp":
        return fdp.ConsumeIntInRange(-(2**63), 2**63 - 1)
    if key == "ExpireAt":
        return None if fdp.ConsumeIntInRange(0, 5) == 0 else timestamp(fdp)
    return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))


def go_record_map(fdp: atheris.FuzzedDataProvider) -> dict[Any, Any]:
    """A Go record map: its eight keys (one sometimes missing), values mostly well typed."""
    record: dict[Any, Any] = {}
    skipped = fdp.ConsumeIntInRange(0, 20)
    for index, key in enumerate(GO_KEYS):
        if index != skipped:
            record[key] = record_value(fdp, key)
    if fdp.ConsumeIntInRange(0, 5) == 0:
        record[fdp.ConsumeUnicode(8)] = any_value(fdp)
    return record


def pack(value: Any) -> bytes:
    """``value`` as msgpack bytes, strings as UTF-8 even when they are not valid (surrogates)."""
    return bytes(msgpack.packb(value, unicode_errors="surrogatepass"))
