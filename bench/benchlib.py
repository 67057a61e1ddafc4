"""Shared helpers of the benchmarks: result tables, Redis DB 12, real worker processes, CSV counts.

Every benchmark owns Redis database 12 (``BENCH_REDIS_DB``) and flushes it when it starts; it never
touches another database. Processes a benchmark starts are stopped, and temporary folders removed,
whatever happens (Ctrl+C and SIGTERM included): use :func:`session`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

from app.analytics import AnalyticsRecord

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
REDIS_HOST = os.environ.get("REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
#: The only Redis database the benchmarks use (flushed at the start of each benchmark).
BENCH_REDIS_DB = 12
BENCH_REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{BENCH_REDIS_DB}"
#: Set when a benchmark flushes database 12; gone if someone else flushed it since.
SENTINEL_KEY = "bench:owner"
WORKER_READY_TIMEOUT_S = 60.0
PROCESS_STOP_TIMEOUT_S = 20.0
#: A paced reporter process is paused (SIGSTOP) while more records than this wait in Redis.
MAX_BACKLOG_RECORDS = 200_000
#: How often a paced run counts the rows on disk.
SAMPLE_EVERY_S = 1.0
#: How often a paced run looks at the backlog.
BACKLOG_POLL_S = 0.1
#: A paused reporter is let go this long after its producing window, whatever the backlog.
RESUME_AFTER_WINDOW_S = 5.0


# -- result tables ---------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    """One line of a result table. ``met`` is None for a line that has no target."""

    measurement: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def met_text(self) -> str:
        if self.met is None:
            return "-"
        return "yes" if self.met else "NO"


HEADERS = ("measurement", "value", "baseline", "ratio", "target", "met?")


def render_table(title: str, rows: Sequence[Row]) -> str:
    """The rows as a fixed-width text table, with notes (misses explained) under it."""
    cells = [HEADERS] + [
        (r.measurement, r.value, r.baseline, r.ratio, r.target, r.met_text) for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    rule = "-+-".join("-" * w for w in widths)
    lines = [f"== {title} ==", " | ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True))]
    lines.append(rule)
    for line in cells[1:]:
        lines.append(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
    notes = [f"  * {r.measurement}: {r.note}" for r in rows if r.note]
    if notes:
        lines.append("notes:")
        lines += notes
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[Row]) -> None:
    print(render_table(title, rows), flush=True)


def save_rows(
    path: str | None, title: str, rows: Sequence[Row], *, series: dict[str, Any] | None = None
) -> None:
    """Append the rows as one JSON line (for run_all.py's combined table).

    ``series`` (optional) are the measured figures behind the rows, for bench/charts.py.
    """
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        data: dict[str, Any] = {"title": title, "rows": [asdict(r) for r in rows]}
        if series is not None:
            data["series"] = series
        handle.write(json.dumps(data) + "\n")


def load_rows(path: str) -> list[tuple[str, list[Row]]]:
    out: list[tuple[str, list[Row]]] = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as handle:
        for line in handle:
            data = json.loads(line)
            out.append((data["title"], [Row(**r) for r in data["rows"]]))
    return out


def fmt_rate(per_s: float) -> str:
    return f"{per_s:,.0f}/s"


def fmt_ns(ns: float) -> str:
    if ns >= 1_000_000:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 10_000:
        return f"{ns / 1e3:.1f} us"
    if ns >= 1_000:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.0f} ns"


def fmt_ratio(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}x"


def miss(value: float, limit: float, *, higher_is_better: bool) -> str:
    """A note saying by how much a target was missed ("" when met)."""
    if higher_is_better and value < limit:
        return f"missed: {value / limit:.0%} of the target ({limit - value:,.3g} short)"
    if not higher_is_better and value > limit:
        return f"missed: {value / limit:.2f}x the limit ({value - limit:,.3g} over)"
    return ""


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return float(sorted_values[index])


# -- Redis -----------------------------------------------------------------------------------


def bench_redis() -> redis.Redis:
    """A client on the benchmarks' database."""
    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BENCH_REDIS_DB)


def flush_bench_db() -> None:
    """Empty database 12 (only that one) and mark it as ours (see :func:`db_untouched`)."""
    client = bench_redis()
    try:
        client.flushdb()
        client.set(SENTINEL_KEY, os.getpid())
    finally:
        client.close()


def db_untouched() -> bool:
    """False when database 12 was flushed by someone else since our last flush_bench_db()."""
    client = bench_redis()
    try:
        return client.get(SENTINEL_KEY) is not None
    finally:
        client.close()


#: The failing row a benchmark adds when another process flushed database 12 during its run.
INTERFERENCE = Row(
    "database 12 untouched during the run",
    "NO",
    met=False,
    note="another process flushed Redis database 12 while this ran: "
    "queued records were lost and the numbers above are not valid; run again",
)


def interference_row() -> Row | None:
    """:data:`INTERFERENCE` when database 12 was flushed by someone else, else None."""
    return None if db_untouched() else INTERFERENCE


def redis_cpu_s(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used (user + sys, all threads)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def free_port() -> int:
    """A TCP port nothing listens on right now (for 'broker unreachable')."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- configs ---------------------------------------------------------------------------------


def bench_config(
    tmp: Path, *, analytics: dict[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    """An iam-pump config on database 12 with one CSV pump under ``tmp/csv``."""
    config: dict[str, Any] = {
        "purge-delay": 2,
        "health-check-address": f"127.0.0.1:{free_port()}",
        "redis": {"host": REDIS_HOST, "port": REDIS_PORT, "database": BENCH_REDIS_DB},
        "pumps": {"csv": {"type": "csv", "meta": {"csv_dir": str(tmp / "csv")}}},
    }
    if analytics:
        config["analytics"] = analytics
    config.update(overrides)
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# -- processes -------------------------------------------------------------------------------


class Proc:
    """A child process in its own session, its output in a log file."""

    def __init__(
        self,
        args: list[str],
        *,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("ab")
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        pythonpath = [str(BENCH_DIR), str(REPO)]
        if full_env.get("PYTHONPATH"):
            pythonpath.append(full_env["PYTHONPATH"])
        full_env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            args,
            env=full_env,
            cwd=cwd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for_output(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.args[:6]} exited {self.popen.returncode}:\n{self.output()[-3000:]}"
                )
            time.sleep(0.1)
        raise RuntimeError(f"no {text!r} from {self.args[:6]} in {timeout_s}s")

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout_s)

    def stop(self, timeout_s: float = PROCESS_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole process group."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                # A process paused with SIGSTOP (e2e_csv.py's backpressure) must run to exit.
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._log_file.close()
        return self.popen.returncode


@dataclass
class Session:
    """What one benchmark run started: processes to stop and a temporary folder to remove."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, args: list[str], *, log_name: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(args, log=self.tmp / log_name, env=env)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout_s: float = PROCESS_STOP_TIMEOUT_S) -> int | None:
        code = proc.stop(timeout_s)
        if proc in self.procs:
            self.procs.remove(proc)
        return code

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(timeout_s=10)
        self.procs.clear()

    def worker(
        self,
        config_path: Path,
        *,
        concurrency: int = 2,
        name: str = "w1",
        queues: str | None = None,
        app: str = "app",
        env: dict[str, str] | None = None,
        log_level: str = "info",
    ) -> Proc:
        """A real ``celery -A app worker`` subprocess; returns once it is ready."""
        args = [
            PYTHON,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-l",
            log_level,
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        if queues:
            args += ["-Q", queues]
        full_env = {"IAM_PUMP_CONFIG": str(config_path), **(env or {})}
        proc = self.start(args, log_name=f"worker-{name}.log", env=full_env)
        proc.wait_for_output("ready.", timeout_s=WORKER_READY_TIMEOUT_S)
        return proc

    def producer(self, *args: str, log_name: str = "producer.log") -> Proc:
        """bench/producer.py in a subprocess (see its docstring for the arguments)."""
        return self.start([PYTHON, str(BENCH_DIR / "producer.py"), *args], log_name=log_name)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def session(name: str, *, keep: bool = False) -> Iterator[Session]:
    """A temporary folder and a list of processes, all cleaned up on exit, Ctrl+C or SIGTERM."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # Ctrl+C must clean up even when the shell started us with SIGINT ignored (background job).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix=f"iam-pump-bench-{name}-"))
    current = Session(tmp)
    try:
        yield current
    finally:
        current.stop_all()
        if keep:
            print(f"(kept {tmp})", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


# -- measuring -------------------------------------------------------------------------------


class CsvCounter:
    """Counts data rows in the CSV files of a folder, reading only what was appended since."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}
        self._newlines = 0

    def count(self) -> int:
        if self.directory.is_dir():
            for path in self.directory.glob("*.csv"):
                offset = self._offsets.get(path, 0)
                with path.open("rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
                self._offsets[path] = offset + len(data)
                self._newlines += data.count(b"\n")
        # One header line per file.
        return self._newlines - len(self._offsets)


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child_pids(pid: int) -> list[int]:
    """Direct children of a process."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                children += [int(p) for p in handle.read().split()]
    return children


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants."""
    out = [pid]
    for child in child_pids(pid):
        out += tree_pids(child)
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


def read_json(path: Path, timeout_s: float = 60.0) -> dict[str, Any]:
    """A JSON file a subprocess writes when it is done."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            with contextlib.suppress(json.JSONDecodeError):
                data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
                return data
        time.sleep(0.1)
    raise RuntimeError(f"{path} was not written in {timeout_s}s")


@dataclass(slots=True)
class PacedRun:
    """What :func:`pace_producer` saw: (seconds since start, rows on disk) and the time paused."""

    samples: list[tuple[float, int]]
    paused_s: float


def pace_producer(
    producer: Proc,
    *,
    rows: Callable[[], int],
    backlog_records: Callable[[], int],
    duration_s: float,
) -> PacedRun:
    """Sample ``rows()`` every second until the producer exits, keeping the backlog bounded.

    The producer is paused (SIGSTOP) while ``backlog_records()`` exceeds
    :data:`MAX_BACKLOG_RECORDS` and resumed below half of it, or once its window (``duration_s``)
    is :data:`RESUME_AFTER_WINDOW_S` behind it, so that it can finish.
    """
    start = time.monotonic()
    samples: list[tuple[float, int]] = []
    paused = False
    paused_s = paused_at = 0.0
    next_sample = start
    while producer.popen.poll() is None:
        now = time.monotonic()
        if now >= next_sample:
            samples.append((now - start, rows()))
            next_sample += SAMPLE_EVERY_S
        backlog = backlog_records()
        if not paused and backlog > MAX_BACKLOG_RECORDS:
            producer.popen.send_signal(signal.SIGSTOP)
            paused, paused_at = True, now
        elif paused and (
            backlog < MAX_BACKLOG_RECORDS // 2 or now - start > duration_s + RESUME_AFTER_WINDOW_S
        ):
            producer.popen.send_signal(signal.SIGCONT)
            paused = False
            paused_s += now - paused_at
        time.sleep(BACKLOG_POLL_S)
    return PacedRun(samples, paused_s)


def sustained_rate(
    samples: Sequence[tuple[float, int]], warmup_s: float, duration_s: float
) -> float:
    """Rows per second between the warm-up and the end of the window (NaN: too few samples)."""
    window = [(t, n) for t, n in samples if warmup_s <= t <= duration_s]
    if len(window) < 2:
        return math.nan
    return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])


def wait_for_rows(counter: CsvCounter, expected: int, timeout_s: float) -> int:
    """Wait until ``expected`` rows are on disk (or the timeout); returns the count."""
    deadline = time.monotonic() + timeout_s
    count = counter.count()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        count = counter.count()
    return count


# -- records ---------------------------------------------------------------------------------

_REQUEST = (
    '{{"resource":"resources:articles:ladon-introduction-{i}","action":"delete",'
    '"subject":"users:peter-{u}","context":{{"remoteIPAddress":"192.168.0.{h}"}}}}'
)
_POLICIES = (
    '[{{"id":"p{p}","description":"One policy to rule them all.","subjects":'
    '["users:<peter|ken>","users:maria","groups:<.*>"],"effect":"allow","resources":'
    '["resources:articles:<.*>","resources:printer"],"actions":["<create|delete>","get"]}}]'
)
_DECIDERS = '[{{"id":"p{p}","effect":"allow","reason":"matched subject, resource and action"}}]'


def make_record(index: int, *, stamp_ns: int | None = None) -> AnalyticsRecord:
    """A realistic record (about 500 bytes of strings, like one iam authorization decision).

    With ``stamp_ns`` the conclusion carries ``lat=<ns>``, read back from the CSV by the latency
    benchmark.
    """
    user = index % 97
    policy = index % 50
    conclusion = f"policies p{policy} allow access"
    if stamp_ns is not None:
        conclusion += f" lat={stamp_ns}"
    return AnalyticsRecord(
        timestamp=int(time.time()),
        username=f"peter-{user}",
        effect="allow",
        conclusion=conclusion,
        request=_REQUEST.format(i=index, u=user, h=index % 250),
        policies=_POLICIES.format(p=policy),
        deciders=_DECIDERS.format(p=policy),
    )
