"""Benchmark 1: what ``record_hit`` costs the caller, against ``collections.deque.append``.

    .venv/bin/python bench/record_hit.py [--calls 1000000] [--burst 10000]

Each call is timed on its own with ``time.perf_counter_ns`` (the timer's own cost, measured in the
same run, is subtracted from the medians; p99 and max are reported raw, timer included). Calls
run in bursts; deque and record_hit bursts alternate, so both see the same machine noise.

Two cases, both with the reporter started and its shipping threads running:

* broker up (Redis database 12): before each burst the bench waits until the buffer has room for
  the whole burst, so every timed call takes the accepting path while the cutter and shippers
  pack and send in the background;
* broker unreachable (a closed port): the buffer fills after ``records-buffer-size`` calls, and
  from then on every call takes the refusing path (counted, rate-limited warning).

Targets: median <= 3x the deque baseline (net of the timer), p99 <= 10 us, in both cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

from benchlib import (
    BENCH_REDIS_URL,
    Row,
    bench_redis,
    flush_bench_db,
    fmt_ns,
    fmt_ratio,
    free_port,
    make_record,
    miss,
    percentile,
    print_table,
    save_rows,
)

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from app.messages import INGEST_QUEUE

TITLE = "1. record_hit cost"
MEDIAN_RATIO_TARGET = 3.0
P99_TARGET_NS = 10_000.0
ROOM_WAIT_TIMEOUT_S = 30.0
# No worker runs here: shipped batches are deleted from the ingest queue between bursts.
_DISCARD = bench_redis()


@dataclasses.dataclass
class Samples:
    """Per-call times (ns) of one function, gathered burst by burst."""

    name: str
    times: array[int] = dataclasses.field(default_factory=lambda: array("q"))
    accepted: int = 0

    def summary(self, timer_ns: float) -> dict[str, float]:
        ordered = sorted(self.times)
        return {
            "median_raw": percentile(ordered, 0.5),
            "median_net": max(percentile(ordered, 0.5) - timer_ns, 1.0),
            "p99": percentile(ordered, 0.99),
            "p999": percentile(ordered, 0.999),
            "max": float(ordered[-1]) if ordered else float("nan"),
            "count": float(len(ordered)),
        }


def timed_burst(
    function: Callable[[AnalyticsRecord], Any], record: AnalyticsRecord, calls: int
) -> tuple[array[int], int]:
    """Time each of ``calls`` calls; returns the times and how many returned something truthy."""
    times = array("q", bytes(8 * calls))
    clock = time.perf_counter_ns
    accepted = 0
    for index in range(calls):
        start = clock()
        result = function(record)
        end = clock()
        times[index] = end - start
        if result is not False:
            accepted += 1
    return times, accepted


def timer_burst(calls: int) -> array[int]:
    """The same loop with nothing between the two clock reads."""
    times = array("q", bytes(8 * calls))
    clock = time.perf_counter_ns
    for index in range(calls):
        start = clock()
        end = clock()
        times[index] = end - start
    return times


def wait_for_room(analytics: Analytics, room: int) -> None:
    """Wait until a burst of ``room`` calls will all be accepted; drop what no worker consumes."""
    _DISCARD.delete(INGEST_QUEUE)
    limit = analytics.options.records_buffer_size
    deadline = time.monotonic() + ROOM_WAIT_TIMEOUT_S
    # Buffered and in-flight records both count against the bound (the reporter's limit).
    while (stats := analytics.stats()).buffered + stats.pending + room > limit:
        if time.monotonic() > deadline:
            raise RuntimeError("the reporter's buffer did not drain: is Redis up?")
        time.sleep(0.002)


def run_case(
    analytics: Analytics, calls: int, burst: int, *, wait: bool
) -> tuple[Samples, Samples, Samples]:
    """Alternate deque / record_hit / timer-only bursts until ``calls`` calls of each."""
    record = make_record(1)
    baseline = Samples("deque.append")
    hit = Samples("record_hit")
    timer = Samples("timer")
    sink: deque[AnalyticsRecord] = deque()
    done = 0
    while done < calls:
        size = min(burst, calls - done)
        sink.clear()
        times, accepted = timed_burst(sink.append, record, size)
        baseline.times.extend(times)
        baseline.accepted += accepted
        if wait:
            wait_for_room(analytics, size)
        times, accepted = timed_burst(analytics.record_hit, record, size)
        hit.times.extend(times)
        hit.accepted += accepted
        timer.times.extend(timer_burst(size))
        done += size
    return baseline, hit, timer


def rows_for(case: str, baseline: Samples, hit: Samples, timer: Samples) -> list[Row]:
    timer_ns = percentile(sorted(timer.times), 0.5)
    base = baseline.summary(timer_ns)
    mine = hit.summary(timer_ns)
    ratio = mine["median_net"] / base["median_net"]
    raw_ratio = mine["median_raw"] / base["median_raw"]
    calls = int(mine["count"])
    rows = [
        Row(
            f"{case}: median, timer included",
            fmt_ns(mine["median_raw"]),
            f"deque.append {fmt_ns(base['median_raw'])}",
            fmt_ratio(raw_ratio),
            f"<= {MEDIAN_RATIO_TARGET:.0f}x",
            raw_ratio <= MEDIAN_RATIO_TARGET,
            miss(raw_ratio, MEDIAN_RATIO_TARGET, higher_is_better=False)
            + f" [{calls:,} calls, {hit.accepted:,} accepted]",
        ),
        Row(
            f"{case}: median, net of timer",
            fmt_ns(mine["median_net"]),
            f"deque.append {fmt_ns(base['median_net'])}",
            fmt_ratio(ratio),
            f"<= {MEDIAN_RATIO_TARGET:.0f}x",
            ratio <= MEDIAN_RATIO_TARGET,
            miss(ratio, MEDIAN_RATIO_TARGET, higher_is_better=False)
            + f" [timer {fmt_ns(timer_ns)} subtracted from both]",
        ),
        Row(
            f"{case}: p99 (raw)",
            fmt_ns(mine["p99"]),
            f"deque.append {fmt_ns(base['p99'])}",
            fmt_ratio(mine["p99"] / base["p99"]),
            f"<= {fmt_ns(P99_TARGET_NS)}",
            mine["p99"] <= P99_TARGET_NS,
            miss(mine["p99"], P99_TARGET_NS, higher_is_better=False),
        ),
        Row(
            f"{case}: p99.9 / max (raw)",
            f"{fmt_ns(mine['p999'])} / {fmt_ns(mine['max'])}",
            f"{fmt_ns(base['p999'])} / {fmt_ns(base['max'])}",
        ),
    ]
    return rows


def batched_mean_ns(function: Callable[[AnalyticsRecord], Any], calls: int) -> float:
    """Mean cost per call of a plain loop (no per-call timer), minus the empty loop."""
    record = make_record(2)
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(calls):
        function(record)
    loop = clock() - start
    start = clock()
    for _ in range(calls):
        pass
    empty = clock() - start
    return max(loop - empty, 0) / calls


def _noop(record: AnalyticsRecord) -> bool:
    return True


def prototype_record_hit(limit: int) -> Callable[[AnalyticsRecord], bool]:
    """What-if, not the app's code: refusals counted lock-free, no clock, no logging call.

    The rate-limited warning and the full/stopped split would move to the cutter thread, which
    can compare the counter with its last value once per poll.
    """
    buffer: deque[AnalyticsRecord] = deque()
    append = buffer.append
    bound = [limit]
    count_refusal = itertools.count().__next__

    def record_hit(record: AnalyticsRecord) -> bool:
        if len(buffer) < bound[0]:
            append(record)
            return True
        count_refusal()
        return False

    return record_hit


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="same as the default (1M calls)")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    # The broker-down case ends with an expected "could not be shipped" error: keep it quiet.
    logging.getLogger("app").setLevel(logging.CRITICAL)
    flush_bench_db()

    rows: list[Row] = []
    up = Analytics(AnalyticsOptions(broker_url=BENCH_REDIS_URL, redis_url=BENCH_REDIS_URL))
    up.start()
    try:
        burst = min(args.burst, up.options.records_buffer_size // 2)
        baseline, hit, timer = run_case(up, args.calls, burst, wait=True)
        dropped = up.stats().dropped
    finally:
        stats = up.stop(timeout_s=30)
    rows += rows_for("broker up", baseline, hit, timer)
    if dropped:
        rows[-3].note += f" ({dropped} refused: the buffer was full)"

    closed = f"redis://127.0.0.1:{free_port()}/0"
    down = Analytics(AnalyticsOptions(broker_url=closed, redis_url=closed))
    down.start()
    try:
        baseline, hit, timer = run_case(down, args.calls, args.burst, wait=False)
    finally:
        down.stop(timeout_s=0.5)
    rows += rows_for("broker unreachable", baseline, hit, timer)

    # Means without a per-call timer (informational): the accepting path on a fresh reporter
    # that is not started (nothing ships, nothing competes), and the baseline.
    idle = Analytics(AnalyticsOptions(records_buffer_size=10**7, broker_url=closed))
    mean_calls = min(args.calls, 1_000_000)
    hit_mean = batched_mean_ns(idle.record_hit, mean_calls)
    sink: deque[AnalyticsRecord] = deque()
    deque_mean = batched_mean_ns(sink.append, mean_calls)
    rows.append(
        Row(
            "mean per call, no timer (accepting)",
            fmt_ns(hit_mean),
            f"deque.append {fmt_ns(deque_mean)}",
            fmt_ratio(hit_mean / max(deque_mean, 0.1)),
            note="plain loop minus an empty loop; informational",
        )
    )
    noop_mean = batched_mean_ns(_noop, mean_calls)
    rows.append(
        Row(
            "mean per call, no timer: empty Python function",
            fmt_ns(noop_mean),
            f"deque.append {fmt_ns(deque_mean)}",
            fmt_ratio(noop_mean / max(deque_mean, 0.1)),
            note="the floor for any reporter written in Python (def f(record): return True)",
        )
    )
    refusing = prototype_record_hit(0)
    timer_ns = percentile(sorted(timer_burst(100_000)), 0.5)
    what_if = sorted(timed_burst(refusing, make_record(3), 100_000)[0])
    # The last calls of the broker-unreachable case: all of them took the refusing path.
    current_refusal = sorted(hit.times[-100_000:])
    rows.append(
        Row(
            "what-if: refusing path counted lock-free",
            fmt_ns(max(percentile(what_if, 0.5) - timer_ns, 1.0)),
            f"current {fmt_ns(max(percentile(current_refusal, 0.5) - timer_ns, 1.0))}",
            fmt_ratio(
                max(percentile(what_if, 0.5) - timer_ns, 1.0)
                / max(percentile(current_refusal, 0.5) - timer_ns, 1.0)
            ),
            note="median net of timer; a prototype closure in this file (not the app's code): "
            "len(buffer) < limit, else next(itertools.count()) and return False",
        )
    )
    rows.append(
        Row(
            "shipped during the broker-up case",
            f"{stats.shipped_records:,} records",
            note="the shipping threads ran during the timed bursts",
        )
    )
    print_table(TITLE, rows)
    save_rows(args.save, TITLE, rows)
    return rows


if __name__ == "__main__":
    main()
