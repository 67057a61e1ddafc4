"""Records for contract tests: one batch, told apart by a unique ``username`` per record."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from app.record import AnalyticsRecord

#: A fixed time (2026-11-24 06:00 UTC) so time buckets and daily indices are known in advance.
NOW_S = 1_795_500_000
EXPIRE_AT = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)


def make_records(
    tag: str, count: int, *, batch: str | None = None, timestamp: int = NOW_S
) -> list[AnalyticsRecord]:
    """Records of one batch, each with a unique username and a request naming a resource."""
    batch = batch or uuid.uuid4().hex
    return [
        AnalyticsRecord(
            timestamp=timestamp + index,
            username=f"u-{tag}-{index}",
            effect="allow" if index % 3 else "deny",
            conclusion=f"conclusion {index}",
            request=json.dumps({"resource": f"res-{index % 2}", "action": "read", "n": index}),
            policies='[{"id": "p1"}]',
            deciders='[{"id": "d1"}]',
            expire_at=EXPIRE_AT,
            id=f"{batch}-{index}",
        )
        for index in range(count)
    ]


def copies(records: Sequence[AnalyticsRecord]) -> list[AnalyticsRecord]:
    """The same records as new objects, as a redelivered batch decodes them."""
    return [dataclasses.replace(record) for record in records]
