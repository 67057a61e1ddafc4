"""A reporter host: ``record_hit`` at a steady rate until SIGTERM, then ``stop()``.

Writes, under ``--out``: ``accepted`` (the request of every record ``record_hit`` accepted, one a
line), ``progress.json`` (the reporter's counters, every 0.5 s) and, once stopped, ``final.json``.

    python -m tests.network.reporter --config c.yaml --rate 200 --tag cut-a --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord, AnalyticsStats


def _dump(path: Path, stats: AnalyticsStats, **extra: Any) -> None:
    body = dataclasses.asdict(stats) | {"accepted": stats.accepted, "at": time.time()} | extra
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(body))
    partial.replace(path)


def main() -> None:
    """Report until SIGTERM; ``--limit`` stops after that many accepted records."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--rate", type=float, required=True, help="records/s; 0 = flat out")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    analytics = Analytics(AnalyticsOptions.from_yaml(args.config))
    analytics.start()
    print("reporter: started", flush=True)
    accepted_ids: list[str] = []
    next_progress = 0.0
    started = time.monotonic()
    index = 0
    with (args.out / "accepted").open("w", encoding="utf-8") as accepted:
        while not stopping.is_set() and not (args.limit and len(accepted_ids) >= args.limit):
            request = f"{args.tag}-{index}"
            record = AnalyticsRecord(username=f"user-{index % 7}", effect="allow", request=request)
            index += 1
            if analytics.record_hit(record):
                accepted_ids.append(request)
                accepted.write(request + "\n")
            elif not args.rate:
                time.sleep(0.001)  # flat out: wait for room rather than count refusals
            now = time.monotonic()
            if now >= next_progress:
                accepted.flush()
                _dump(args.out / "progress.json", analytics.stats(), attempted=index)
                next_progress = now + 0.5
            if args.rate:
                pause = started + index / args.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
    stats = analytics.stop(timeout_s=180)
    _dump(args.out / "final.json", stats, attempted=index, recorded=len(accepted_ids))
    print(f"reporter: stopped {stats}", flush=True)


if __name__ == "__main__":
    main()
