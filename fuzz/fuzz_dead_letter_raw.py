"""Fuzz the dead letters' reading of undecodable input: a rejected record's raw bytes.

Target: :func:`app.redaction.treat_raw`, which finds ``request`` and ``policies`` in bytes that
failed to decode (a Go record's map, a reporter's row) to redact or drop them.
Documented errors: none; bytes it cannot read give ``b""``. Anything raised is a bug. Contract
checked beyond not crashing: a hidden field that is kept in the output holds what its treatment
leaves (``""``, ``[redacted: N bytes]``) or its type's name, never the original value.

The first input byte picks the treatments; the rest is tried raw, and as the seed of a
structured record (a :func:`fuzz.values.go_record_map` map or its values as a row) packed to
msgpack.
"""

from __future__ import annotations

import re
from typing import Any

import atheris
import msgpack

from fuzz.runner import check, fuzz, instrumented
from fuzz.values import GO_KEYS, go_record_map, pack

with instrumented():
    from app.redaction import HIDEABLE_FIELDS, Treatment, treat_raw

#: The errors treat_raw documents.
DOCUMENTED_ERRORS: tuple[type[Exception], ...] = ()

_CHOICES: tuple[Treatment, ...] = ("keep", "redact", "drop")
#: Where each hideable field sits: its Go key and its index in a row.
_WHERE = {
    "request": (b"Request", GO_KEYS.index("Request")),
    "policies": (b"Policies", GO_KEYS.index("Policies")),
}
_LEFT = re.compile(rb"|\[redacted: \d+ bytes\]|<[A-Za-z]+>")


def treatments_of(selector: int) -> dict[str, Treatment]:
    """Two fields, three treatments each, from one byte."""
    return {name: _CHOICES[(selector >> (2 * i)) % 3] for i, name in enumerate(HIDEABLE_FIELDS)}


def as_bytes(value: Any) -> bytes | None:
    """A string value as the output carries it (packed without the bin type: bytes or str)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return value if isinstance(value, bytes) else None


def treat(raw: bytes, treatments: dict[str, Treatment]) -> None:
    """Treat one input and check that what is hidden is gone."""
    out, removed = treat_raw(raw, treatments)
    check(isinstance(out, bytes) and isinstance(removed, list), "treat_raw returned wrong types")
    hidden = [name for name, how in treatments.items() if how != "keep"]
    if not hidden or not out:
        return
    value = msgpack.unpackb(out, raw=True, strict_map_key=False)
    for name in hidden:
        key, index = _WHERE[name]
        if isinstance(value, dict):
            left = value.get(key)
        else:
            # A row keeps every field in place; a shorter output is no row.
            left = value[index] if isinstance(value, list) and len(value) == 8 else None
        if left is not None:
            kept = as_bytes(left)
            check(
                kept is not None and _LEFT.fullmatch(kept) is not None,
                f"{name} kept as {left!r:.120} under {treatments[name]}",
            )


def test_one_input(data: bytes) -> None:
    """libFuzzer's entry point."""
    if not data:
        return
    treatments = treatments_of(data[0])
    treat(data[1:], treatments)
    fdp = atheris.FuzzedDataProvider(data[1:])
    record = go_record_map(fdp)
    structured: Any = record if fdp.ConsumeBool() else [record.get(key) for key in GO_KEYS]
    treat(pack(structured), treatments)


if __name__ == "__main__":
    fuzz(test_one_input)
