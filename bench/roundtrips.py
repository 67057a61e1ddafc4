"""Counts the Redis round trips a process makes, by pipeline stage, for network_rtt.py.

    python bench/roundtrips.py --out DIR [--stage reporter] -- bench/producer.py ARGS...
    python bench/roundtrips.py --out DIR -- -m celery -A app worker ...

Runs the script or module after the ``--`` in this process with redis-py's connections counting:
one round trip is one ``send_packed_command`` (a single command, or a whole pipeline or
transaction, which redis-py sends in one write and whose replies it reads together). Kombu's Redis
transport goes through redis-py too, so a Celery publish or ``BRPOP`` counts like the
application's own calls.

The stage of a call is ``--stage`` (default ``other``); in a Celery worker it is the running
task's name (``ingest``, ``write``) between ``task_prerun`` and ``task_postrun``, and ``worker
loop`` otherwise (polling, acknowledgements). Each process writes ``DIR/rt-<pid>.json``
(``{stage: [round trips, tasks run]}``) after every task, every second, and at exit; a forked
child starts from zero, and a process it starts counts too (``roundtrips_site/sitecustomize.py``),
so the reporter's helper process is counted as the reporter. :func:`collect` adds the files up.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

DUMP_EVERY_S = 1.0


class Counter:
    """Round trips and tasks per stage, in one process."""

    def __init__(self, out: Path, stage: str) -> None:
        self.out = out
        self.default = stage
        self.stage = stage
        self.trips: dict[str, int] = defaultdict(int)
        self.tasks: dict[str, int] = defaultdict(int)
        self.guard = threading.Lock()

    def count(self) -> None:
        with self.guard:
            self.trips[self.stage] += 1

    def reset(self) -> None:
        self.trips.clear()
        self.tasks.clear()
        self.guard = threading.Lock()
        self.stage = self.default

    def dump(self) -> None:
        with self.guard:
            data = {
                s: [self.trips.get(s, 0), self.tasks.get(s, 0)] for s in {*self.trips, *self.tasks}
            }
        path = self.out / f"rt-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        tmp.replace(path)


def install(out: Path, stage: str) -> Counter:
    """Count every round trip of this process (and of the processes it forks) from now on."""
    import redis.connection

    counter = Counter(out, stage)
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        counter.count()
        original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]

    def dumper() -> None:
        stop = threading.Event()
        while not stop.wait(DUMP_EVERY_S):
            counter.dump()

    def start_dumper() -> None:
        threading.Thread(target=dumper, daemon=True, name="roundtrips").start()

    os.register_at_fork(after_in_child=lambda: (counter.reset(), start_dumper()))
    atexit.register(counter.dump)
    start_dumper()
    _hook_celery(counter)
    return counter


def _hook_celery(counter: Counter) -> None:
    try:
        from celery import signals
    except ImportError:
        return

    def prerun(task: Any = None, **_: Any) -> None:
        name = str(getattr(task, "name", "task")).rsplit(".", 1)[-1]
        counter.stage = name
        with counter.guard:
            counter.tasks[name] += 1

    def postrun(**_: Any) -> None:
        counter.stage = "worker loop"
        counter.dump()

    signals.task_prerun.connect(prerun, weak=False)
    signals.task_postrun.connect(postrun, weak=False)
    signals.worker_process_init.connect(
        lambda **_: setattr(counter, "stage", "worker loop"), weak=False
    )
    signals.worker_init.connect(lambda **_: setattr(counter, "stage", "worker loop"), weak=False)


def collect(out: Path) -> dict[str, tuple[int, int]]:
    """``{stage: (round trips, tasks)}`` summed over every process that wrote into ``out``."""
    total: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path in out.glob("rt-*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        for stage, (trips, tasks) in data.items():
            total[stage][0] += trips
            total[stage][1] += tasks
    return {stage: (v[0], v[1]) for stage, v in total.items()}


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1 :]
    options = dict(zip(own[::2], own[1::2], strict=True))
    out = Path(options["--out"])
    out.mkdir(parents=True, exist_ok=True)
    # app/celery_app.py starts a worker again (execv) unless this is set, which would leave the
    # counting behind: set it as that re-execution would.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    stage = options.get("--stage", "other")
    install(out, stage)
    # Processes this one starts (the reporter's helper process) count into the same folder.
    os.environ["BENCH_ROUNDTRIPS_OUT"] = str(out)
    os.environ["BENCH_ROUNDTRIPS_STAGE"] = stage
    site = str(Path(__file__).resolve().parent / "roundtrips_site")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        sys.path.insert(0, str(Path(rest[0]).resolve().parent))
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
