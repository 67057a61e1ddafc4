"""Profiles of the hot paths with py-spy: the reporter's threads, and the worker's tasks.

    .venv/bin/python bench/profile_hot_paths.py [--seconds 15] [--records 300000] [--out DIR]

Needs py-spy (``pip install py-spy``) and permission to trace (root, or ptrace allowed).

* Reporter: bench/producer.py calls ``record_hit`` flat out (Redis database 12, Celery transport,
  default settings) while py-spy samples every thread; what reaches Redis is deleted twice a
  second, no worker runs. Samples are split by thread: the caller (MainThread, ``record_hit``),
  the cutter, the shipping threads.
* Worker: the ingest queue is filled with ``--records`` records in reporter batches (as
  scale_out.py does), then a ``celery -A app worker -c 2`` drains it into CSV while py-spy samples
  it and its pool processes. Samples are split into the main process (consuming, publishing) and
  the pool processes, and there by task: ``ingest`` and ``write``.

For each part the top functions by inclusive and by own ("self") time are printed, in percent of
that part's samples. The raw collapsed stacks are kept in ``--out`` (flamegraph.pl reads them).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from benchlib import (
    BENCH_DIR,
    CsvCounter,
    bench_config,
    bench_redis,
    flush_bench_db,
    session,
    write_config,
)
from scale_out import fill

from app.messages import INGEST_QUEUE

PY_SPY = str(Path(BENCH_DIR.parent / ".venv" / "bin" / "py-spy"))
SAMPLE_RATE_HZ = 250
TOP = 12
PROJECT_DIRS = ("app/", "tasks/", "pumps/", "bench/", "producer.py", "benchlib.py")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def record(pid: int, seconds: float, out: Path, *, subprocesses: bool = False) -> Path:
    args = [PY_SPY, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(SAMPLE_RATE_HZ)]
    args += ["--threads", "--format", "raw", "-o", str(out), "--nonblocking"]
    if subprocesses:
        args.append("--subprocesses")
    subprocess.run(args, check=True, capture_output=True, timeout=seconds + 60)
    return out


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(encoding="utf-8").splitlines():
        body, _, count = line.rpartition(" ")
        if body and count.isdigit():
            stacks.append((body.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    file = match.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match.group('func')} ({file})"


def summarize(
    title: str, stacks: list[tuple[list[str], int]], keep: Callable[[list[str]], bool]
) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for frames, count in stacks:
        if not keep(frames):
            continue
        code = [short(f) for f in frames if not f.startswith(("process ", "thread ("))]
        if not code:
            continue
        total += count
        for name in set(code):
            if name.split(" (", 1)[-1].startswith(PROJECT_DIRS):
                inclusive[name] += count
        own[code[-1]] += count
    if not total:
        return f"--- {title}: no samples"
    lines = [f"--- {title}: {total} samples"]
    lines.append("  inclusive (project code only):")
    lines += [f"    {n / total:6.1%}  {name}" for name, n in inclusive.most_common(TOP)]
    lines.append("  self:")
    lines += [f"    {n / total:6.1%}  {name}" for name, n in own.most_common(TOP)]
    return "\n".join(lines)


def thread_is(prefix: str) -> Callable[[list[str]], bool]:
    return lambda frames: any(f.startswith("thread (") and prefix in f for f in frames)


def profile_reporter(seconds: float, out_dir: Path) -> str:
    flush_bench_db()
    client = bench_redis()
    with session("profile-reporter") as current:
        config = write_config(current.tmp / "config.yaml", bench_config(current.tmp))
        producer = current.producer(
            "--config",
            str(config),
            "--duration",
            str(seconds + 4),
            "--out",
            str(current.tmp / "producer.json"),
        )
        time.sleep(2)
        spy = subprocess.Popen(
            [
                PY_SPY,
                "record",
                "-p",
                str(producer.pid),
                "-d",
                str(int(seconds)),
                "-r",
                str(SAMPLE_RATE_HZ),
                "--threads",
                "--format",
                "raw",
                "-o",
                str(out_dir / "reporter.txt"),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while spy.poll() is None:
            client.delete(INGEST_QUEUE)
            time.sleep(0.5)
        producer.wait(60)
    client.delete(INGEST_QUEUE)
    client.close()
    stacks = read_stacks(out_dir / "reporter.txt")
    parts = [
        summarize("reporter, all threads", stacks, lambda frames: True),
        summarize(
            "reporter, MainThread (caller: record creation + record_hit)",
            stacks,
            thread_is("MainThread"),
        ),
        summarize("reporter, analytics-cutter", stacks, thread_is("analytics-cutter")),
        summarize("reporter, analytics-shipper-*", stacks, thread_is("analytics-shipper")),
    ]
    return "\n".join(parts)


def profile_worker(records: int, seconds: float, out_dir: Path) -> str:
    flush_bench_db()
    with session("profile-worker") as current:
        config = write_config(current.tmp / "config.yaml", bench_config(current.tmp))
        fill(records, 5000)
        worker = current.worker(config, concurrency=2)
        counter = CsvCounter(current.tmp / "csv")
        record(worker.pid, seconds, out_dir / "worker.txt", subprocesses=True)
        written = counter.count()
    flush_bench_db()
    stacks = read_stacks(out_dir / "worker.txt")

    def depth(frames: list[str]) -> int:
        return sum(1 for f in frames if f.startswith("process "))

    parts = [
        f"({written:,} rows written while sampled for {seconds:.0f} s)",
        summarize("worker main process (consumer)", stacks, lambda f: depth(f) == 1),
        summarize("worker pool processes, all", stacks, lambda f: depth(f) >= 2),
        summarize(
            "worker pool, ingest task",
            stacks,
            lambda f: depth(f) >= 2 and any(x.startswith("ingest (") for x in f),
        ),
        summarize(
            "worker pool, write task",
            stacks,
            lambda f: depth(f) >= 2 and any(x.startswith("write (") for x in f),
        ),
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--out", default="/tmp/iam-pump-profiles")
    parser.add_argument("--only", choices=["reporter", "worker"])
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "reporter"):
        print(profile_reporter(args.seconds, out_dir), flush=True)
    if args.only in (None, "worker"):
        print(profile_worker(args.records, args.seconds, out_dir), flush=True)
    print(f"raw stacks in {out_dir}")


if __name__ == "__main__":
    main()
