"""Benchmark 3: end to end into CSV, sustained, against a naive one-task-per-record design.

    .venv/bin/python bench/e2e_csv.py [--duration 60] [--batches 5000,2000,1000,500]
                                      [--concurrency 2] [--naive-records 5000] [--quick]

For each batch size: a real ``celery -A app worker -c <concurrency>`` (ingest and pump.csv
queues, Redis database 12, CSV files in a temporary folder) and a reporter process
(bench/producer.py) calling ``record_hit`` flat out for ``--duration`` seconds, with
``pool-size: 4`` and ``records-buffer-size: 4 x batch``. Rows are counted when they are in the
files; the sustained rate is the on-disk rate between the end of the warm-up and the end of the
producing window. Afterwards the bench waits for the backlog to drain and checks that every
accepted record is on disk (at-least-once: duplicates would show as more rows).

Naive design (bench/naive_app.py): ``--naive-records`` single-record tasks are queued first, then
a worker with the same concurrency drains them; its rate is (rows - 1) / (last row - first row).

AMQP (``--amqp URL``, default a virtual host ``iam-pump-bench`` on the local RabbitMQ, created
with ``rabbitmqctl`` if missing; ``--amqp ''`` skips it): the same run with batch
``--amqp-batch`` (5000) and ``broker-url`` set to RabbitMQ, where the batches ride inside the task
messages; compared with the Redis broker's run of the same batch size.

Targets: sustained >= 50,000 records/s, and >= 100x the naive design; AMQP >= 50,000 records/s and
>= 0.6x the Redis broker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from benchlib import (
    BENCH_REDIS_URL,
    INTERFERENCE,
    MAX_BACKLOG_RECORDS,
    CsvCounter,
    Row,
    Session,
    bench_config,
    bench_redis,
    db_untouched,
    flush_bench_db,
    fmt_rate,
    fmt_ratio,
    make_record,
    miss,
    pace_producer,
    print_table,
    read_json,
    save_rows,
    session,
    sustained_rate,
    write_config,
)

from app.messages import INGEST_QUEUE, pump_queue

TITLE = "3. end to end into CSV"
RATE_TARGET = 50_000.0
NAIVE_RATIO_TARGET = 100.0
AMQP_RATIO_TARGET = 0.6
AMQP_BATCH = 5000
#: A virtual host of the benchmark's own, created with rabbitmqctl when it is missing.
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/iam-pump-bench"
POOL_SIZE = 4
DRAIN_TIMEOUT_S = 300.0
#: Stop waiting for the backlog when no row has arrived for this long.
STALL_TIMEOUT_S = 30.0


@dataclass
class E2EResult:
    """One batch-size run."""

    batch: int
    sustained: float
    accepted: int
    on_disk_at_end: int
    final_rows: int
    drain_s: float
    producer_rate: float
    paused_s: float
    untouched: bool
    samples: list[tuple[float, int]]

    @property
    def lost(self) -> int:
        return max(0, self.accepted - self.final_rows)


class Backlog:
    """Task messages waiting in the ingest and pump queues, on a Redis or an AMQP broker."""

    def __init__(self, broker: str | None) -> None:
        self.queues = (INGEST_QUEUE, pump_queue("csv"))
        self.redis = bench_redis() if broker is None else None
        self.amqp = None
        if broker is not None:
            from kombu import Connection

            self.amqp = Connection(broker)
            self.channel = self.amqp.channel()

    def messages(self) -> int:
        if self.redis is not None:
            return sum(int(self.redis.llen(q)) for q in self.queues)
        total = 0
        for queue in self.queues:
            try:
                total += int(self.channel.queue_declare(queue, passive=True).message_count)
            except Exception:  # not declared yet: the worker declares its queues
                self.channel = self.amqp.channel()  # type: ignore[union-attr]
        return total

    def purge(self) -> None:
        """Empty the AMQP queues (Redis: flush_bench_db does it)."""
        if self.amqp is None:
            return
        for queue in (*self.queues, "purge"):
            try:
                self.channel.queue_purge(queue)
            except Exception:
                self.channel = self.amqp.channel()

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
        if self.amqp is not None:
            self.amqp.release()


def run_pipeline(
    current: Session,
    batch: int,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    broker: str | None = None,
) -> E2EResult:
    """One batch size; ``broker`` an AMQP URL (batches inside the messages), else Redis."""
    flush_bench_db()
    name = f"batch-{batch}" + ("-amqp" if broker else "")
    tmp = current.tmp / name
    tmp.mkdir()
    analytics = {"pool-size": POOL_SIZE, "records-buffer-size": POOL_SIZE * batch}
    extra = {"broker-url": broker} if broker else {}
    config = write_config(tmp / "config.yaml", bench_config(tmp, analytics=analytics, **extra))
    backlog_of = Backlog(broker)
    backlog_of.purge()
    worker = current.worker(config, concurrency=concurrency, name=name.replace("-", ""))
    counter = CsvCounter(tmp / "csv")
    out = tmp / "producer.json"
    producer = current.producer(
        "--config",
        str(config),
        "--duration",
        str(duration_s),
        "--out",
        str(out),
        log_name=f"producer-{name}.log",
    )
    paced = pace_producer(
        producer,
        rows=counter.count,
        backlog_records=lambda: batch * backlog_of.messages(),
        duration_s=duration_s,
    )
    rows_at_exit = counter.count()
    result = read_json(out)
    accepted = int(result["stats"]["shipped_records"])
    sustained = sustained_rate(paced.samples, warmup_s, duration_s)
    drain_start = time.monotonic()
    final = counter.count()
    progress = (drain_start, final)
    while final < accepted and time.monotonic() - drain_start < DRAIN_TIMEOUT_S:
        time.sleep(0.5)
        final = counter.count()
        if final != progress[1]:
            progress = (time.monotonic(), final)
        elif time.monotonic() - progress[0] > STALL_TIMEOUT_S:
            break
    drain_s = time.monotonic() - drain_start
    untouched = db_untouched()
    current.stop(producer)
    current.stop(worker)
    backlog_of.purge()
    backlog_of.close()
    return E2EResult(
        batch=batch,
        sustained=sustained,
        accepted=accepted,
        on_disk_at_end=rows_at_exit,
        final_rows=final,
        drain_s=drain_s,
        producer_rate=accepted / max(result["offered_s"], 1e-9),
        paused_s=paced.paused_s,
        untouched=untouched,
        samples=paced.samples,
    )


def run_naive(current: Session, records: int, concurrency: int) -> float:
    """Records/s of the one-task-per-record design, measured on disk."""
    # The naive app reads its broker when imported: the same Redis database as the worker below
    # (REDIS_HOST / REDIS_PORT), not its default.
    os.environ.setdefault("BENCH_BROKER_URL", BENCH_REDIS_URL)
    import naive_app  # the bench-only Celery app (its import needs no broker)

    flush_bench_db()
    tmp = current.tmp / "naive"
    csv_dir = tmp / "csv"
    tmp.mkdir()
    for index in range(records):
        naive_app.app.send_task(
            naive_app.NAIVE_TASK,
            args=(naive_app.row_of(make_record(index)),),
            queue=naive_app.NAIVE_QUEUE,
        )
    naive_app.app.close()
    counter = CsvCounter(csv_dir)
    first: tuple[float, int] | None = None
    env = {"BENCH_CSV_DIR": str(csv_dir), "BENCH_BROKER_URL": BENCH_REDIS_URL}
    proc = current.start(
        [
            *_celery("naive_app"),
            "-Q",
            naive_app.NAIVE_QUEUE,
            "-c",
            str(concurrency),
            "-n",
            "naive@%h",
        ],
        log_name="worker-naive.log",
        env=env,
    )
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    count = 0
    last = (0.0, 0)
    while count < records and time.monotonic() < deadline:
        count = counter.count()
        now = time.monotonic()
        if first is None and count > 0:
            first = (now, count)
        if count != last[1]:
            last = (now, count)
        time.sleep(0.05)
    current.stop(proc)
    if first is None or last[0] <= first[0]:
        return float("nan")
    return (last[1] - first[1]) / (last[0] - first[0])


def ensure_vhost(url: str) -> None:
    """Create the AMQP URL's virtual host (rabbitmqctl on this machine) if it is missing, so the
    benchmark's queues do not mix with anybody else's on the default one."""
    vhost = unquote(urlsplit(url).path.lstrip("/")) or "/"
    if vhost == "/" or shutil.which("rabbitmqctl") is None:
        return
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60
    )
    if vhost in listed.stdout.split():
        return
    user = urlsplit(url).username or "guest"
    for command in (["add_vhost", vhost], ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]):
        subprocess.run(["rabbitmqctl", "-q", *command], capture_output=True, timeout=60)


def amqp_rows(
    batch: int, amqp: E2EResult | None, error: str, results: list[E2EResult]
) -> list[Row]:
    """The RabbitMQ run against the Redis broker's run of the same batch size."""
    if amqp is None:
        return [Row(f"AMQP broker, batch {batch}", "not run", met=False, note=error)]
    same = next((r for r in results if r.batch == batch), None)
    rows = [
        Row(
            f"AMQP broker, batch {batch}: sustained on disk",
            fmt_rate(amqp.sustained),
            target=f">= {fmt_rate(RATE_TARGET)}",
            met=amqp.sustained >= RATE_TARGET,
            note=miss(amqp.sustained, RATE_TARGET, higher_is_better=True)
            + f" [batches inside the messages; reporter shipped {fmt_rate(amqp.producer_rate)}; "
            f"{amqp.final_rows:,} rows for {amqp.accepted:,} accepted]",
        ),
        Row(
            f"AMQP broker, batch {batch}: records lost",
            f"{amqp.lost:,}",
            target="0",
            met=amqp.lost == 0,
        ),
    ]
    if same is not None:
        ratio = amqp.sustained / same.sustained
        rows.append(
            Row(
                f"AMQP vs Redis broker, batch {batch}",
                fmt_rate(amqp.sustained),
                f"Redis {fmt_rate(same.sustained)}",
                fmt_ratio(ratio),
                f">= {AMQP_RATIO_TARGET}x",
                ratio >= AMQP_RATIO_TARGET,
                miss(ratio, AMQP_RATIO_TARGET, higher_is_better=True),
            )
        )
    return rows


def _celery(app: str) -> list[str]:
    from benchlib import PYTHON

    return [
        PYTHON,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-l",
        "info",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="producing seconds per case")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--batches", default="5000,2000,1000,500")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--naive-records", type=int, default=5000)
    parser.add_argument(
        "--amqp",
        default=os.environ.get("BENCH_AMQP_URL", DEFAULT_AMQP_URL),
        help="RabbitMQ broker for the AMQP run ('' to skip it)",
    )
    parser.add_argument("--amqp-batch", type=int, default=AMQP_BATCH)
    parser.add_argument("--quick", action="store_true", help="15 s per case, 3 s warm-up")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    duration_s, warmup_s = (15.0, 3.0) if args.quick else (args.duration, args.warmup)
    batches = [int(b) for b in args.batches.split(",") if b]
    results: list[E2EResult] = []
    with session("e2e", keep=args.keep) as current:
        for batch in batches:
            results.append(run_pipeline(current, batch, args.concurrency, duration_s, warmup_s))
            print(f"  batch {batch}: {fmt_rate(results[-1].sustained)} sustained", flush=True)
        amqp: E2EResult | None = None
        amqp_error = ""
        if args.amqp:
            try:
                ensure_vhost(args.amqp)
                amqp = run_pipeline(
                    current, args.amqp_batch, args.concurrency, duration_s, warmup_s, args.amqp
                )
                print(f"  AMQP batch {args.amqp_batch}: {fmt_rate(amqp.sustained)}", flush=True)
            except Exception as exc:  # RabbitMQ missing or unreachable: reported as a miss
                amqp_error = f"{type(exc).__name__}: {exc}"
        naive = run_naive(current, args.naive_records, args.concurrency)
    flush_bench_db()
    best = max(results, key=lambda r: r.sustained)
    rows: list[Row] = []
    for r in results:
        backlog = r.accepted - r.on_disk_at_end
        rows.append(
            Row(
                f"batch {r.batch} (pool {POOL_SIZE}, -c {args.concurrency}): sustained on disk",
                fmt_rate(r.sustained),
                target=f">= {fmt_rate(RATE_TARGET)}",
                met=r.sustained >= RATE_TARGET,
                note=miss(r.sustained, RATE_TARGET, higher_is_better=True)
                + f" [{duration_s:.0f} s, warm-up {warmup_s:.0f} s; reporter shipped "
                f"{fmt_rate(r.producer_rate)}, paused {r.paused_s:.0f} s to keep <= "
                f"{MAX_BACKLOG_RECORDS:,} records waiting; backlog when it exited "
                f"{backlog:,} records, drained in {r.drain_s:.1f} s; {r.final_rows:,} rows for "
                f"{r.accepted:,} accepted]",
            )
        )
        rows.append(
            Row(
                f"batch {r.batch}: records lost",
                f"{r.lost:,}",
                target="0",
                met=r.lost == 0,
            )
        )
    ratio = best.sustained / naive
    rows.append(
        Row(
            f"best (batch {best.batch}) vs naive 1 task/record",
            fmt_rate(best.sustained),
            f"naive {fmt_rate(naive)}",
            fmt_ratio(ratio),
            f">= {NAIVE_RATIO_TARGET:.0f}x",
            ratio >= NAIVE_RATIO_TARGET,
            miss(ratio, NAIVE_RATIO_TARGET, higher_is_better=True)
            + f" [naive: {args.naive_records:,} records, -c {args.concurrency}]",
        )
    )
    if args.amqp:
        rows += amqp_rows(args.amqp_batch, amqp, amqp_error, results)
    if not all(r.untouched for r in results):
        rows.append(INTERFERENCE)
    print_table(TITLE, rows)
    series = {
        "batch": [r.batch for r in results],
        "sustained": [r.sustained for r in results],
        "concurrency": args.concurrency,
        "amqp": None if amqp is None else {"batch": amqp.batch, "sustained": amqp.sustained},
    }
    save_rows(args.save, TITLE, rows, series=series)
    return rows


if __name__ == "__main__":
    main()
