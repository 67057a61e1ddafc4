"""The analytics record: one per authorization request, with iam's fields."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

#: Field names in iam's Go struct order; also the CSV header and the msgpack map keys.
GO_FIELD_NAMES: tuple[str, ...] = (
    "TimeStamp",
    "Username",
    "Effect",
    "Conclusion",
    "Request",
    "Policies",
    "Deciders",
    "ExpireAt",
)

#: The Go zero time (0001-01-01 00:00:00 UTC), which a Go producer sends for an unset ExpireAt.
GO_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class AnalyticsRecord:
    """One authorization decision, as iam-authz-server records it.

    ``timestamp`` is Unix seconds. ``expire_at`` tells stores that support it (MongoDB's TTL
    index) when to forget the record; the reporter fills it from ``storage-expiration-time`` when
    it is left as ``None``. ``id`` is assigned by the pipeline (batch id and position) and is the
    same on every redelivery, so upserting sinks write each record once.
    """

    timestamp: int = field(default_factory=lambda: int(time.time()))
    username: str = ""
    effect: str = ""
    conclusion: str = ""
    request: str = ""
    policies: str = ""
    deciders: str = ""
    expire_at: datetime | None = None
    id: str = ""

    def to_dict(self) -> dict[str, object]:
        """The record as a plain dict with iam's JSON field names (``expireAt`` as a datetime)."""
        return {
            "id": self.id,
            "timestamp": self.timestamp,
            "username": self.username,
            "effect": self.effect,
            "conclusion": self.conclusion,
            "request": self.request,
            "policies": self.policies,
            "deciders": self.deciders,
            "expireAt": self.expire_at,
        }
