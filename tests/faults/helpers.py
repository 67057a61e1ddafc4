"""Shared steps of the fault tests: produce records, wait for delivery, report lost/duplicated."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from tests.support import Proc, read_csv_rows, start_beat, wait_until

#: The ledger sweep's settings in the worker-kill tests: a task message a killed worker took
#: with it (SIGKILL between kombu's BRPOP and its record in ``unacked``) is sent again after
#: 15 s instead of the default 120 s, inside what the tests wait.
QUICK_SWEEP = {"redelivery-window-s": 15, "sweep-interval-s": 5}


def with_quick_sweep(config: dict[str, Any]) -> dict[str, Any]:
    """The config with the ledger sweep's quick settings added to its ``delivery`` block."""
    config["delivery"] = {**config.get("delivery", {}), **QUICK_SWEEP}
    return config


def start_sweeping_beat(config_path: Path, tmp_path: Path, procs: list[Proc]) -> None:
    """Beat, as every deployment runs it: the purge and the ledger sweep."""
    procs.append(start_beat(config_path, tmp_path / "beat.log", tmp_path))


def make_records(tag: str, count: int) -> list[AnalyticsRecord]:
    return [
        AnalyticsRecord(username=f"user-{i % 5}", effect="allow", request=f"{tag}-{i}")
        for i in range(count)
    ]


def report(records: list[AnalyticsRecord], config_path: Path) -> None:
    """Ship every record through the reporter (waiting while its buffer is full)."""
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config_path)))
    analytics.start()
    for record in records:
        while not analytics.record_hit(record):
            time.sleep(0.001)
    stats = analytics.stop(timeout_s=120)
    assert stats.shipped_records == len(records), stats


def requests_in(directory: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in read_csv_rows(directory):
        counts[row["Request"]] = counts.get(row["Request"], 0) + 1
    return counts


def await_delivery(
    directory: Path, expected: set[str], *, timeout_s: float, label: str
) -> tuple[int, int, float]:
    """Wait until every expected request is on disk; print and return (lost, duplicated, s)."""
    started = time.monotonic()
    wait_until(lambda: expected <= set(requests_in(directory)), timeout_s, interval_s=0.5)
    elapsed = time.monotonic() - started
    counts = requests_in(directory)
    lost = len(expected - set(counts))
    duplicated = sum(n - 1 for n in counts.values())
    print(
        f"\n[{label}] records: {len(expected)}, lost: {lost}, duplicated: {duplicated}, "
        f"all there {elapsed:.1f}s after the check began"
    )
    return lost, duplicated, elapsed
