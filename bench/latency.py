"""Benchmark 5: time from ``record_hit`` to the record being in the CSV file, at a set rate.

    .venv/bin/python bench/latency.py [--rate 10000] [--duration 60] [--quick]

Default settings everywhere (``analytics:`` defaults: pool-size 4, records-buffer-size 20000,
flush-interval 200 ms; a ``celery -A app worker -c 2``). A reporter process (bench/producer.py
``--stamp``) offers ``--rate`` records/s, each carrying its ``time.time_ns()`` at ``record_hit``;
this process tails the CSV files every 20 ms and takes, for each row, the time it was seen minus
that stamp (so the figures include up to one polling interval). Records of the warm-up are left
out.

Targets: p50 <= 1 s, p99 <= 3 s.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from benchlib import (
    Row,
    bench_config,
    flush_bench_db,
    fmt_ns,
    fmt_rate,
    interference_row,
    miss,
    percentile,
    print_table,
    read_json,
    save_rows,
    session,
    write_config,
)

TITLE = "5. latency record_hit -> CSV"
P50_TARGET_S = 1.0
P99_TARGET_S = 3.0
POLL_S = 0.02
#: Points of the latency distribution saved with the rows (``--save``), for bench/charts.py.
CDF_POINTS = 200
TAIL_AFTER_S = 30.0
STAMP = re.compile(rb"lat=(\d+)")


class Tailer:
    """Reads complete new lines of the CSV files of a folder and collects their latencies."""

    def __init__(self, directory: Path, *, since_ns: int) -> None:
        self.directory = directory
        self.since_ns = since_ns
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}
        self.latencies_ns: list[int] = []
        self.rows = 0

    def poll(self) -> None:
        if not self.directory.is_dir():
            return
        for path in self.directory.glob("*.csv"):
            offset = self.offsets.get(path, 0)
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
            seen_ns = time.time_ns()
            if not data:
                continue
            self.offsets[path] = offset + len(data)
            data = self.partial.pop(path, b"") + data
            cut = data.rfind(b"\n") + 1
            self.partial[path] = data[cut:]
            for match in STAMP.finditer(data, 0, cut):
                stamp = int(match.group(1))
                self.rows += 1
                if stamp >= self.since_ns:
                    self.latencies_ns.append(seen_ns - stamp)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=10_000.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="20 s, 3 s warm-up")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    duration_s, warmup_s = (20.0, 3.0) if args.quick else (args.duration, args.warmup)
    flush_bench_db()
    with session("latency") as current:
        config = write_config(current.tmp / "config.yaml", bench_config(current.tmp))
        current.worker(config, concurrency=args.concurrency)
        out = current.tmp / "producer.json"
        start_ns = time.time_ns()
        tailer = Tailer(current.tmp / "csv", since_ns=start_ns + int(warmup_s * 1e9))
        producer = current.producer(
            "--config",
            str(config),
            "--rate",
            str(args.rate),
            "--duration",
            str(duration_s),
            "--stamp",
            "--out",
            str(out),
        )
        while producer.popen.poll() is None:
            tailer.poll()
            time.sleep(POLL_S)
        result = read_json(out)
        accepted = int(result["stats"]["shipped_records"])
        deadline = time.monotonic() + TAIL_AFTER_S
        while tailer.rows < accepted and time.monotonic() < deadline:
            tailer.poll()
            time.sleep(POLL_S)
    interference = interference_row()
    flush_bench_db()
    ordered = sorted(tailer.latencies_ns)
    p50 = percentile(ordered, 0.5)
    p90 = percentile(ordered, 0.9)
    p99 = percentile(ordered, 0.99)
    offered_rate = result["offered"] / max(result["offered_s"], 1e-9)
    worst = ordered[-1] if ordered else 0
    detail = (
        f" [{len(ordered):,} records after a {warmup_s:.0f} s warm-up, offered "
        f"{fmt_rate(offered_rate)} for {duration_s:.0f} s; {tailer.rows:,} of {accepted:,} "
        f"accepted reached the file; p90 {fmt_ns(p90)}, max {fmt_ns(worst)}]"
    )
    rows = [
        Row(
            f"p50 at {args.rate:,.0f} records/s",
            fmt_ns(p50),
            target=f"<= {P50_TARGET_S:.0f} s",
            met=p50 <= P50_TARGET_S * 1e9,
            note=miss(p50 / 1e9, P50_TARGET_S, higher_is_better=False) + detail,
        ),
        Row(
            f"p99 at {args.rate:,.0f} records/s",
            fmt_ns(p99),
            target=f"<= {P99_TARGET_S:.0f} s",
            met=p99 <= P99_TARGET_S * 1e9,
            note=miss(p99 / 1e9, P99_TARGET_S, higher_is_better=False),
        ),
        Row(
            "records that never reached the file",
            f"{max(0, accepted - tailer.rows):,}",
            target="0",
            met=tailer.rows >= accepted,
        ),
    ]
    if interference:
        rows.append(interference)
    print_table(TITLE, rows)
    # For bench/charts.py's CDF: the latency at each of 200 evenly spaced quantiles.
    quantiles = [i / CDF_POINTS for i in range(1, CDF_POINTS + 1)]
    series = {
        "rate": args.rate,
        "records": len(ordered),
        "percentiles_s": {"p50": p50 / 1e9, "p90": p90 / 1e9, "p99": p99 / 1e9},
        "cdf": [[q, percentile(ordered, q) / 1e9] for q in quantiles] if ordered else [],
    }
    save_rows(args.save, TITLE, rows, series=series)
    return rows


if __name__ == "__main__":
    main()
