"""Benchmark 2: records/s one process can pack and hand to the broker, against a raw loop.

    .venv/bin/python bench/shipping.py [--duration 10] [--quick]

Baseline (same process, same Redis database 12, same records): ``msgpack.packb`` of each record
and one multi-value ``RPUSH`` per 1,000 records, as fast as it goes. It runs before and after the
reporter cases and the mean of the two is the baseline, so a drift of the machine shows.

Reporter cases: ``Analytics`` started with its real transport, fed flat out by ``record_hit`` from
the main thread (a refused record is offered again after 0.5 ms, as a busy application would keep
calling). The rate is ``shipped_records`` (batches the transport has handed over) per second,
measured after a warm-up. No worker runs: what reaches Redis is deleted every half second (the
raw loop's list; for the reporter, database 12 as a whole, since with the Redis broker the
envelopes are keys of their own beside the ingest queue).

Target: reporter >= 0.6x the raw loop.
"""

from __future__ import annotations

import argparse
import logging
import time
from datetime import UTC, datetime, timedelta

import msgpack
from benchlib import (
    BENCH_REDIS_URL,
    Row,
    bench_redis,
    flush_bench_db,
    fmt_rate,
    fmt_ratio,
    make_record,
    miss,
    print_table,
    save_rows,
)

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord

TITLE = "2. reporter shipping rate"
RATIO_TARGET = 0.6
RAW_BATCH = 1000
POOL_RECORDS = 20_000
WARMUP_S = 1.0
DISCARD_EVERY_S = 0.5
REFUSED_SLEEP_S = 0.0005
RAW_KEY = "bench:raw-list"


def raw_rate(records: list[AnalyticsRecord], duration_s: float) -> float:
    """packb per record + one RPUSH of 1,000 values, flat out; records/s."""
    client = bench_redis()
    expire_at = datetime.now(UTC) + timedelta(days=1)
    packb = msgpack.packb
    done = 0
    start = time.monotonic()
    last_discard = start
    end = start + duration_s
    index = 0
    while True:
        chunk = records[index : index + RAW_BATCH]
        index = (index + RAW_BATCH) % len(records)
        values = [
            packb(
                [
                    r.timestamp,
                    r.username,
                    r.effect,
                    r.conclusion,
                    r.request,
                    r.policies,
                    r.deciders,
                    expire_at,
                ],
                datetime=True,
            )
            for r in chunk
        ]
        client.rpush(RAW_KEY, *values)
        done += len(values)
        now = time.monotonic()
        if now - last_discard > DISCARD_EVERY_S:
            client.delete(RAW_KEY)
            last_discard = now
        if now >= end:
            break
    elapsed = time.monotonic() - start
    client.delete(RAW_KEY)
    client.close()
    return done / elapsed


def reporter_rate(
    records: list[AnalyticsRecord], options: AnalyticsOptions, duration_s: float
) -> float:
    """Feed the reporter flat out; returns the records/s shipped after the warm-up."""
    client = bench_redis()
    analytics = Analytics(options)
    analytics.start()
    hit = analytics.record_hit
    index = 0
    count = len(records)
    start = time.monotonic()
    last_discard = start
    mark: tuple[float, int] | None = None
    try:
        while True:
            for _ in range(200):
                record = records[index]
                index = (index + 1) % count
                while not hit(record):
                    time.sleep(REFUSED_SLEEP_S)
            now = time.monotonic()
            if now - last_discard > DISCARD_EVERY_S:
                client.flushdb(asynchronous=True)
                last_discard = now
            if mark is None and now - start >= WARMUP_S:
                mark = (now, analytics.stats().shipped_records)
            if now - start >= WARMUP_S + duration_s:
                break
        assert mark is not None
        end = (time.monotonic(), analytics.stats().shipped_records)
    finally:
        analytics.stop(timeout_s=30)
        client.flushdb()
        client.close()
    return (end[1] - mark[1]) / (end[0] - mark[0])


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--quick", action="store_true", help="4 s per case")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    duration_s = 4.0 if args.quick else args.duration
    # The feeder outruns the shippers on purpose: "buffer full" warnings are expected.
    logging.getLogger("app").setLevel(logging.ERROR)
    flush_bench_db()
    records = [make_record(i) for i in range(POOL_RECORDS)]
    base = AnalyticsOptions(broker_url=BENCH_REDIS_URL, redis_url=BENCH_REDIS_URL)
    cases = [
        ("celery transport, defaults (batch 5000)", base),
        (
            "celery transport, batch 1000",
            AnalyticsOptions(
                broker_url=BENCH_REDIS_URL, redis_url=BENCH_REDIS_URL, records_buffer_size=4000
            ),
        ),
        (
            "redis-list transport, defaults",
            AnalyticsOptions(
                broker_url=BENCH_REDIS_URL, redis_url=BENCH_REDIS_URL, transport="redis-list"
            ),
        ),
    ]
    raw_before = raw_rate(records, duration_s)
    results = [(name, reporter_rate(records, options, duration_s)) for name, options in cases]
    raw_after = raw_rate(records, duration_s)
    raw = (raw_before + raw_after) / 2
    rows = [
        Row(
            "raw packb + RPUSH x1000",
            fmt_rate(raw),
            note=f"before {fmt_rate(raw_before)}, after {fmt_rate(raw_after)}",
        )
    ]
    for name, rate in results:
        ratio = rate / raw
        if name.startswith("redis-list"):
            # iam's format: one msgpack map per record, keys and all; for comparison only.
            note = "informational: iam's per-record maps for a Go iam-pump, not the broker path"
            rows.append(Row(name, fmt_rate(rate), fmt_rate(raw), fmt_ratio(ratio), note=note))
            continue
        rows.append(
            Row(
                name,
                fmt_rate(rate),
                fmt_rate(raw),
                fmt_ratio(ratio),
                f">= {RATIO_TARGET}x raw",
                ratio >= RATIO_TARGET,
                miss(ratio, RATIO_TARGET, higher_is_better=True),
            )
        )
    print_table(TITLE, rows)
    save_rows(args.save, TITLE, rows)
    return rows


if __name__ == "__main__":
    main()
