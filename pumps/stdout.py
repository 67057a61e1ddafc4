"""JSON lines on standard output, one object per record; at-least-once."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from app.record import AnalyticsRecord
from pumps.base import Pump
from pumps.errors import PumpTemporaryError


class StdoutPump(Pump):
    """Prints each record as one JSON object per line (handy under a log collector)."""

    def write(self, records: Sequence[AnalyticsRecord]) -> None:
        lines = []
        for record in records:
            document = record.to_dict()
            expire_at = record.expire_at
            document["expireAt"] = expire_at.isoformat() if expire_at is not None else None
            lines.append(json.dumps(document, ensure_ascii=False))
        try:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
        except OSError as exc:
            raise PumpTemporaryError(f"cannot write to stdout: {exc.strerror}") from exc
