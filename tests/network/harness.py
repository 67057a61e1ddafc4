"""One deployment on its own network: Redis, a worker, a MongoDB sink and a reporter, each a host.

::

    reporter ──rr── redis ──wr── worker ──ws── sink (MongoDB stand-in)

The worker host runs ``iam-pump run`` (worker, beat and the health endpoint); the reporter host
runs :mod:`tests.network.reporter`. The test process reaches the worker's health endpoint, Redis
and the sink over control links, never through the links it cuts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo
import redis

from tests.network.topology import Topology
from tests.support import REPO, Proc, wait_until, write_config

REDIS_PORT = 6379
MONGO_PORT = 27017
HEALTH_PORT = 7070
DATABASE = "netfault"
COLLECTION = "records"


def mongo_standin() -> str | None:
    """The stand-in MongoDB server's executable (scripts/test-servers.sh install), if any."""
    base = os.environ.get("IAM_PUMP_SERVERS_DIR") or str(REPO / ".cache" / "test-servers")
    candidate = Path(base) / "venv-mongo" / "bin" / "nx-27017"
    if candidate.exists():
        return str(candidate)
    return shutil.which("nx-27017")


@dataclass
class Health:
    """One answer of the worker host's health endpoint."""

    status: int
    body: dict[str, Any]
    took_s: float

    @property
    def failing(self) -> list[str]:
        return list(self.body.get("failing", []))


class Deployment:
    """Builds the hosts and links, starts the four programs, and measures what happened."""

    def __init__(self, workdir: Path, *, tag: str) -> None:
        self.workdir = workdir
        self.tag = tag
        self.net = Topology(workdir)
        self.procs: list[Proc] = []
        links = self.net
        try:
            self.wr = links.link("wr", "redis", "worker")
            self.rr = links.link("rr", "redis", "reporter")
            self.ws = links.link("ws", "sink", "worker")
            self.health_url = f"http://{links.reach('worker')}:{HEALTH_PORT}/healthz"
            redis_address, sink_address = links.reach("redis"), links.reach("sink")
        except BaseException:
            links.destroy()
            raise
        self.redis = redis.Redis(host=redis_address, port=REDIS_PORT, socket_timeout=10)
        self.mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            sink_address, MONGO_PORT, directConnection=True, serverSelectionTimeoutMS=10000
        )
        self.reporter: Proc | None = None
        self.worker: Proc | None = None

    # -- start --------------------------------------------------------------------------------

    def start_servers(self, mongo_binary: str) -> None:
        """Redis and the MongoDB stand-in, each on its own host."""
        self.procs.append(
            self.net.run(
                "redis",
                [
                    "redis-server",
                    "--port",
                    str(REDIS_PORT),
                    "--bind",
                    "0.0.0.0",
                    "--protected-mode",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                log=self.workdir / "redis.log",
            )
        )
        self.procs.append(
            self.net.run(
                "sink",
                [
                    mongo_binary,
                    "--db",
                    "memory",
                    "--host",
                    "0.0.0.0",
                    "-p",
                    str(MONGO_PORT),
                    "--log-file",
                    str(self.workdir / "mongo.log"),
                    "--pid-file",
                    str(self.workdir / "mongo.pid"),
                ],
                log=self.workdir / "mongo.out",
            )
        )
        assert wait_until(self._redis_pings, 20), "Redis did not start"
        assert wait_until(self._mongo_pings, 30), "the MongoDB stand-in did not start"

    def worker_config(self, **delivery: Any) -> Path:
        """The worker host's config: Redis across link wr, MongoDB across link ws."""
        config: dict[str, Any] = {
            "purge-delay": 5,
            "health-check-address": f"0.0.0.0:{HEALTH_PORT}",
            "redis": {"host": self.wr.a_address, "port": REDIS_PORT, "database": 0},
            "pumps": {
                "mongo": {
                    "type": "mongo",
                    "meta": {
                        "mongo_url": f"mongodb://{self.ws.a_address}:{MONGO_PORT}/{DATABASE}",
                        "collection_name": COLLECTION,
                    },
                }
            },
        }
        # A lost task is sent again 20-25 s after its claim stopped moving (defaults: 120-150 s).
        config["delivery"] = {"redelivery-window-s": 20, "sweep-interval-s": 5, **delivery}
        return write_config(self.workdir / "worker.yaml", config)

    def start_worker(self, config: Path, *, concurrency: int = 2) -> None:
        """``iam-pump run`` on the worker host; returns once its health endpoint says 200."""
        args = [sys.executable, "-m", "app.cli", "run", "--config", str(config)]
        args += ["--concurrency", str(concurrency)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", IAM_PUMP_CONFIG=str(config))
        self.worker = self.net.run("worker", args, log=self.workdir / "worker.log", env=env)
        self.procs.append(self.worker)
        self.worker.wait_for_output("ready.", timeout_s=120)
        assert wait_until(lambda: self.health(timeout_s=15).status == 200, 60), self.health()

    def start_reporter(
        self, *, rate: float, limit: int = 0, buffer: int = 20000, tag: str | None = None
    ) -> None:
        """The reporter host, shipping to Redis across link rr; ``tag`` names its records."""
        self.tag = tag or self.tag
        config = write_config(
            self.workdir / "reporter.yaml",
            {
                "redis": {"host": self.rr.a_address, "port": REDIS_PORT, "database": 0},
                "analytics": {"records-buffer-size": buffer, "pool-size": 4},
            },
        )
        out = self._reporter_dir()
        out.mkdir(exist_ok=True)
        args = [sys.executable, "-m", "tests.network.reporter", "--config", str(config)]
        args += ["--rate", str(rate), "--tag", self.tag, "--out", str(out)]
        args += ["--limit", str(limit)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log = self.workdir / f"reporter-{self.tag}.log"
        self.reporter = self.net.run("reporter", args, log=log, env=env)
        self.procs.append(self.reporter)
        self.reporter.wait_for_output("reporter: started", timeout_s=60)

    def stop_reporter(self, timeout_s: float = 200) -> dict[str, Any]:
        """SIGTERM the reporter, wait for its ``stop()``; returns its final counters."""
        assert self.reporter is not None
        self.reporter.send(signal.SIGTERM)
        return self.reporter_final(timeout_s)

    def reporter_final(self, timeout_s: float = 200) -> dict[str, Any]:
        """The reporter's counters once it has stopped."""
        assert self.reporter is not None
        self.reporter.popen.wait(timeout_s)
        final: dict[str, Any] = json.loads((self._reporter_dir() / "final.json").read_text())
        return final

    def _reporter_dir(self) -> Path:
        return self.workdir / f"reporter-{self.tag}"

    # -- observe ------------------------------------------------------------------------------

    def health(self, timeout_s: float = 30) -> Health:
        """Ask the worker host's health endpoint (a 503 is an answer, not an error)."""
        started = time.monotonic()
        try:
            with urllib.request.urlopen(self.health_url, timeout=timeout_s) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except OSError as exc:
            return Health(0, {"error": str(exc)}, time.monotonic() - started)
        return Health(status, json.loads(raw or b"{}"), time.monotonic() - started)

    def redis_rtt_ms(self, pings: int = 20) -> float:
        """The mean round trip of a Redis PING from the worker host, across link wr."""
        script = (
            "import sys, time, redis\n"
            "r = redis.Redis(host=sys.argv[1], port=int(sys.argv[2]), socket_timeout=10)\n"
            "r.ping()\n"
            "t = time.perf_counter()\n"
            "for _ in range(int(sys.argv[3])): r.ping()\n"
            "print((time.perf_counter() - t) / int(sys.argv[3]) * 1000)\n"
        )
        args = [sys.executable, "-c", script, self.wr.a_address, str(REDIS_PORT), str(pings)]
        done = subprocess.run(
            ["ip", "netns", "exec", self.net.ns("worker"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return float(done.stdout.strip())

    def reporter_progress(self) -> dict[str, Any]:
        """The reporter's latest counters (written every 0.5 s)."""
        path = self._reporter_dir() / "progress.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def accepted(self) -> list[str]:
        """The requests of every record the reporters of this deployment accepted."""
        return [
            request
            for path in sorted(self.workdir.glob("reporter-*/accepted"))
            for request in path.read_text().split()
        ]

    def stored(self) -> dict[str, int]:
        """request -> how many documents the sink holds for it."""
        counts: dict[str, int] = {}
        collection = self.mongo[DATABASE][COLLECTION]
        for document in collection.find({}, {"request": 1, "_id": 0}):
            request = document["request"]
            counts[request] = counts.get(request, 0) + 1
        return counts

    def stored_count(self) -> int:
        return int(self.mongo[DATABASE][COLLECTION].estimated_document_count())

    def dead_letters(self) -> int:
        """Dead-letter entries of every group, on the deployment's Redis."""
        groups = self.redis.smembers("iam-pump:dead-letters")
        return sum(int(self.redis.hlen(b"iam-pump:dead-letters:" + group)) for group in groups)

    def stats(self) -> dict[str, int]:
        raw = self.redis.hgetall("iam-pump:stats")
        return {key.decode(): int(value) for key, value in raw.items()}

    def _redis_pings(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def _mongo_pings(self) -> bool:
        try:
            self.mongo.admin.command("ping")
            return True
        except pymongo.errors.PyMongoError:
            return False

    # -- stop ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every program, then remove the hosts and links (also after a failure)."""
        for proc in reversed(self.procs):
            proc.stop(timeout_s=20)
        self.redis.close()
        self.mongo.close()
        self.net.destroy()
