"""Benchmark 9: the pipeline with Redis across a network, at 0, 1 and 5 ms of round-trip time.

    .venv/bin/python bench/network_rtt.py [--rtts 0,1,5] [--duration 20] [--rounds 2] [--quick]

Redis runs in a network namespace of its own; the reporter and the worker run in another, the
"client" host, and reach it over a veth pair through a third namespace, the wire (the topology of
tests/network/topology.py). This kernel has no ``netem`` qdisc, so the delay comes from the same
userspace wire the network tests use (tests/network/wire.py): every frame is held for half the
round-trip time in each direction. The 0 ms case goes through the same wire with no delay, so the
only thing that changes between cases is the delay. The measured Redis PING time from the client
host is printed next to each case.

At each round-trip time:

* shipping: the reporter process (bench/producer.py, flat out, pool-size 4, buffer 4 x batch)
  alone for ``--duration`` seconds, no worker; records/s it handed to the broker;
* end to end: a ``celery -A app worker -c 2`` and the reporter together, rows on disk per second
  after a warm-up (backlog kept under 200,000 records as in e2e_csv.py).

The round-trip times are measured in ``--rounds`` interleaved rounds (0, 1, 5, 0, 1, 5 ms) and
the median of each kept, so that the machine's drift falls on all of them alike.

Both processes run under bench/roundtrips.py, which counts every Redis round trip (one command,
or one pipeline / transaction / script) by stage: the reporter's per batch shipped, the ingest
task's and the write task's per task, and the worker's own loop (polling, acknowledgements) per
batch.

Targets: at 1 ms the end-to-end rate >= 0.8x the 0 ms rate; at 5 ms >= 0.5x. Needs root and
iproute2 (network namespaces).
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH_DIR,
    BENCH_REDIS_DB,
    PYTHON,
    REPO,
    CsvCounter,
    Row,
    Session,
    fmt_rate,
    fmt_ratio,
    free_port,
    miss,
    pace_producer,
    print_table,
    read_json,
    save_rows,
    session,
    sustained_rate,
    write_config,
)

sys.path.insert(0, str(REPO))  # tests.network: the namespaces and the userspace wire
from roundtrips import collect

from app.messages import INGEST_QUEUE, pump_queue
from tests.network.topology import Topology, netns_unavailable, remove_stale

TITLE = "9. network round trips"
TARGETS = {1.0: 0.8, 5.0: 0.5}
POOL_SIZE = 4
REDIS_PORT_IN_NS = 6379
DRAIN_TIMEOUT_S = 120.0


@dataclass
class Case:
    rtt_ms: float
    ping_ms: float = 0.0
    shipping: float = 0.0
    e2e: float = 0.0
    shipped_batches: int = 0
    trips: dict[str, float] = field(default_factory=dict)
    rounds: list[tuple[float, float]] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)
    lost: int = 0


class Net:
    """Redis on host ``redis``; the client host reaches it across link ``rc`` (the wire)."""

    def __init__(self, current: Session) -> None:
        self.current = current
        remove_stale()
        self.topology = Topology(current.tmp)
        self.link = self.topology.link("rc", "redis", "client")
        self.control = self.topology.reach("redis")
        self.client_ns = self.topology.ns("client")
        self.redis_ns = self.topology.ns("redis")
        self.current.start(
            [
                *("ip", "netns", "exec", self.redis_ns, "redis-server"),
                *("--port", str(REDIS_PORT_IN_NS), "--bind", "0.0.0.0", "--protected-mode", "no"),
                *("--save", "", "--appendonly", "no", "--dir", str(current.tmp)),
            ],
            log_name="redis.log",
        )
        import redis

        self.redis = redis.Redis(host=self.control, port=REDIS_PORT_IN_NS, db=BENCH_REDIS_DB)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.redis.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def shape(self, rtt_ms: float) -> None:
        self.topology.shape(
            "rc", delay_ms=rtt_ms / 2, loss=0.0, log=self.current.tmp / f"wire-{rtt_ms}.log"
        )

    def in_client(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.client_ns, *args]

    def ping_ms(self, pings: int = 50) -> float:
        script = (
            "import sys, time, redis\n"
            "r = redis.Redis(host=sys.argv[1], port=int(sys.argv[2]))\n"
            "r.ping()\n"
            "t = time.perf_counter()\n"
            "for _ in range(int(sys.argv[3])): r.ping()\n"
            "print((time.perf_counter() - t) / int(sys.argv[3]) * 1000)\n"
        )
        args = [PYTHON, "-c", script, self.link.a_address, str(REDIS_PORT_IN_NS), str(pings)]
        done = subprocess.run(
            self.in_client(args), capture_output=True, text=True, timeout=60, check=True
        )
        return float(done.stdout.strip())

    def close(self) -> None:
        self.redis.close()
        self.topology.destroy()


def config(tmp: Path, net: Net, batch: int) -> Path:
    data: dict[str, Any] = {
        "purge-delay": 2,
        "health-check-address": f"127.0.0.1:{free_port()}",
        "redis": {
            "host": net.link.a_address,
            "port": REDIS_PORT_IN_NS,
            "database": BENCH_REDIS_DB,
        },
        "analytics": {"pool-size": POOL_SIZE, "records-buffer-size": POOL_SIZE * batch},
        "pumps": {"csv": {"type": "csv", "meta": {"csv_dir": str(tmp / "csv")}}},
    }
    return write_config(tmp / "config.yaml", data)


def counted(out: Path, stage: str, args: list[str]) -> list[str]:
    return [
        PYTHON,
        str(BENCH_DIR / "roundtrips.py"),
        "--out",
        str(out),
        "--stage",
        stage,
        "--",
        *args,
    ]


def run_case(
    current: Session,
    net: Net,
    rtt_ms: float,
    batch: int,
    duration_s: float,
    warmup_s: float,
    round_: int = 0,
) -> Case:
    case = Case(rtt_ms)
    net.shape(rtt_ms)
    case.ping_ms = net.ping_ms()
    tmp = current.tmp / f"rtt-{rtt_ms:g}-{round_}"
    tmp.mkdir()
    cfg = config(tmp, net, batch)
    counts = tmp / "roundtrips"

    # Shipping alone: no worker, the batches stay in Redis.
    net.redis.flushdb()
    out = tmp / "shipping.json"
    args = [str(BENCH_DIR / "producer.py"), "--config", str(cfg), "--duration", str(duration_s)]
    producer = current.start(
        net.in_client(counted(counts / "shipping", "reporter", [*args, "--out", str(out)])),
        log_name=f"shipping-{rtt_ms:g}-{round_}.log",
    )
    producer.wait(duration_s + 120)
    result = read_json(out)
    case.shipping = result["stats"]["shipped_records"] / max(result["offered_s"], 1e-9)
    case.shipped_batches = int(result["stats"].get("shipped_batches", 0))
    shipping_trips = collect(counts / "shipping").get("reporter", (0, 0))[0]
    current.stop(producer)
    net.redis.flushdb()

    # End to end.
    env = {"IAM_PUMP_CONFIG": str(cfg)}
    worker_args = ["-m", "celery", "-A", "app", "worker", "-l", "info", "-c", "2"]
    worker_args += ["-n", f"rtt{rtt_ms:g}r{round_}@%h", "--without-gossip", "--without-mingle"]
    worker_args += ["--without-heartbeat"]
    worker = current.start(
        net.in_client(counted(counts / "e2e", "worker loop", worker_args)),
        log_name=f"worker-{rtt_ms:g}-{round_}.log",
        env=env,
    )
    worker.wait_for_output("ready.", timeout_s=120)
    out = tmp / "e2e.json"
    producer = current.start(
        net.in_client(counted(counts / "e2e", "reporter", [*args, "--out", str(out)])),
        log_name=f"e2e-{rtt_ms:g}-{round_}.log",
    )
    counter = CsvCounter(tmp / "csv")
    queues = (INGEST_QUEUE, pump_queue("csv"))
    paced = pace_producer(
        producer,
        rows=counter.count,
        backlog_records=lambda: batch * sum(int(net.redis.llen(q)) for q in queues),
        duration_s=duration_s,
    )
    e2e = sustained_rate(paced.samples, warmup_s, duration_s)
    if math.isfinite(e2e):
        case.e2e = e2e
    result = read_json(out)
    accepted = int(result["stats"]["shipped_records"])
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while counter.count() < accepted and time.monotonic() < deadline:
        time.sleep(0.5)
    case.lost = max(0, accepted - counter.count())
    time.sleep(1.5)  # the last dumps of the worker's processes
    totals = collect(counts / "e2e")
    current.stop(producer)
    current.stop(worker)
    batches = max(1, int(result["stats"].get("shipped_batches", 0)))
    case.trips["reporter (per batch shipped, alone)"] = shipping_trips / max(
        1, case.shipped_batches
    )
    ingests = totals.get("ingest", (0, 0))[1] or batches
    for stage, (trips, tasks) in sorted(totals.items()):
        if stage == "reporter":
            case.trips["reporter (per batch shipped, end to end)"] = trips / batches
        elif stage == "worker loop":
            case.trips["worker loop (per ingested batch)"] = trips / max(1, ingests)
        else:
            case.trips[f"{stage} task (per task)"] = trips / max(1, tasks)
            case.tasks[stage] = tasks
    net.redis.flushdb()
    return case


def merge(runs: list[Case]) -> Case:
    """One round-trip time over its rounds: median rates, mean round trips, losses summed."""
    case = Case(runs[0].rtt_ms)
    case.ping_ms = statistics.median(r.ping_ms for r in runs)
    case.shipping = statistics.median(r.shipping for r in runs)
    case.e2e = statistics.median(r.e2e for r in runs)
    case.lost = sum(r.lost for r in runs)
    case.rounds = [(r.shipping, r.e2e) for r in runs]
    for stage in runs[0].trips:
        case.trips[stage] = statistics.mean(r.trips.get(stage, 0.0) for r in runs)
    return case


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtts", default="0,1,5", help="round-trip times in ms")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median kept)")
    parser.add_argument("--quick", action="store_true", help="8 s per case, 3 s warm-up")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--save", help="append the rows as JSON to this file (run_all.py)")
    args = parser.parse_args(argv)
    duration_s, warmup_s = (8.0, 3.0) if args.quick else (args.duration, args.warmup)
    rounds = args.rounds
    rtts = [float(r) for r in args.rtts.split(",") if r]
    reason = netns_unavailable()
    if reason is not None:
        rows = [Row("network namespaces", "unavailable", met=False, note=reason)]
        print_table(TITLE, rows)
        save_rows(args.save, TITLE, rows)
        return rows
    runs: list[Case] = []
    with session("rtt", keep=args.keep) as current:
        net = Net(current)
        try:
            # Interleaved rounds, so the machine's drift hits every round-trip time alike.
            for round_ in range(rounds):
                for rtt in rtts:
                    runs.append(
                        run_case(current, net, rtt, args.batch, duration_s, warmup_s, round_)
                    )
                    c = runs[-1]
                    print(
                        f"  round {round_ + 1}, rtt {rtt:g} ms (PING {c.ping_ms:.2f} ms): "
                        f"shipping {fmt_rate(c.shipping)}, end to end {fmt_rate(c.e2e)}",
                        flush=True,
                    )
        finally:
            current.stop_all()
            net.close()
    cases = [merge([r for r in runs if r.rtt_ms == rtt]) for rtt in rtts]
    base = next((c for c in cases if c.rtt_ms == 0), cases[0])
    rows: list[Row] = []
    series: dict[str, Any] = {"rtt_ms": [], "ping_ms": [], "shipping": [], "e2e": []}
    for c in cases:
        for name, value, reference in (
            ("shipping", c.shipping, base.shipping),
            ("end to end", c.e2e, base.e2e),
        ):
            ratio = value / reference if reference else float("nan")
            target = TARGETS.get(c.rtt_ms) if name == "end to end" else None
            rows.append(
                Row(
                    f"rtt {c.rtt_ms:g} ms (PING {c.ping_ms:.2f} ms): {name}",
                    fmt_rate(value),
                    f"0 ms {fmt_rate(reference)}",
                    fmt_ratio(ratio),
                    f">= {target:.1f}x" if target else "",
                    (ratio >= target) if target else None,
                    (miss(ratio, target, higher_is_better=True) if target else "")
                    + f" [median of {len(c.rounds)} interleaved rounds: "
                    + " / ".join(fmt_rate(r[0 if name == "shipping" else 1]) for r in c.rounds)
                    + "]",
                )
            )
        trips = ", ".join(f"{stage} {n:.1f}" for stage, n in c.trips.items())
        rows.append(
            Row(
                f"rtt {c.rtt_ms:g} ms: Redis round trips",
                f"{sum(v for k, v in c.trips.items() if 'alone' not in k):.1f}/batch",
                note=trips + f" [batch {args.batch}]",
            )
        )
        rows.append(
            Row(f"rtt {c.rtt_ms:g} ms: records lost", str(c.lost), target="0", met=c.lost == 0)
        )
        series["rtt_ms"].append(c.rtt_ms)
        series["ping_ms"].append(c.ping_ms)
        series["shipping"].append(c.shipping)
        series["e2e"].append(c.e2e)
        series.setdefault("trips", []).append(c.trips)
    print_table(TITLE, rows)
    save_rows(args.save, TITLE, rows, series=series)
    return rows


if __name__ == "__main__":
    main()
