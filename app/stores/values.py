"""redis-py answers ``bytes`` (we never ask it to decode); these make that explicit for typing."""

from __future__ import annotations

from typing import Any


def as_bytes(value: Any) -> bytes:
    """A Redis reply value as bytes."""
    return value if isinstance(value, bytes) else str(value).encode()


def as_text(value: Any) -> str:
    """A Redis reply value as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
