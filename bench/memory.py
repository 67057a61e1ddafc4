"""Benchmark 7: memory stays bounded - the reporter under a broker outage, the worker over a soak.

    .venv/bin/python bench/memory.py [--outage-s 30] [--soak-s 60] [--rate 10000] [--quick]

Full run: ``--soak-s 600`` (10 minutes).

Reporter under outage: bench/producer.py offers records flat out (a new record object per call)
to a reporter whose broker is a closed port; refused records are dropped by the caller. Its RSS
is sampled every 0.5 s. Baseline: the same loop in a process with analytics disabled. The RSS
must plateau once the buffer is full: the median RSS of the last quarter of the run against that
of the second quarter is the figure.

Worker soak: a ``celery -A app worker -c 2`` (Redis database 12, CSV pump) fed at ``--rate``
records/s by a reporter process for ``--soak-s`` seconds. The RSS of the worker (main process and
pool children together) and of the reporter is sampled every second; after a warm-up, the
median of the last fifth of the samples is compared with the median of the first fifth.

Targets: reporter growth from the second to the last quarter <= 5% (plateau); worker and
reporter growth over the soak <= 5% (flat).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from benchlib import (
    Row,
    bench_config,
    flush_bench_db,
    fmt_rate,
    free_port,
    interference_row,
    print_table,
    read_json,
    rss_bytes,
    save_rows,
    session,
    tree_pids,
    write_config,
)

TITLE = "7. memory"
GROWTH_LIMIT = 0.05
MB = 1024 * 1024


def _mb(value: float) -> str:
    return f"{value / MB:.1f} MB"


def _slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 3:
        return float("nan")
    xs = [t for t, _ in samples]
    ys = [r / MB for _, r in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return cov / var * 60 if var else float("nan")


def growth(samples: list[tuple[float, int]], *, after_s: float) -> tuple[float, float, float]:
    """(first fifth median, last fifth median, relative growth) of samples after ``after_s``."""
    kept = [s for s in samples if s[0] >= after_s]
    fifth = max(1, len(kept) // 5)
    first = statistics.median(r for _, r in kept[:fifth])
    last = statistics.median(r for _, r in kept[-fifth:])
    return first, last, (last - first) / first


def reporter_outage(current: Any, duration_s: float) -> list[Row]:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    results: dict[str, dict[str, Any]] = {}
    for mode in ("disabled", "outage"):
        out = current.tmp / f"producer-{mode}.json"
        args = ["--broker-url", closed, "--duration", str(duration_s), "--out", str(out)]
        args += ["--rss-every", "0.5", "--drop-refused", "--stop-timeout", "1"]
        if mode == "disabled":
            args.append("--disabled")
        proc = current.producer(*args, log_name=f"producer-{mode}.log")
        proc.wait(duration_s + 60)
        current.stop(proc)
        results[mode] = read_json(out)
    outage = results["outage"]
    # Only while records were offered (the last sample is taken after stop()).
    samples = [(t, r) for t, r in outage["rss"] if t <= outage["offered_s"]]
    base_peak = max(r for _, r in results["disabled"]["rss"])
    peak = max(r for _, r in samples)
    # Medians of the second and the last quarter: a retry's transient buffers (megabytes per
    # attempt) make single samples jump.
    mid = statistics.median(r for t, r in samples if duration_s * 0.25 <= t <= duration_s * 0.5)
    end = statistics.median(r for t, r in samples if duration_s * 0.75 <= t <= duration_s)
    second_half = (end - mid) / mid
    stats = outage["stats"]
    held = stats["lost_at_stop"]
    per_record = (peak - base_peak) / held if held else float("nan")
    return [
        Row(
            "reporter RSS, broker down: 4th vs 2nd quarter",
            f"{second_half:+.1%} ({_mb(mid)} -> {_mb(end)})",
            f"disabled peak {_mb(base_peak)}",
            f"{peak / base_peak:.2f}x peak",
            f"<= {GROWTH_LIMIT:.0%}",
            second_half <= GROWTH_LIMIT,
            f"{outage['offered']:,} records offered flat out for {duration_s:.0f} s "
            f"({fmt_rate(outage['offered'] / outage['offered_s'])}); accepted and held "
            f"{held:,} (buffer + cut batches), refused {outage['refused']:,}; "
            f"~{per_record:,.0f} bytes per held record (peak - disabled peak); slope over the "
            "2nd half "
            f"{_slope_mb_per_min([s for s in samples if s[0] >= duration_s / 2]):+.2f} MB/min",
        )
    ]


def worker_soak(current: Any, soak_s: float, rate: float, warmup_s: float) -> list[Row]:
    flush_bench_db()
    config = write_config(current.tmp / "config.yaml", bench_config(current.tmp))
    worker = current.worker(config, concurrency=2)
    out = current.tmp / "producer-soak.json"
    producer = current.producer(
        "--config",
        str(config),
        "--rate",
        str(rate),
        "--duration",
        str(soak_s),
        "--rss-every",
        "1",
        "--out",
        str(out),
        log_name="producer-soak.log",
    )
    start = time.monotonic()
    samples: list[tuple[float, int]] = []
    main_samples: list[tuple[float, int]] = []
    while producer.popen.poll() is None:
        now = time.monotonic() - start
        samples.append((now, sum(rss_bytes(p) for p in tree_pids(worker.pid))))
        main_samples.append((now, rss_bytes(worker.pid)))
        time.sleep(1.0)
    result = read_json(out)
    current.stop(worker)
    first, last, worker_growth = growth(samples, after_s=warmup_s)
    main_first, main_last, main_growth = growth(main_samples, after_s=warmup_s)
    pool = [(t, r - m) for (t, r), (_, m) in zip(samples, main_samples, strict=True)]
    pool_first, pool_last, pool_growth = growth(pool, after_s=warmup_s)
    reporter = [(t, r) for t, r in result["rss"] if t <= result["offered_s"]]
    r_first, r_last, reporter_growth = growth(reporter, after_s=warmup_s)
    shipped = result["stats"]["shipped_records"]
    return [
        Row(
            f"worker RSS over a {soak_s:.0f} s soak (-c 2, all processes)",
            f"{worker_growth:+.1%} ({_mb(first)} -> {_mb(last)})",
            target=f"<= {GROWTH_LIMIT:.0%}",
            met=worker_growth <= GROWTH_LIMIT,
            note=f"{shipped:,} records at {fmt_rate(rate)} offered; first vs last fifth after "
            f"{warmup_s:.0f} s warm-up; slope "
            f"{_slope_mb_per_min([s for s in samples if s[0] >= warmup_s]):+.2f} MB/min; main "
            f"process {main_growth:+.1%} ({_mb(main_first)} -> {_mb(main_last)}), pool "
            f"processes {pool_growth:+.1%} ({_mb(pool_first)} -> {_mb(pool_last)})",
        ),
        Row(
            "reporter RSS over the soak",
            f"{reporter_growth:+.1%} ({_mb(r_first)} -> {_mb(r_last)})",
            target=f"<= {GROWTH_LIMIT:.0%}",
            met=reporter_growth <= GROWTH_LIMIT,
            note=f"slope {_slope_mb_per_min([s for s in reporter if s[0] >= warmup_s]):+.2f} "
            "MB/min",
        ),
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--soak-s", type=float, default=60.0, help="600 for the full run")
    parser.add_argument("--rate", type=float, default=10_000.0, help="soak records/s")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--parts", default="outage,soak", help="outage, soak or both")
    parser.add_argument("--quick", action="store_true", help="40 s soak")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    outage_s, soak_s = (args.outage_s, 40.0) if args.quick else (args.outage_s, args.soak_s)
    flush_bench_db()
    rows: list[Row] = []
    with session("memory") as current:
        if "outage" in args.parts:
            rows += reporter_outage(current, outage_s)
        if "soak" in args.parts:
            rows += worker_soak(current, soak_s, args.rate, min(args.warmup, soak_s / 4))
    interference = interference_row()
    if interference:
        rows.append(interference)
    flush_bench_db()
    print_table(TITLE, rows)
    save_rows(args.save, TITLE, rows)
    return rows


if __name__ == "__main__":
    main()
