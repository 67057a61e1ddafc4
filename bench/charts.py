"""Charts (PNG) of a benchmark run, from the rows the benchmarks saved with ``--save``.

    .venv/bin/python bench/charts.py bench/results.json [--out docs/bench]

Reads the JSON lines that run_all.py (or any benchmark's ``--save FILE``) wrote and draws, for
each benchmark found in them:

* ``throughput-batch.png``: end-to-end rate on disk vs reporter batch size (e2e_csv.py), with the
  RabbitMQ broker's point when it ran;
* ``throughput-workers.png``: drain rate vs worker processes (scale_out.py);
* ``rate-rtt.png``: shipping and end-to-end rate vs Redis round-trip time (network_rtt.py);
* ``latency-cdf.png``: distribution of record_hit -> CSV latency at the rate of latency.py;
* ``app-latency.png``: the application benchmark's latency percentiles with analytics on and off
  (the WSGI / ASGI benchmark's rows; skipped with a message when that benchmark did not run);
* ``fanout.png``: records/s and pump-records/s vs the number of pumps, with the fitted formula,
  and Redis bytes per in-flight record (fanout.py).

A chart whose benchmark is missing from the file is skipped with a message; nothing is drawn from
numbers that were not measured. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DPI = 110
SIZE = (6.4, 4.0)


def load(path: Path) -> list[dict[str, Any]]:
    """Every saved table: ``{"title", "rows", "series"?}``, in file order."""
    tables = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            tables.append(json.loads(line))
    return tables


def latest(tables: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    """The last table whose title starts with ``prefix`` and that carries series."""
    found = [t for t in tables if t["title"].startswith(prefix) and "series" in t]
    return found[-1] if found else None


def _finite(values: list[float]) -> bool:
    return bool(values) and all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _save(fig: Any, out: Path, name: str, drawn: list[str]) -> None:
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI)
    plt.close(fig)
    drawn.append(name)


def chart_batch(tables: list[dict[str, Any]], out: Path, drawn: list[str]) -> str | None:
    table = latest(tables, "3.")
    if table is None:
        return "throughput-batch.png: no e2e_csv.py rows with series"
    s = table["series"]
    pairs = sorted(zip(s["batch"], s["sustained"], strict=True))
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot([b for b, _ in pairs], [r for _, r in pairs], "o-", label="Redis broker")
    if s.get("amqp"):
        ax.plot([s["amqp"]["batch"]], [s["amqp"]["sustained"]], "s", label="RabbitMQ broker")
    ax.axhline(50_000, color="grey", linestyle=":", label="target 50,000/s")
    ax.set_xscale("log")
    ticks = sorted({b for b, _ in pairs} | ({s["amqp"]["batch"]} if s.get("amqp") else set()))
    ax.set_xticks(ticks, [f"{b:,}" for b in ticks])
    ax.minorticks_off()
    ax.set_xlabel("records per reporter batch")
    ax.set_ylabel("records/s on disk (sustained)")
    ax.set_title(f"End to end into CSV vs batch size (worker -c {s.get('concurrency', 2)})")
    ax.set_ylim(bottom=0)
    ax.legend()
    _save(fig, out, "throughput-batch.png", drawn)
    return None


def chart_workers(tables: list[dict[str, Any]], out: Path, drawn: list[str]) -> str | None:
    table = latest(tables, "8.")
    if table is None:
        return "throughput-workers.png: no scale_out.py rows with series"
    s = table["series"]
    fig, ax = plt.subplots(figsize=SIZE)
    ax.bar(s["layouts"], s["rate"], color="tab:blue")
    for x, rate in enumerate(s["rate"]):
        ax.annotate(f"{rate:,.0f}", (x, rate), ha="center", va="bottom")
    ax.set_ylabel("records/s on disk (drain)")
    ax.set_title("Drain rate vs worker processes")
    _save(fig, out, "throughput-workers.png", drawn)
    return None


def chart_rtt(tables: list[dict[str, Any]], out: Path, drawn: list[str]) -> str | None:
    table = latest(tables, "9.")
    if table is None:
        return "rate-rtt.png: no network_rtt.py rows with series"
    s = table["series"]
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot(s["rtt_ms"], s["shipping"], "o-", label="reporter shipping")
    ax.plot(s["rtt_ms"], s["e2e"], "s-", label="end to end into CSV")
    base = s["e2e"][s["rtt_ms"].index(0.0)] if 0.0 in s["rtt_ms"] else None
    if base:
        ax.plot([1, 5], [0.8 * base, 0.5 * base], "x", color="grey", label="targets (0.8x, 0.5x)")
    ax.set_xlabel("added round-trip time to Redis (ms)")
    ax.set_ylabel("records/s")
    ax.set_title("Rate vs Redis round-trip time")
    ax.set_ylim(bottom=0)
    ax.legend()
    _save(fig, out, "rate-rtt.png", drawn)
    return None


def chart_latency(tables: list[dict[str, Any]], out: Path, drawn: list[str]) -> str | None:
    table = latest(tables, "5.")
    if table is None or not table["series"].get("cdf"):
        return "latency-cdf.png: no latency.py rows with samples"
    s = table["series"]
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot([latency for _, latency in s["cdf"]], [q for q, _ in s["cdf"]])
    for name, value in s["percentiles_s"].items():
        ax.axvline(value, color="grey", linestyle=":")
        ax.annotate(f"{name} {value:.2f} s", (value, 0.05), rotation=90, va="bottom")
    ax.set_xlabel("record_hit -> row in the CSV file (s)")
    ax.set_ylabel("share of records")
    ax.set_title(f"Latency CDF at {s['rate']:,.0f} records/s ({s['records']:,} records)")
    ax.set_ylim(0, 1)
    _save(fig, out, "latency-cdf.png", drawn)
    return None


_LATENCY = re.compile(r"([\d.,]+)\s*(us|µs|ms|s)\b")
_UNIT = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float | None:
    match = _LATENCY.search(text or "")
    if not match:
        return None
    return float(match.group(1).replace(",", "")) * _UNIT[match.group(2)]


def chart_app(tables: list[dict[str, Any]], out: Path, drawn: list[str]) -> str | None:
    # The application benchmark's latency rows: value = analytics on, baseline = off.
    found: list[tuple[str, float, float]] = []
    for table in tables:
        title = table["title"]
        if not re.search(r"wsgi|asgi|application|gunicorn|uvicorn", title, re.IGNORECASE):
            continue
        for row in table["rows"]:
            if not re.search(r"\bp\d", row["measurement"]) or "latency" not in row["measurement"]:
                continue
            on, off = _ms(row["value"]), _ms(row["baseline"])
            if on is not None and off is not None:
                label = f"{title.split(' ', 1)[-1][:40]}\n{row['measurement'][:40]}"
                found.append((label, off, on))
    if not found:
        return "app-latency.png: no WSGI / ASGI latency rows (that benchmark did not run)"
    fig, ax = plt.subplots(figsize=(8.0, 0.7 * len(found) + 1.8))
    labels = [name for name, _, _ in found]
    y = range(len(found))
    ax.barh([i + 0.2 for i in y], [off for _, off, _ in found], 0.4, label="analytics off")
    ax.barh([i - 0.2 for i in y], [on for _, _, on in found], 0.4, label="analytics on")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xlabel("latency (ms)")
    ax.set_title("Application latency with analytics on and off")
    ax.legend()
    _save(fig, out, "app-latency.png", drawn)
    return None


def chart_fanout(tables: list[dict[str, Any]], out: Path, drawn: list[str]) -> str | None:
    table = latest(tables, "10.")
    if table is None:
        return "fanout.png: no fanout.py rows with series"
    s = table["series"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    left.plot(s["pumps"], s["pump_records_per_s"], "o-", label="pump-records/s (measured)")
    left.plot(s["pumps"], s["records_per_s"], "s-", label="records/s (measured)")
    if _finite(s["predicted_records_per_s"]):
        predicted = s["predicted_records_per_s"]
        left.plot(s["pumps"], predicted, "--", color="grey", label="records/s, formula")
        left.plot(
            s["pumps"],
            [p * n for p, n in zip(predicted, s["pumps"], strict=True)],
            ":",
            color="grey",
            label="pump-records/s, formula",
        )
    left.set_xlabel("CSV pumps")
    left.set_ylabel("per second")
    left.set_xticks(s["pumps"])
    left.set_ylim(bottom=0)
    left.set_title(
        f"k*2 cores/(S + n*P): S {s['shared_us']:.1f} us, P {s['per_pump_us']:.1f} us", fontsize=9
    )
    left.legend(fontsize=7)
    right.bar([str(n) for n in s["pumps"]], s["bytes_per_record"], color="tab:orange")
    right.set_xlabel("CSV pumps")
    right.set_ylabel("Redis bytes per in-flight record")
    right.set_title("Redis memory per in-flight record", fontsize=9)
    fig.suptitle("Fan-out to N pumps")
    _save(fig, out, "fanout.png", drawn)
    return None


CHARTS = [chart_batch, chart_workers, chart_rtt, chart_latency, chart_app, chart_fanout]


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="JSON lines saved by run_all.py --save or --save FILE")
    parser.add_argument("--out", default="docs/bench", help="folder of the PNG files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = load(Path(args.results))
    drawn: list[str] = []
    for chart in CHARTS:
        skipped = chart(tables, out, drawn)
        if skipped:
            print(f"skipped {skipped}", flush=True)
    for name in drawn:
        print(f"wrote {out / name}", flush=True)
    return drawn


if __name__ == "__main__":
    main()
