"""JSON lines on standard output, one object per record; at-least-once."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from app.record import AnalyticsRecord, expiry
from pumps.base import NoMeta, Pump, WriteResult
from pumps.deadline import Deadline
from pumps.errors import PumpTemporaryError


class StdoutPump(Pump[NoMeta]):
    """Prints each record as one JSON object per line (handy under a log collector).

    ``expireAt`` is ISO 8601, or null when the record never expires.
    """

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Print the records; a closed or broken stdout is a temporary error."""
        if not records:
            return WriteResult()
        lines = []
        for record in records:
            document = record.to_dict()
            expire_at = expiry(record)
            document["expireAt"] = expire_at.isoformat() if expire_at is not None else None
            lines.append(json.dumps(document, ensure_ascii=False))
        try:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
        except OSError as exc:
            raise PumpTemporaryError(f"cannot write to stdout: {exc.strerror}") from exc
        return WriteResult()
