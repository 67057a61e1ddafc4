"""Benchmark 11: how much Redis memory a sink outage costs, per record and per minute.

    .venv/bin/python bench/capacity.py [--rate 10000] [--outage 60] [--quick]

Two CSV pumps, ``up`` and ``down``; the ``down`` pump's folder cannot be created (its parent is a
regular file), so every write of it fails as a sink that is down does: a temporary error, retried
with backoff (``delivery.retry-backoff-*``, default 1-30 s) up to ``max-retries``, then kept as a
dead letter. Default settings otherwise (``analytics:`` defaults, a ``celery -A app worker -c 2``).
The reporter process offers ``--rate`` records/s for ``--outage`` seconds while ``up`` keeps
writing.

Measured, once every envelope has gone through ingest: Redis ``used_memory`` minus before,
divided by the records accepted during the outage (every one of them is held for ``down``):
bytes per record. The keys are then weighed
one by one (``MEMORY USAGE``) and grouped: envelopes, clean batches (with their claims), the
ledger, dead letters, Celery's queues and unacknowledged messages (retries waiting for their
countdown), the rest. ``--max-retries`` (default 2, so that the run shows dead letters; 8 is the
project's default) sets the down pump's retries.

Prints: "a sink outage of T minutes at R records/s needs about M MB of Redis".
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

from benchlib import (
    Row,
    bench_config,
    bench_redis,
    flush_bench_db,
    fmt_rate,
    interference_row,
    make_record,
    print_table,
    read_json,
    save_rows,
    session,
    write_config,
)

from app.codec import decode_envelope, encode_clean_batch, encode_envelope, record_to_row
from app.config import DEFAULT_KEY_PREFIX
from app.messages import INGEST_QUEUE, pump_queue
from app.stores.batches import EnvelopeStore

TITLE = "11. capacity: Redis memory during a sink outage"
#: The outage the README sentence is stated for.
SENTENCE_MINUTES = 60
#: How long to wait, after the outage, for the envelopes still waiting to go through ingest.
INGEST_WAIT_S = 60.0


#: Records packed for the baseline: the bytes of one record as a clean batch carries it.
BASELINE_RECORDS = 5000


def packed_bytes_per_record() -> float:
    """The baseline: bytes per record of a clean batch of the producer's records (what the
    batch store keeps), measured in this run; Redis's own overhead is the rest."""
    records = [record_to_row(make_record(i)) for i in range(BASELINE_RECORDS)]
    batch_id, rows, _ = decode_envelope(encode_envelope("baseline", records))  # as ingest does
    return len(encode_clean_batch(batch_id, rows)) / BASELINE_RECORDS


def key_class(key: str) -> str:
    if key.startswith("iam-pump:envelope:"):
        return "envelopes"
    if key.startswith("iam-pump:batch:"):
        return "clean batches + claims"
    if key == "iam-pump:ledger" or key.startswith("iam-pump:lease:"):
        return "ledger + leases"
    if key.startswith("iam-pump:dead-letters"):
        return "dead letters"
    if key in ("unacked", "unacked_index") or key.startswith(("ingest", "pump.", "purge")):
        return "Celery queues + unacked (retries)"
    return "other"


def weigh(client: Any) -> dict[str, int]:
    """Bytes of every key of database 12, grouped by what they hold."""
    groups: dict[str, int] = defaultdict(int)
    for key in client.scan_iter(count=1000):
        size = client.memory_usage(key, samples=0) or 0
        groups[key_class(key.decode("utf-8", "replace"))] += int(size)
    return dict(groups)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=10_000.0)
    parser.add_argument("--outage", type=float, default=60.0, help="seconds")
    parser.add_argument("--max-retries", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a 20 s outage")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    outage_s = 20.0 if args.quick else args.outage
    flush_bench_db()
    client = bench_redis()
    with session("capacity", keep=args.keep) as current:
        tmp = current.tmp
        (tmp / "blocker").write_text("a file where the down pump's folder should be\n")
        config = bench_config(tmp)
        config["pumps"] = {
            "up": {"type": "csv", "meta": {"csv_dir": str(tmp / "up")}},
            "down": {
                "type": "csv",
                "max-retries": args.max_retries,
                "meta": {"csv_dir": str(tmp / "blocker" / "csv")},
            },
        }
        path = write_config(tmp / "config.yaml", config)
        queues = ",".join([INGEST_QUEUE, pump_queue("up"), pump_queue("down")])
        worker = current.worker(path, name="capacity", queues=queues)
        time.sleep(1.0)
        before = int(client.info("memory")["used_memory"])
        out = tmp / "producer.json"
        producer = current.producer(
            "--config", str(path), "--rate", str(args.rate), "--duration", str(outage_s),
            "--out", str(out),
        )  # fmt: skip
        samples: list[tuple[float, int]] = []
        start = time.monotonic()
        while producer.popen.poll() is None:
            samples.append((time.monotonic() - start, int(client.info("memory")["used_memory"])))
            time.sleep(1.0)
        result = read_json(out)
        accepted = int(result["stats"]["shipped_records"])
        # Every envelope through ingest (a loaded worker lags): what is left is held for the
        # down sink only.
        envelopes = EnvelopeStore(client, DEFAULT_KEY_PREFIX)
        deadline = time.monotonic() + INGEST_WAIT_S
        while envelopes.waiting() and time.monotonic() < deadline:
            time.sleep(0.5)
        waiting = envelopes.waiting()
        after = int(client.info("memory")["used_memory"])
        groups = weigh(client)
        dead = sum(
            int(client.hlen(b"iam-pump:dead-letters:" + g))
            for g in client.smembers("iam-pump:dead-letters")
        )
        current.stop(producer)
        current.stop(worker)
    interference = interference_row()
    client.close()
    flush_bench_db()
    held = after - before
    packed = packed_bytes_per_record()
    per_record = held / accepted if accepted else float("nan")
    per_minute_mb = per_record * args.rate * 60 / 1e6
    total_mb = per_minute_mb * SENTENCE_MINUTES
    sentence = (
        f"a sink outage of {SENTENCE_MINUTES} minutes at {args.rate:,.0f} records/s needs about "
        f"{total_mb:,.0f} MB of Redis"
    )
    weighed = sum(groups.values())
    parts = ", ".join(
        f"{name} {size / accepted:,.0f} B" for name, size in sorted(groups.items()) if accepted
    )
    rows = [
        Row(
            f"outage of {outage_s:.0f} s at {fmt_rate(args.rate)}: Redis held",
            f"{held / 1e6:,.1f} MB",
            note=f"{accepted:,} records accepted during the outage; {dead} dead-letter batch(es); "
            f"{waiting} envelope(s) still waiting for ingest when weighed",
        ),
        Row(
            "Redis bytes per record held for the down sink",
            f"{per_record:,.0f} B",
            baseline=f"packed in a clean batch: {packed:,.0f} B",
            ratio=f"{per_record / packed:.2f}x",
            note=f"by key (MEMORY USAGE, {weighed / 1e6:,.1f} MB weighed, per record): {parts}",
        ),
        Row("Redis MB per minute of outage", f"{per_minute_mb:,.1f} MB", note=sentence),
    ]
    if interference:
        rows.append(interference)
    print_table(TITLE, rows)
    print(sentence, flush=True)
    series = {
        "rate": args.rate,
        "outage_s": outage_s,
        "samples": samples,
        "bytes_per_record": per_record,
        "groups": groups,
        "accepted": accepted,
        "sentence": sentence,
    }
    save_rows(args.save, TITLE, rows, series=series)
    return rows


if __name__ == "__main__":
    main()
