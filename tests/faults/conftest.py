"""Fault-injection fixtures: brokers, the slow test pump, counting records by id."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import require
from tests.support import REDIS_HOST, REDIS_PORT, base_config, free_port, port_open, wait_until

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: The fault tests own this Redis database (flushed at the start of each test).
FAULTS_REDIS_DB = int(os.environ.get("IAM_PUMP_FAULTS_REDIS_DB", "13"))


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> str:
    """Each fault test runs against both brokers; returns the broker-url (None: Redis)."""
    if request.param == "amqp":
        require(port_open("127.0.0.1", 5672), "RabbitMQ on 127.0.0.1:5672")
        return AMQP_URL
    return ""


@pytest.fixture
def faults_db() -> Iterator[redis.Redis]:
    require(port_open(REDIS_HOST, REDIS_PORT), f"Redis on {REDIS_HOST}:{REDIS_PORT}")
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=FAULTS_REDIS_DB)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def plugin_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Environment for worker subprocesses that can load the test pumps (this process too)."""
    from pumps.registry import available_pumps

    site = tmp_path / "plugins"
    info = site / "iam_pump_test_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: iam-pump-test-plugins\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[iam_pump.pumps]\nslowcsv = tests.plugins.slow_csv:SlowCSVPump\n"
    )
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(site))
    available_pumps.cache_clear()
    yield {"PYTHONPATH": path}
    available_pumps.cache_clear()


def purge_amqp_queues(url: str, names: list[str]) -> None:
    """Empty leftover queues of an earlier run on the shared RabbitMQ."""
    from kombu import Connection

    with Connection(url, connect_timeout=5) as connection:
        channel = connection.channel()
        for name in names:
            try:
                channel.queue_purge(name)
            except Exception:
                channel = connection.channel()  # the queue did not exist; channel was closed


def fault_config(tmp_path: Path, broker_url: str, **overrides: Any) -> dict[str, Any]:
    overrides.setdefault("db", FAULTS_REDIS_DB)
    config = base_config(tmp_path, **overrides)
    if broker_url:
        config["broker-url"] = broker_url
        purge_amqp_queues(broker_url, ["ingest", "purge", *(f"pump.{n}" for n in config["pumps"])])
    return config


def slow_csv_config(
    tmp_path: Path, broker_url: str, *, delay_s: float, **overrides: Any
) -> tuple[Path, Path]:
    """A config file with one ``slowcsv`` pump named csv; returns (config path, csv folder)."""
    from tests.support import write_config

    csv_dir = tmp_path / "csv"
    overrides.setdefault("analytics", {"records-buffer-size": 2000, "pool-size": 4})
    pump = {"type": "slowcsv", "meta": {"csv_dir": str(csv_dir), "delay_s": delay_s}}
    config = fault_config(tmp_path, broker_url, pumps={"csv": pump}, **overrides)
    return write_config(tmp_path / "c.yaml", config), csv_dir


class OwnRedis:
    """A redis-server on a free port, persisting every write (AOF, fsync always)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        assert wait_until(lambda: _pings(client), 10)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    require(shutil.which("redis-server") is not None, "redis-server")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = OwnRedis(directory)
    server.start()
    yield server
    server.stop()
