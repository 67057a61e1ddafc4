"""What dead letters keep of the record fields that carry request bodies and policy text.

``request`` and ``policies`` (:data:`~app.record.RECORD_FIELDS`) hold whatever the application
authorized: request bodies, policy documents. A dead letter keeps records for days, readable by
anyone with access to Redis, so each group can keep them (``keep``, the default), replace them
with a placeholder that tells only their size (``redact``) or empty them (``drop``).

The treatment is applied to the stored entry as a whole: the records of a replayable batch, the
raw bytes of input that could not be decoded, and the error texts (a sink's message that echoes a
value has that value cut out). Raw bytes whose fields cannot be found are not kept at all when
any field is to be hidden, since their layout is unknown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict

from app.record import RECORD_FIELDS, FieldKind, RecordField

#: How a dead letter treats one field: as it is, a placeholder with its size, or emptied.
Treatment = Literal["keep", "redact", "drop"]
KEEP: Treatment = "keep"
#: The fields that can be hidden, by :class:`~app.record.AnalyticsRecord` attribute.
HIDEABLE_FIELDS: tuple[str, ...] = ("request", "policies")
#: Values shorter than this are not cut out of error texts (they would match ordinary words).
MIN_SCRUBBED_LENGTH = 4

_ROW_INDEX = {spec.attribute: index for index, spec in enumerate(RECORD_FIELDS)}


class DeadLetterFields(BaseModel):
    """A ``dead-letters:`` block: ``request`` and ``policies``, each keep, redact or drop.

    A field left out (or null) in a pump's block takes the top-level block's value; left out
    there, it is kept.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    request: Treatment | None = None
    policies: Treatment | None = None

    def over(self, fallback: DeadLetterFields) -> dict[str, Treatment]:
        """Every hideable field's treatment: this block's, else ``fallback``'s, else keep."""
        return {
            name: getattr(self, name) or getattr(fallback, name) or KEEP for name in HIDEABLE_FIELDS
        }


def hidden(treatments: Mapping[str, Treatment]) -> dict[str, Treatment]:
    """Only the fields that are not kept."""
    return {name: how for name, how in treatments.items() if how != KEEP}


def placeholder(value: str) -> str:
    """What ``redact`` leaves of a value: its size, nothing of its content."""
    return f"[redacted: {len(value.encode('utf-8', 'surrogatepass'))} bytes]" if value else ""


def treated(value: Any, how: Treatment) -> Any:
    """One value treated: kept, replaced by its placeholder, or emptied."""
    if how == KEEP:
        return value
    if how == "drop":
        return ""
    return placeholder(value if isinstance(value, str) else repr(value))


def treat_clean_batch(
    payload: bytes, treatments: Mapping[str, Treatment]
) -> tuple[bytes, list[str]]:
    """A clean batch with the fields treated, and the original values that were hidden."""
    batch = msgpack.unpackb(payload, raw=False)
    removed: list[str] = []
    for row in batch["records"]:
        for name, how in hidden(treatments).items():
            index = 1 + _ROW_INDEX[name]  # a clean row starts with the record's position
            removed.append(str(row[index]))
            row[index] = treated(row[index], how)
    return bytes(msgpack.packb(batch)), removed


def treat_raw(raw: bytes, treatments: Mapping[str, Treatment]) -> tuple[bytes, list[str]]:
    """Bytes of a record that could not be decoded, with the fields treated where they can be
    found (a Go record's map, a reporter's row), else nothing; and the values hidden.

    In what is kept, a value of the wrong type for its field (a string where the timestamp
    belongs) is replaced by its type's name, and keys that are no record field are left out:
    their content is unknown.
    """
    wanted = hidden(treatments)
    if not wanted:
        return raw, []
    try:
        # Strings stay bytes, so a record whose strings are not UTF-8 is treated like any other.
        value = msgpack.unpackb(raw, raw=True, strict_map_key=False)
    except Exception:
        return b"", []
    if isinstance(value, dict):
        by_name = {spec.go_name.encode(): spec for spec in RECORD_FIELDS}
        fields = [(by_name[key], item) for key, item in value.items() if key in by_name]
    elif isinstance(value, list) and len(value) == len(RECORD_FIELDS):
        fields = list(zip(RECORD_FIELDS, value, strict=True))
    else:
        return b"", []
    removed: list[str] = []
    kept: list[tuple[RecordField, Any]] = []
    for spec, item in fields:
        if not _fits(spec, item):
            item = f"<{'str' if isinstance(item, bytes) else type(item).__name__}>".encode()
        elif spec.attribute in wanted:
            removed.append(item.decode("utf-8", "replace"))
            item = treated(item.decode("utf-8", "surrogateescape"), wanted[spec.attribute])
        kept.append((spec, item))
    if isinstance(value, dict):
        out: Any = {spec.go_name: item for spec, item in kept}
    else:
        out = [item for _, item in kept]
    return bytes(msgpack.packb(out, use_bin_type=False)), removed


def _fits(spec: RecordField, value: Any) -> bool:
    # Whether a raw value has its field's type (strings unpacked as bytes).
    if spec.kind is FieldKind.STR:
        return isinstance(value, bytes)
    if spec.kind is FieldKind.INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None or isinstance(value, msgpack.Timestamp)


def scrub(text: str, values: Iterable[str]) -> str:
    """``text`` with every occurrence of the given values cut out (longest first)."""
    for value in sorted(set(values), key=len, reverse=True):
        if len(value) >= MIN_SCRUBBED_LENGTH and value in text:
            text = text.replace(value, "[redacted]")
    return text
