"""A reporter process for the benchmarks: ``Analytics.record_hit`` at a set rate or flat out.

Started as a subprocess by e2e_csv.py, latency.py, memory.py and scale_out.py, so the reporter
has a process of its own (as in an application) and its CPU and memory can be measured apart::

    python bench/producer.py --config c.yaml --duration 30 [--rate 10000] [--stamp] --out r.json

* ``--rate 0`` (the default) offers records flat out; a refused record (buffer full) is offered
  again after a short sleep, unless ``--drop-refused``, so every record counted is accepted.
* ``--stamp`` puts the send time (``lat=<ns>``) in each record's conclusion, for latency.py.
* ``--broker-url`` overrides the broker (a closed port makes the broker unreachable).
* ``--rss-every S`` samples this process's RSS every S seconds into the result.
* ``--disabled`` runs the same loop with analytics disabled (the memory baseline).

The result (counts, reporter stats, RSS samples) is written as JSON to ``--out`` after stop().
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import make_record, rss_bytes

from app.analytics import Analytics, AnalyticsOptions

REFUSED_SLEEP_S = 0.0005
PACE_TICK_S = 0.001
CHUNK = 200
STOP_TIMEOUT_S = 60.0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _options(args: argparse.Namespace) -> AnalyticsOptions:
    options = AnalyticsOptions.from_yaml(args.config) if args.config else AnalyticsOptions()
    changes: dict[str, Any] = {}
    if args.broker_url:
        changes["broker_url"] = args.broker_url
        changes["redis_url"] = args.broker_url
    if args.disabled:
        changes["enable"] = False
    return dataclasses.replace(options, **changes) if changes else options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--broker-url")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="records/s; 0 = flat out")
    parser.add_argument("--stamp", action="store_true")
    parser.add_argument("--drop-refused", action="store_true")
    parser.add_argument("--disabled", action="store_true")
    parser.add_argument("--rss-every", type=float, default=0.0)
    parser.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT_S)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)

    analytics = Analytics(_options(args))
    rss: list[tuple[float, int]] = []
    done = threading.Event()
    origin = time.monotonic()

    def sample() -> None:
        while not done.wait(args.rss_every):
            rss.append((time.monotonic() - origin, rss_bytes_self()))

    if args.rss_every:
        rss.append((0.0, rss_bytes_self()))
        threading.Thread(target=sample, daemon=True).start()
    analytics.start()
    hit = analytics.record_hit
    retry = not args.drop_refused and not args.disabled
    stamp = args.stamp
    sent = refused = 0
    start = time.monotonic()
    end = start + args.duration
    interrupted = False
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if args.rate:
                due = min(int((now - start) * args.rate), int(args.duration * args.rate)) - sent
            else:
                due = CHUNK
            for _ in range(due):
                record = make_record(sent, stamp_ns=time.time_ns() if stamp else None)
                while not hit(record):
                    if not retry:
                        refused += 1
                        break
                    time.sleep(REFUSED_SLEEP_S)
                sent += 1
            if args.rate:
                time.sleep(PACE_TICK_S)
    except KeyboardInterrupt:
        interrupted = True
    offered_s = time.monotonic() - start
    stop_start = time.monotonic()
    stats = analytics.stop(timeout_s=args.stop_timeout)
    stop_s = time.monotonic() - stop_start
    done.set()
    if args.rss_every:
        rss.append((time.monotonic() - origin, rss_bytes_self()))
    result = {
        "offered": sent,
        "refused": refused,
        "accepted": sent - refused,
        "offered_s": offered_s,
        "stop_s": stop_s,
        "interrupted": interrupted,
        "stats": dataclasses.asdict(stats),
        "rss": rss,
    }
    Path(args.out).write_text(json.dumps(result), encoding="utf-8")


def rss_bytes_self() -> int:
    return rss_bytes(os.getpid())


if __name__ == "__main__":
    main()
