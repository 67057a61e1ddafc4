"""CPU cost per record of each stage of the pipeline, in one process, without I/O or broker.

    .venv/bin/python bench/stage_costs.py [--batch 5000] [--rounds 5]

Explains where the end-to-end time goes (bench/e2e_csv.py) stage by stage, on the same realistic
records. Each stage runs ``--rounds`` times on one batch; the best round is kept (least noise).
Celery's publish path is measured with the in-memory broker (``memory://``), so it includes
Celery's and kombu's own work (message, serialization, body encoding) but no network.
Baseline: ``msgpack.packb`` of one record, per record, measured in the same run.

The "what-if" line formats the same rows with the csv module's writer, for comparison with the
CSV pump's own formatting (``csv_text``).
"""

from __future__ import annotations

import argparse
import csv
import io
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
from benchlib import Row, make_record, print_table, save_rows

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from app.codec import decode_clean_batch, decode_envelope, encode_clean_batch, encode_envelope
from app.config import PumpEntryConfig
from app.transports import CeleryTransport
from pumps.csv import CSVPump, csv_row, csv_text, go_time_string
from pumps.deadline import Deadline
from pumps.pipeline import build_pipeline, run_pipeline

TITLE = "stage costs per record (no I/O)"


def best_us_per_record(function: Callable[[], Any], records: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best / records * 1e6


def csv_module_text(records: list[AnalyticsRecord]) -> str:
    """For comparison: the same rows through the csv module's writer."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(csv_row(r) for r in records)
    return buffer.getvalue()


def measure(batch: int = 5000, rounds: int = 5) -> list[tuple[str, str, float]]:
    """``(part, stage, us per record)`` of every stage, the baseline first (part ``baseline``).

    Parts: ``reporter``, ``ingest`` (worker: the ingest task), ``write`` (worker: one pump's
    write task), ``what-if``. A stage whose name starts with two spaces is a part of the one
    above it, left out of totals.
    """
    n = batch
    records = [make_record(i) for i in range(n)]
    expire_at = datetime.now(UTC) + timedelta(days=1)
    reporter = Analytics(AnalyticsOptions())
    rows = reporter._rows(records)
    envelope = encode_envelope("batch", rows)
    batch_id, good, _ = decode_envelope(envelope)
    clean = encode_clean_batch(batch_id, good)
    _, decoded = decode_clean_batch(clean)
    steps = build_pipeline(PumpEntryConfig(type="csv"), omit_detailed_globally=False)
    memory = CeleryTransport("memory://")
    folder = tempfile.TemporaryDirectory(prefix="iam-pump-bench-stages-")
    pump = CSVPump.create("csv", {"csv_dir": folder.name}, timeout_s=30.0)
    pump.open()

    def raw_pack() -> None:
        for r in records:
            msgpack.packb(
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

    # Lines starting with two spaces are parts of the line above, left out of the totals.
    stages: list[tuple[str, str, Callable[[], Any]]] = [
        ("reporter", "Analytics._rows (rows + trial packb)", lambda: reporter._rows(records)),
        (
            "reporter",
            "  of which the trial msgpack.packb (result dropped)",
            lambda: msgpack.packb(rows, datetime=True),
        ),
        (
            "reporter",
            "CeleryTransport.ship on memory:// (envelope + Celery message)",
            lambda: memory.ship("batch", rows),
        ),
        ("reporter", "  of which codec.encode_envelope", lambda: encode_envelope("batch", rows)),
        ("ingest", "codec.decode_envelope (unpack + validate)", lambda: decode_envelope(envelope)),
        ("ingest", "codec.encode_clean_batch", lambda: encode_clean_batch(batch_id, good)),
        ("write", "codec.decode_clean_batch (records)", lambda: decode_clean_batch(clean)),
        ("write", "pipeline (size limit)", lambda: run_pipeline(steps, list(decoded))),
        (
            "write",
            "CSVPump.write (format + append)",
            lambda: pump.write(decoded, deadline=Deadline.after(60)),
        ),
        ("write", "  of which csv_row for each record", lambda: [csv_row(r) for r in decoded]),
        (
            "write",
            "  of which go_time_string for each record",
            lambda: [go_time_string(r.expire_at) for r in decoded],
        ),
    ]
    stages += [
        ("write", "  of which csv_text (the batch's CSV text)", lambda: csv_text(decoded)),
        (
            "what-if",
            "csv.writer over csv_row of each record (what csv_text replaced)",
            lambda: csv_module_text(decoded),
        ),
    ]
    baseline = best_us_per_record(raw_pack, n, rounds)
    measured = [("baseline", "msgpack.packb per record", baseline)]
    for part, name, function in stages:
        measured.append((part, name, best_us_per_record(function, n, rounds)))
    memory.close()
    pump.close()
    folder.cleanup()
    return measured


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="same as the default")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    measured = measure(args.batch, args.rounds)
    baseline = measured[0][2]
    table = [Row("baseline: msgpack.packb per record", f"{baseline:.2f} us")]
    totals = {"reporter": 0.0, "ingest": 0.0, "write": 0.0}
    for side, name, cost in measured[1:]:
        if not name.startswith("  ") and side in totals:
            totals[side] += cost
        table.append(
            Row(
                f"{side}: {name}", f"{cost:.2f} us", f"{baseline:.2f} us", f"{cost / baseline:.1f}x"
            )
        )
    for side, total in totals.items():
        table.append(
            Row(
                f"{side}: total of the stages above",
                f"{total:.2f} us",
                note=f"at most {1e6 / total:,.0f} records/s per core for this part's own "
                "Python work (no broker, no Celery worker loop)",
            )
        )
    print_table(f"{TITLE}, batch {args.batch}", table)
    save_rows(args.save, TITLE, table, series={"stages": measured})
    return table


if __name__ == "__main__":
    main()
