"""Test support: real servers, real Celery processes, config files. Used by the fixtures."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
import yaml

REPO = Path(__file__).resolve().parents[1]
IN_CI = bool(os.environ.get("CI"))
REDIS_HOST = os.environ.get("REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
#: The Redis database the integration tests own: flushed at the start of every test.
TEST_REDIS_DB = int(os.environ.get("IAM_PUMP_TEST_REDIS_DB", "11"))
#: The Redis user the pump's processes log in as (none: the default user).
REDIS_USERNAME = os.environ.get("REDIS_USERNAME", "")
REDIS_PASSWORD = os.environ.get("REDIS_PASSWORD", "")
#: The user the tests themselves use to empty and inspect their database (none: the default
#: user); a server whose pump user may not FLUSHDB names another one here.
REDIS_ADMIN_USERNAME = os.environ.get("REDIS_ADMIN_USERNAME") or None
REDIS_ADMIN_PASSWORD = os.environ.get("REDIS_ADMIN_PASSWORD") or None


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections there."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout_s):
        return True
    return False


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write a YAML config file and return its path."""
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _login() -> dict[str, str]:
    if not REDIS_PASSWORD:
        return {}
    return {"username": REDIS_USERNAME, "password": REDIS_PASSWORD}


def redis_url(*, port: int = REDIS_PORT, db: int = TEST_REDIS_DB) -> str:
    """A ``redis://`` URL of the tests' server (or another port of it, e.g. a proxy), with the
    login from the environment when there is one (the least-privilege run)."""
    login = ""
    if REDIS_PASSWORD:
        login = f"{quote(REDIS_USERNAME, safe='')}:{quote(REDIS_PASSWORD, safe='')}@"
    return f"redis://{login}{REDIS_HOST}:{port}/{db}"


def admin_redis(db: int = TEST_REDIS_DB, *, port: int = REDIS_PORT) -> redis.Redis:
    """A client for the tests' own use of the Redis server (flushing, inspecting)."""
    return redis.Redis(
        host=REDIS_HOST,
        port=port,
        db=db,
        username=REDIS_ADMIN_USERNAME,
        password=REDIS_ADMIN_PASSWORD,
    )


def base_config(
    tmp_path: Path, *, redis_port: int = REDIS_PORT, db: int = TEST_REDIS_DB, **overrides: Any
) -> dict[str, Any]:
    """A config for one test: its own Redis database, a CSV pump under tmp_path."""
    config: dict[str, Any] = {
        "purge-delay": 1,
        "health-check-address": f"127.0.0.1:{free_port()}",
        # The login from the environment is for the tests' server; a server a test starts for
        # itself has only the default user.
        "redis": {
            "host": REDIS_HOST,
            "port": redis_port,
            "database": db,
            **(_login() if redis_port == REDIS_PORT else {}),
        },
        "delivery": {"retry-backoff-base-s": 0.2, "retry-backoff-max-s": 2},
        "pumps": {"csv": {"type": "csv", "meta": {"csv_dir": str(tmp_path / "csv")}}},
    }
    config.update(overrides)
    return config


class Proc:
    """A child process started by a test, with its output in a log file."""

    def __init__(self, args: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> None:
        self.args = args
        self.log = log
        self._log_file = log.open("ab")
        self.popen = subprocess.Popen(
            args,
            env=env,
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

    def wait_for_output(self, text: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.args[:4]} exited {self.popen.returncode}:\n{self.output()[-3000:]}"
                )
            time.sleep(0.1)
        raise AssertionError(
            f"no {text!r} from {self.args[:4]} in {timeout_s}s:\n{self.output()[-3000:]}"
        )

    def send(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    @staticmethod
    def kill_pid(pid: int, signum: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def kill_group(self, signum: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a worker and its pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the group; returns the exit status."""
        if self.popen.poll() is None:
            self.send(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_group(signal.SIGKILL)
                self.popen.wait(10)
        self.kill_group(signal.SIGKILL)
        self._log_file.close()
        return self.popen.returncode


def celery_env(config_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["IAM_PUMP_CONFIG"] = str(config_path)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def start_worker(
    config_path: Path,
    log: Path,
    *,
    queues: str | None = None,
    concurrency: int = 2,
    name: str = "w1",
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Proc:
    """A real ``celery -A app worker`` subprocess; returns once it is ready."""
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "app",
        "worker",
        "-l",
        "info",
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    if queues:
        args += ["-Q", queues]
    args += extra_args or []
    proc = Proc(args, env=env or celery_env(config_path), log=log, cwd=REPO)
    proc.wait_for_output("ready.", timeout_s=120)
    return proc


def start_beat(
    config_path: Path, log: Path, tmp_path: Path, *, env: dict[str, str] | None = None
) -> Proc:
    """A real ``celery -A app beat`` subprocess."""
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "app",
        "beat",
        "-l",
        "info",
        "-s",
        str(tmp_path / "beat-schedule"),
    ]
    proc = Proc(args, env=env or celery_env(config_path), log=log, cwd=REPO)
    proc.wait_for_output("beat: Starting", timeout_s=60)
    return proc


def run_cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``iam-pump ARGS`` (``python -m app.cli``) run to completion, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout_s,
    )


def read_csv_rows(directory: Path) -> list[dict[str, str]]:
    """Every data row of every CSV file in a folder (headers checked and skipped)."""
    rows: list[dict[str, str]] = []
    for path in sorted(directory.glob("*.csv")):
        with path.open(newline="", encoding="utf-8") as handle:
            rows.extend(csv.DictReader(handle))
    return rows


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


class RedisServer:
    """A ``redis-server`` of the test's own on a free port (never the shared one) or on ``port``
    (to start one again where another was stopped), no persistence, with extra ``--name value``
    settings; ``client()`` talks to it."""

    def __init__(self, directory: Path, *, port: int | None = None, **settings: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
        for name, value in settings.items():
            args += [f"--{name.replace('_', '-')}", value]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self._answers, 10, interval_s=0.05):
            self.stop()
            raise AssertionError(f"redis-server on port {self.port} did not start")

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def _answers(self) -> bool:
        with contextlib.closing(self.client()) as client:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def fill(client: redis.Redis, *, first: int = 0) -> int:
    """Write ballast until Redis refuses even a small value with OOM; returns the keys written."""
    size, index = 1024 * 1024, first
    while True:
        try:
            client.set(f"ballast:{index}", b"x" * size)
            index += 1
        except redis.exceptions.OutOfMemoryError:
            if size <= 64:
                return index - first
            size //= 8


class KeepFull:
    """Keeps Redis full from a thread, as another tenant would: whatever the workers free (a
    written batch's bytes) is taken again at once by more ballast."""

    def __init__(self, server: RedisServer) -> None:
        self._client = server.client()
        self._stop = threading.Event()
        self.keys = fill(self._client)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.keys += fill(self._client, first=self.keys)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()


class MountRefused(RuntimeError):
    """A small filesystem could not be mounted here (not root, or in a container without it)."""


@contextlib.contextmanager
def small_filesystem(directory: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted on ``directory`` for the block: a disk that fills.

    Raises :class:`MountRefused` when mounting is not permitted.
    """
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        raise MountRefused(f"cannot mount a tmpfs: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill_up(directory: Path, *, chunk_bytes: int = 4096) -> Path:
    """Fill the filesystem holding ``directory`` with one ballast file; returns it."""
    ballast = directory / "ballast"
    chunk = b"x" * chunk_bytes
    with ballast.open("ab", buffering=0) as handle:
        while True:
            try:
                handle.write(chunk)
            except OSError:
                if chunk_bytes == 1:
                    return ballast
                chunk_bytes = max(1, chunk_bytes // 4)
                chunk = chunk[:chunk_bytes]


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """Collect processes and stop them all, whatever happens."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            proc.stop(timeout_s=15)
