"""Benchmark 8: collector throughput with 1 and 2 worker processes, and Redis CPU per record.

    .venv/bin/python bench/scale_out.py [--records 500000] [--batch 5000] [--quick]

For each layout the ingest queue (Redis database 12) is first filled with ``--records`` records
in reporter batches (the exact bytes the reporter sends, through the same Celery transport), then
the workers start and drain it into CSV. The rate is rows on disk per second from the first row
to the last, so the producer's CPU does not compete with the workers. Layouts: one worker with
``-c 1``, one with ``-c 2``, and two workers with ``-c 1`` each (two nodes).

Redis CPU (``INFO cpu``, user + sys) is read before and after the fill and the drain; the sum
per record says how many records/s one Redis core carries for this pipeline (Redis is single
threaded). The server is shared with whatever else runs on this machine, so run it on a quiet one.
"""

from __future__ import annotations

import argparse
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from benchlib import (
    BENCH_REDIS_URL,
    INTERFERENCE,
    CsvCounter,
    Row,
    bench_config,
    bench_redis,
    db_untouched,
    flush_bench_db,
    fmt_rate,
    fmt_ratio,
    make_record,
    print_table,
    redis_cpu_s,
    save_rows,
    session,
    write_config,
)

from app.config import DEFAULT_KEY_PREFIX
from app.transports import CeleryTransport

TITLE = "8. scale-out"
DRAIN_TIMEOUT_S = 600.0
STALL_TIMEOUT_S = 30.0
LAYOUTS: list[tuple[str, list[int]]] = [
    ("1 worker -c 1", [1]),
    ("1 worker -c 2", [2]),
    ("2 workers -c 1", [1, 1]),
]


def fill(records: int, batch: int) -> float:
    """Queue ``records`` records as reporter batches; returns the Redis CPU seconds it took."""
    client = bench_redis()
    transport = CeleryTransport(BENCH_REDIS_URL, key_prefix=DEFAULT_KEY_PREFIX)
    expire_at = datetime.now(UTC) + timedelta(days=1)
    template = [make_record(i) for i in range(batch)]
    rows = [
        [
            r.timestamp,
            r.username,
            r.effect,
            r.conclusion,
            r.request,
            r.policies,
            r.deciders,
            expire_at,
        ]
        for r in template
    ]
    before = redis_cpu_s(client)
    for start in range(0, records, batch):
        transport.ship(uuid.uuid4().hex, rows[: min(batch, records - start)])
    used = redis_cpu_s(client) - before
    transport.close()
    client.close()
    return used


def drain(current: Any, layout: list[int], records: int, batch: int) -> dict[str, float]:
    flush_bench_db()
    tmp = current.tmp / f"layout-{'-'.join(map(str, layout))}-{len(current.procs)}"
    tmp.mkdir()
    config = write_config(tmp / "config.yaml", bench_config(tmp))
    fill_cpu = fill(records, batch)
    client = bench_redis()
    counter = CsvCounter(tmp / "csv")
    cpu_before = redis_cpu_s(client)
    workers = [
        current.worker(config, concurrency=c, name=f"so{index}-{c}")
        for index, c in enumerate(layout)
    ]
    first: tuple[float, int] | None = None
    last = (time.monotonic(), 0)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while last[1] < records and time.monotonic() < deadline:
        time.sleep(0.1)
        count = counter.count()
        now = time.monotonic()
        if first is None and count:
            first = (now, count)
        if count != last[1]:
            last = (now, count)
        elif now - last[0] > STALL_TIMEOUT_S:
            break
    drain_cpu = redis_cpu_s(client) - cpu_before
    untouched = db_untouched()
    client.close()
    for worker in workers:
        current.stop(worker)
    rate = (last[1] - first[1]) / (last[0] - first[0]) if first and last[0] > first[0] else 0.0
    return {
        "rate": rate,
        "rows": float(last[1]),
        "fill_cpu_per_record": fill_cpu / records,
        "drain_cpu_per_record": drain_cpu / max(last[1], 1),
        "untouched": float(untouched),
    }


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=5000, help="records per reporter batch")
    parser.add_argument("--quick", action="store_true", help="150,000 records")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    records = 150_000 if args.quick else args.records
    results: dict[str, dict[str, float]] = {}
    with session("scale-out") as current:
        for name, layout in LAYOUTS:
            results[name] = drain(current, layout, records, args.batch)
            print(f"  {name}: {fmt_rate(results[name]['rate'])}", flush=True)
    flush_bench_db()
    base = results[LAYOUTS[0][0]]["rate"]
    rows = []
    for name, result in results.items():
        rows.append(
            Row(
                f"{name}: drain rate on disk",
                fmt_rate(result["rate"]),
                f"-c 1 {fmt_rate(base)}",
                fmt_ratio(result["rate"] / base) if base else "n/a",
                note=f"{int(result['rows']):,} of {records:,} rows"
                if result["rows"] < records
                else "",
            )
        )
    fill_us = min(r["fill_cpu_per_record"] for r in results.values()) * 1e6
    drain_us = min(r["drain_cpu_per_record"] for r in results.values()) * 1e6
    total_us = fill_us + drain_us
    rows.append(
        Row(
            "Redis CPU per record (send + collect)",
            f"{total_us:.2f} us",
            note=f"reporter send {fill_us:.2f} us + collector {drain_us:.2f} us (lowest of "
            f"{len(results)} layouts, batch {args.batch}); one Redis core carries about "
            f"{fmt_rate(1e6 / total_us)} of this pipeline at 100% CPU",
        )
    )
    if not all(r["untouched"] for r in results.values()):
        rows.append(INTERFERENCE)
    print_table(TITLE, rows)
    series = {
        "layouts": list(results),
        "processes": [sum(layout) for _, layout in LAYOUTS if _ in results],
        "rate": [r["rate"] for r in results.values()],
    }
    save_rows(args.save, TITLE, rows, series=series)
    return rows


if __name__ == "__main__":
    main()
