"""Run every benchmark of this folder, one process each, and print one combined table.

    .venv/bin/python bench/run_all.py [--quick] [--only record_hit,e2e_csv] [--soak-s 600]
                                      [--save bench/results.json]

``--quick`` passes ``--quick`` to each benchmark (short durations: about 8 minutes in all);
without it each runs with its own defaults (about 20 minutes; ``--soak-s 600`` adds the
10-minute worker soak of the full run). A benchmark that fails is reported as such and the
others still run. bench/bench_stores.py (MongoDB / Elasticsearch) is run separately.

Every benchmark uses Redis database 12 only, and flushes it when it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import BENCH_DIR, PYTHON, Row, load_rows, render_table

BENCHMARKS = [
    "record_hit",
    "shipping",
    "e2e_csv",
    "latency",
    "wsgi_overhead",
    "asgi_overhead",
    "memory",
    "scale_out",
    "stage_costs",
    "network_rtt",
    "fanout",
    "capacity",
    "ceiling",
]


def run_one(name: str, extra: list[str], save: Path) -> tuple[int, float]:
    """Run one benchmark script; returns its exit status and duration."""
    start = time.monotonic()
    proc = subprocess.Popen([PYTHON, str(BENCH_DIR / f"{name}.py"), *extra, "--save", str(save)])
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # The benchmark cleans up its own processes on SIGINT; give it the time to.
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        proc.kill()
        raise
    return code, time.monotonic() - start


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short durations")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--soak-s", type=float, help="memory.py worker soak (600 = full run)")
    parser.add_argument(
        "--save",
        help="also keep every benchmark's rows and series in this file (JSON lines, replaced; "
        "bench/charts.py draws from it)",
    )
    args = parser.parse_args(argv)
    chosen = [n for n in args.only.split(",") if n] or BENCHMARKS
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; known: {BENCHMARKS}")
    signal.signal(signal.SIGTERM, _interrupt)
    failures: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="iam-pump-bench-all-") as tmp:
        save = Path(tmp) / "rows.jsonl"
        started = time.monotonic()
        for name in chosen:
            extra = ["--quick"] if args.quick else []
            if name == "memory" and args.soak_s:
                extra += ["--soak-s", str(args.soak_s)]
            print(f"\n### {name} {' '.join(extra)}", flush=True)
            code, took = run_one(name, extra, save)
            print(f"### {name}: exit {code} in {took:.0f} s", flush=True)
            if code:
                failures.append(Row(f"{name}.py", f"exit status {code}", met=False))
        tables = load_rows(str(save))
        if args.save:
            shutil.copyfile(save, args.save)
    combined: list[Row] = []
    for title, rows in tables:
        tag = title.split(".")[0] if title[:1].isdigit() else title.split()[0]
        for row in rows:
            combined.append(
                Row(
                    f"[{tag}] {row.measurement}",
                    row.value,
                    row.baseline,
                    row.ratio,
                    row.target,
                    row.met,
                )
            )
    combined += failures
    mode = "quick" if args.quick else "default"
    title = f"all benchmarks ({mode}, {time.monotonic() - started:.0f} s)"
    print("\n" + render_table(title, combined))
    targets = [r for r in combined if r.met is not None]
    met = sum(1 for r in targets if r.met)
    print(f"targets met: {met} of {len(targets)} (notes with the numbers are in each table above)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
