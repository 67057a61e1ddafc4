"""Benchmark 6: what analytics costs a WSGI application, driven by wrk, on and off in one run.

    .venv/bin/python bench/wsgi_overhead.py [--rounds 3] [--seconds 10] [--connections 8]
                                            [--workers 1] [--worker-class sync] [--quick]

Two gunicorn servers run bench/wsgi_app.py side by side, one with ``BENCH_ANALYTICS=1`` (each
request calls ``record_hit``; the reporter ships to Redis database 12) and one with
``BENCH_ANALYTICS=0``. wrk (``apt-get install wrk``) drives them in alternating rounds, off, on,
off, on, ..., so slow drifts of a noisy machine hit both; the median over rounds is reported.
No collector runs: what the reporter ships is deleted between rounds.

Target: requests/s and p99 latency with analytics on within 5% of off.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import time

from benchlib import (
    BENCH_REDIS_URL,
    PYTHON,
    Row,
    bench_redis,
    flush_bench_db,
    fmt_rate,
    fmt_ratio,
    free_port,
    print_table,
    save_rows,
    session,
)

from app.messages import INGEST_QUEUE

TITLE = "6. application overhead (gunicorn + wrk)"
TOLERANCE = 0.05
_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_wrk(output: str) -> tuple[float, float]:
    """Requests/s and p99 latency (s) from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    if not rps or not p99:
        raise RuntimeError(f"cannot read wrk output:\n{output}")
    return float(rps.group(1)), float(p99.group(1)) * _UNITS_S[p99.group(2)]


def run_wrk(port: int, seconds: float, connections: int) -> tuple[float, float]:
    output = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:.0f}s",
            "--latency",
            f"http://127.0.0.1:{port}/v1/authz?users:peter",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    return parse_wrk(output)


def wait_http(port: int, timeout_s: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
                response.read()
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"gunicorn on port {port} did not answer in {timeout_s}s")


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-class", default="sync")
    parser.add_argument(
        "--switch-interval",
        type=float,
        help="what-if: sys.setswitchinterval(S) in both servers (CPython default 0.005)",
    )
    parser.add_argument(
        "--what-if-transport",
        choices=["memory", "pack"],
        help="what-if: the reporter keeps batches in memory, or packs and drops them",
    )
    parser.add_argument(
        "--flush-interval-ms",
        type=int,
        help="what-if: the reporter's flush-interval (smaller batches, shorter C calls)",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 s")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    rounds, seconds = (2, 5.0) if args.quick else (args.rounds, args.seconds)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    flush_bench_db()
    discard = bench_redis()
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    shipped_messages = 0
    with session("wsgi") as current:
        ports = {}
        for mode in ("off", "on"):
            port = free_port()
            ports[mode] = port
            current.start(
                [
                    PYTHON,
                    "-m",
                    "gunicorn",
                    "-w",
                    str(args.workers),
                    "-k",
                    args.worker_class,
                    "-b",
                    f"127.0.0.1:{port}",
                    "--log-level",
                    "warning",
                    "wsgi_app:application",
                ],
                log_name=f"gunicorn-{mode}.log",
                env={
                    "BENCH_ANALYTICS": "1" if mode == "on" else "0",
                    "BENCH_BROKER_URL": BENCH_REDIS_URL,
                    "BENCH_SWITCH_INTERVAL_S": str(args.switch_interval or ""),
                    "BENCH_REPORTER_TRANSPORT": args.what_if_transport or "",
                    "BENCH_FLUSH_INTERVAL_MS": str(args.flush_interval_ms or ""),
                },
            )
        for port in ports.values():
            wait_http(port)
        # A short warm-up of each, not counted.
        for mode in ("off", "on"):
            run_wrk(ports[mode], 2, args.connections)
        for _ in range(rounds):
            for mode in ("off", "on"):
                discard.delete(INGEST_QUEUE)
                results[mode].append(run_wrk(ports[mode], seconds, args.connections))
                if mode == "on":
                    shipped_messages += int(discard.llen(INGEST_QUEUE))
    discard.close()
    flush_bench_db()
    rps = {m: statistics.median(r for r, _ in results[m]) for m in results}
    p99 = {m: statistics.median(p for _, p in results[m]) for m in results}
    rps_ratio = rps["on"] / rps["off"]
    p99_ratio = p99["on"] / p99["off"]
    setup = (
        f"gunicorn -w {args.workers} -k {args.worker_class}, wrk -c {args.connections}, "
        + (f"switch interval {args.switch_interval} s, " if args.switch_interval else "")
        + (f"transport {args.what_if_transport}, " if args.what_if_transport else "")
        + (f"flush {args.flush_interval_ms} ms, " if args.flush_interval_ms else "")
        + f"{rounds} alternating rounds of {seconds:.0f} s; each: "
    )
    rows = [
        Row(
            "requests/s, analytics on",
            fmt_rate(rps["on"]),
            f"off {fmt_rate(rps['off'])}",
            fmt_ratio(rps_ratio),
            ">= 0.95x",
            rps_ratio >= 1 - TOLERANCE,
            (f"missed: {1 - rps_ratio:.1%} slower; " if rps_ratio < 1 - TOLERANCE else "")
            + setup
            + ", ".join(f"{m} {[round(r) for r, _ in results[m]]}" for m in results),
        ),
        Row(
            "p99 latency, analytics on",
            f"{p99['on'] * 1e3:.2f} ms",
            f"off {p99['off'] * 1e3:.2f} ms",
            fmt_ratio(p99_ratio),
            "<= 1.05x",
            p99_ratio <= 1 + TOLERANCE,
            (f"missed: {p99_ratio - 1:.1%} higher; " if p99_ratio > 1 + TOLERANCE else "")
            + ", ".join(f"{m} {[round(p * 1e3, 2) for _, p in results[m]]} ms" for m in results)
            + f"; {shipped_messages} batches reached Redis with analytics on",
        ),
    ]
    print_table(TITLE, rows)
    save_rows(args.save, TITLE, rows)
    return rows


if __name__ == "__main__":
    main()
