"""Benchmark 12: the end-to-end rate as a fraction of what the machine's cores allow.

    .venv/bin/python bench/ceiling.py [--duration 30] [--batch 5000] [--quick]

The ceiling: the per-record CPU of every stage (stage_costs.py, measured in this run: reporter
rows and pack, ingest decode and validate, write decode, size limit, CSV format and append) plus
the Redis server's CPU per record (``INFO cpu`` over the end-to-end run, divided by its records),
and ``2 cores / that sum`` records/s. The machine has 2 cores shared by the reporter, the worker
and Redis, so no arrangement of this code can go faster than the ceiling; what is missing is the
cost of Celery, kombu, the processes' own loops and the kernel (and other load on the machine).

The end-to-end rate is e2e_csv.py's sustained on-disk rate with batch ``--batch``.

Target: end to end >= 0.5 of the ceiling.
"""

from __future__ import annotations

import argparse

import stage_costs
from benchlib import (
    Row,
    bench_redis,
    flush_bench_db,
    fmt_rate,
    interference_row,
    miss,
    print_table,
    redis_cpu_s,
    save_rows,
    session,
)
from e2e_csv import run_pipeline

TITLE = "12. share of the CPU ceiling"
TARGET = 0.5
CORES = 2


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="12 s run, 4 s warm-up")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    duration_s, warmup_s = (12.0, 4.0) if args.quick else (args.duration, args.warmup)
    measured = stage_costs.measure(args.batch, rounds=3)
    stages = [
        (part, name, us)
        for part, name, us in measured
        if part in ("reporter", "ingest", "write") and not name.startswith("  ")
    ]
    client = bench_redis()
    with session("ceiling") as current:
        before = redis_cpu_s(client)
        result = run_pipeline(current, args.batch, 2, duration_s, warmup_s)
        redis_s = redis_cpu_s(client) - before
    interference = interference_row()
    client.close()
    flush_bench_db()
    redis_us = redis_s / max(1, result.final_rows) * 1e6
    total_us = sum(us for _, _, us in stages) + redis_us
    ceiling = CORES * 1e6 / total_us
    share = result.sustained / ceiling
    parts = "; ".join(f"{part}: {name} {us:.2f}" for part, name, us in stages)
    rows = [
        Row(
            "per-record CPU of every stage (sum)",
            f"{total_us:.2f} us",
            note=f"{parts}; Redis server {redis_us:.2f} (INFO cpu over the run / its records)",
        ),
        Row("ceiling: 2 cores / per-record CPU", fmt_rate(ceiling)),
        Row(
            f"end to end (batch {args.batch}, -c 2) as a share of the ceiling",
            fmt_rate(result.sustained),
            f"ceiling {fmt_rate(ceiling)}",
            f"{share:.2f}",
            f">= {TARGET}",
            share >= TARGET,
            miss(share, TARGET, higher_is_better=True)
            + " [the rest: Celery and kombu, the worker and reporter loops, the kernel, and "
            "whatever else runs on the machine]",
        ),
    ]
    if interference:
        rows.append(interference)
    print_table(TITLE, rows)
    series = {
        "stages": stages,
        "redis_us": redis_us,
        "ceiling": ceiling,
        "e2e": result.sustained,
        "share": share,
    }
    save_rows(args.save, TITLE, rows, series=series)
    return rows


if __name__ == "__main__":
    main()
