"""Benchmark 6: what analytics costs a web application, driven by wrk, on and off in one run.

    .venv/bin/python bench/wsgi_overhead.py [--rounds 3] [--seconds 10] [--connections 8]
                                            [--server gunicorn|uvicorn] [--quick]

Two servers run side by side, one with ``BENCH_ANALYTICS=1`` (each request calls ``record_hit``;
the reporter ships to Redis database 12) and one with ``BENCH_ANALYTICS=0``: a gunicorn sync
worker serving bench/wsgi_app.py, or (``--server uvicorn``, what bench/asgi_overhead.py runs) a
uvicorn process serving the plain ASGI app bench/asgi_app.py. wrk (``apt-get install wrk``)
drives them in short alternating runs (``--slice-seconds``, 1 s: off, on, on, off, off, ...),
so that the load of a busy machine hits both alike; the runs of each mode in a round are merged
into one latency distribution (wrk_percentiles.lua prints each run's quantile function), each
round gives the ratio on/off, and the table shows the median over rounds. No collector runs:
what the reporter ships is deleted between runs.

Targets (default settings): p99 <= 1.10x off, p99.9 <= 1.25x off, requests/s >= 0.97x off.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass

from benchlib import (
    BENCH_DIR,
    BENCH_REDIS_URL,
    PYTHON,
    Row,
    bench_redis,
    cpu_s,
    flush_bench_db,
    fmt_rate,
    fmt_ratio,
    free_port,
    print_table,
    save_rows,
    session,
    tree_pids,
)

from app.messages import INGEST_QUEUE

TITLES = {
    "gunicorn": "6. application overhead (gunicorn sync + wrk)",
    "uvicorn": "6b. application overhead (asyncio on uvicorn + wrk)",
}
P99_LIMIT = 1.10
P999_LIMIT = 1.25
RPS_FLOOR = 0.97


#: The latency percentiles wrk_percentiles.lua prints, in order.
GRID = [i * 0.5 for i in range(1, 199)] + [99 + i * 0.01 for i in range(1, 101)]


@dataclass(frozen=True, slots=True)
class Slice:
    """One short wrk run: its counts and its latency at each :data:`GRID` percentile (s)."""

    requests: int
    duration_s: float
    errors: int
    quantiles: list[float]


@dataclass(frozen=True, slots=True)
class Run:
    """The slices of one mode in one round, merged: requests/s and latency percentiles (s)."""

    rps: float
    p50: float
    p99: float
    p999: float
    errors: int
    #: CPU seconds per request of the server's processes, and of the reporter's helper alone.
    cpu_per_request: float = 0.0
    helper_cpu_per_request: float = 0.0


def cpu_by_process(root: int) -> dict[int, tuple[bool, float]]:
    """CPU seconds of a server's processes, each marked True if it is the reporter's helper."""
    out = {}
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                helper = b"app.analytics_helper" in handle.read()
        except OSError:
            continue
        out[pid] = (helper, cpu_s(pid))
    return out


def cpu_spent(
    before: dict[int, tuple[bool, float]], after: dict[int, tuple[bool, float]]
) -> tuple[float, float]:
    """CPU seconds between two snapshots: all processes, and the helper alone."""
    total = helper = 0.0
    for pid, (is_helper, spent) in after.items():
        delta = spent - before.get(pid, (is_helper, 0.0))[1]
        total += delta
        if is_helper:
            helper += delta
    return total, helper


def parse_wrk(output: str) -> Slice:
    """The numbers wrk_percentiles.lua prints."""
    counts = re.search(r"^BENCH (.*)$", output, re.MULTILINE)
    quantiles = re.search(r"^QUANTILES (.*)$", output, re.MULTILINE)
    if not counts or not quantiles:
        raise RuntimeError(f"cannot read wrk output:\n{output}")
    values = {k: int(v) for k, v in (item.split("=") for item in counts.group(1).split())}
    latencies = [int(v) / 1e6 for v in quantiles.group(1).split()]
    if len(latencies) != len(GRID):
        raise RuntimeError(f"expected {len(GRID)} quantiles from wrk, got {len(latencies)}")
    return Slice(values["requests"], values["duration_us"] / 1e6, values["errors"], latencies)


def merge(slices: list[Slice]) -> Run:
    """One distribution from short runs: each grid point stands for its share of requests."""
    points: list[tuple[float, float]] = []
    for part in slices:
        previous = 0.0
        for percent, latency in zip(GRID, part.quantiles, strict=True):
            points.append((latency, (percent - previous) / 100 * part.requests))
            previous = percent
    points.sort()
    total = sum(weight for _, weight in points)

    def quantile(fraction: float) -> float:
        seen = 0.0
        for latency, weight in points:
            seen += weight
            if seen >= fraction * total - 1e-9:
                return latency
        return points[-1][0]

    return Run(
        rps=sum(p.requests for p in slices) / sum(p.duration_s for p in slices),
        p50=quantile(0.5),
        p99=quantile(0.99),
        p999=quantile(0.999),
        errors=sum(p.errors for p in slices),
    )


def run_wrk(port: int, seconds: float, connections: int) -> Slice:
    output = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:.0f}s",
            "-s",
            str(BENCH_DIR / "wrk_percentiles.lua"),
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
    raise RuntimeError(f"the server on port {port} did not answer in {timeout_s}s")


def server_command(server: str, port: int, workers: int, worker_class: str) -> list[str]:
    if server == "uvicorn":
        return [
            PYTHON,
            "-m",
            "uvicorn",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "asgi_app:application",
        ]
    return [
        PYTHON,
        "-m",
        "gunicorn",
        "-w",
        str(workers),
        "-k",
        worker_class,
        "-b",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
        "wsgi_app:application",
    ]


def _ratio_row(
    name: str,
    runs: dict[str, list[Run]],
    attr: str,
    limit: float,
    *,
    higher_is_better: bool,
    note: str = "",
) -> Row:
    on = [getattr(r, attr) for r in runs["on"]]
    off = [getattr(r, attr) for r in runs["off"]]
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    ratio = statistics.median(ratios)
    met = ratio >= limit if higher_is_better else ratio <= limit
    if higher_is_better:
        show = fmt_rate
        missed = f"missed: {1 - ratio:.1%} slower (target {limit}x); " if not met else ""
    else:

        def show(value: float) -> str:
            return f"{value * 1e3:.2f} ms"

        missed = f"missed: {ratio / limit:.2f}x the limit {limit}x; " if not met else ""
    return Row(
        name,
        show(statistics.median(on)),
        f"off {show(statistics.median(off))}",
        fmt_ratio(ratio),
        f"{'>=' if higher_is_better else '<='} {limit:.2f}x",
        met,
        missed
        + "rounds (on/off): "
        + ", ".join(f"{show(a)}/{show(b)} = {a / b:.2f}x" for a, b in zip(on, off, strict=True))
        + note,
    )


def main(argv: list[str] | None = None, *, server: str = "gunicorn") -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", choices=sorted(TITLES), default=server)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--slice-seconds",
        type=float,
        default=1.0,
        help="each round alternates off and on in wrk runs this long (merged per round)",
    )
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers")
    parser.add_argument("--worker-class", default="sync", help="gunicorn worker class")
    parser.add_argument(
        "--switch-interval",
        type=float,
        help="what-if: sys.setswitchinterval(S) in both servers (CPython default 0.005)",
    )
    parser.add_argument(
        "--what-if-transport",
        choices=["memory", "pack", "thread"],
        help="what-if: the reporter keeps batches in memory, packs and drops them, or publishes "
        "from its own threads in the app's process (default: from a helper process)",
    )
    parser.add_argument(
        "--flush-interval-ms",
        type=int,
        help="what-if: the reporter's flush-interval (batch size follows the rate)",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 s")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    rounds, seconds = (2, 5.0) if args.quick else (args.rounds, args.seconds)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    flush_bench_db()
    discard = bench_redis()
    runs: dict[str, list[Run]] = {"off": [], "on": []}
    shipped_messages = 0
    with session("app-overhead") as current:
        ports, roots = {}, {}
        for mode in ("off", "on"):
            port = free_port()
            ports[mode] = port
            roots[mode] = current.start(
                server_command(args.server, port, args.workers, args.worker_class),
                log_name=f"{args.server}-{mode}.log",
                env={
                    "BENCH_ANALYTICS": "1" if mode == "on" else "0",
                    "BENCH_BROKER_URL": BENCH_REDIS_URL,
                    "BENCH_SWITCH_INTERVAL_S": str(args.switch_interval or ""),
                    "BENCH_REPORTER_TRANSPORT": args.what_if_transport or "",
                    "BENCH_FLUSH_INTERVAL_MS": str(args.flush_interval_ms or ""),
                },
            ).pid
        for port in ports.values():
            wait_http(port)
        # A short warm-up of each, not counted (it also starts the reporter).
        for mode in ("off", "on"):
            run_wrk(ports[mode], 2, args.connections)
        slices = max(1, round(seconds / args.slice_seconds))
        for _ in range(rounds):
            parts: dict[str, list[Slice]] = {"off": [], "on": []}
            before = {mode: cpu_by_process(roots[mode]) for mode in roots}
            for index in range(slices):
                for mode in ("off", "on") if index % 2 == 0 else ("on", "off"):
                    discard.delete(INGEST_QUEUE)
                    parts[mode].append(run_wrk(ports[mode], args.slice_seconds, args.connections))
                    if mode == "on":
                        shipped_messages += int(discard.llen(INGEST_QUEUE))
            after = {mode: cpu_by_process(roots[mode]) for mode in roots}
            for mode, done in parts.items():
                total_s, helper_s = cpu_spent(before[mode], after[mode])
                requests = sum(p.requests for p in done)
                merged = merge(done)
                runs[mode].append(
                    dataclasses.replace(
                        merged,
                        cpu_per_request=total_s / max(1, requests),
                        helper_cpu_per_request=helper_s / max(1, requests),
                    )
                )
    discard.close()
    flush_bench_db()
    setup = (
        (
            f"gunicorn -w {args.workers} -k {args.worker_class}"
            if args.server == "gunicorn"
            else "uvicorn (asyncio, h11), plain ASGI app"
        )
        + f", wrk -c {args.connections}, "
        + (f"switch interval {args.switch_interval} s, " if args.switch_interval else "")
        + (f"transport {args.what_if_transport}, " if args.what_if_transport else "")
        + (f"flush {args.flush_interval_ms} ms, " if args.flush_interval_ms else "")
        + f"{rounds} rounds of {seconds:.0f} s per mode, in alternating "
        + f"{args.slice_seconds:g} s wrk runs"
    )
    errors = sum(r.errors for mode in runs.values() for r in mode)
    rows = [
        _ratio_row(
            "requests/s, analytics on",
            runs,
            "rps",
            RPS_FLOOR,
            higher_is_better=True,
            note=f"; {setup}; wrk errors {errors}",
        ),
        _ratio_row("p50 latency, analytics on", runs, "p50", 1e9, higher_is_better=False),
        _ratio_row("p99 latency, analytics on", runs, "p99", P99_LIMIT, higher_is_better=False),
        _ratio_row(
            "p99.9 latency, analytics on",
            runs,
            "p999",
            P999_LIMIT,
            higher_is_better=False,
            note=f"; {shipped_messages} batches reached Redis with analytics on",
        ),
    ]
    on_cpu = [r.cpu_per_request for r in runs["on"]]
    off_cpu = [r.cpu_per_request for r in runs["off"]]
    helper_cpu = [r.helper_cpu_per_request for r in runs["on"]]
    rows.append(
        Row(
            "CPU per request, analytics on (app + helper)",
            f"{statistics.median(on_cpu) * 1e6:.0f} us",
            f"off {statistics.median(off_cpu) * 1e6:.0f} us",
            fmt_ratio(statistics.median(a / b for a, b in zip(on_cpu, off_cpu, strict=True))),
            note="server processes' CPU over each round / requests served; of which the "
            f"reporter's helper process: {statistics.median(helper_cpu) * 1e6:.1f} us; rounds: "
            + ", ".join(
                f"{a * 1e6:.0f}/{b * 1e6:.0f} us" for a, b in zip(on_cpu, off_cpu, strict=True)
            ),
        )
    )
    # The p50 row is informational: no target.
    rows[1] = Row(
        rows[1].measurement, rows[1].value, rows[1].baseline, rows[1].ratio, note=rows[1].note
    )
    what_ifs = [
        f"transport {args.what_if_transport}" if args.what_if_transport else "",
        f"flush {args.flush_interval_ms} ms" if args.flush_interval_ms else "",
        f"switch interval {args.switch_interval} s" if args.switch_interval else "",
    ]
    title = TITLES[args.server] + "".join(f" [{w}]" for w in what_ifs if w)
    print_table(title, rows)
    save_rows(args.save, title, rows)
    return rows


if __name__ == "__main__":
    main()
