"""Fixtures. A fixture for a server that is absent skips locally and fails when CI is set."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.servers_influx import influx_database, influx_server
from tests.servers_kafka import kafka_server
from tests.servers_prometheus import prometheus_server
from tests.servers_syslog import rsyslog
from tests.stores import es_url, mongo_db, mongo_uri
from tests.support import (
    IN_CI,
    REDIS_HOST,
    REDIS_PORT,
    TEST_REDIS_DB,
    MountRefused,
    Proc,
    admin_redis,
    port_open,
    small_filesystem,
)

# Fixtures for every test module.
__all__ = [
    "es_url",
    "influx_database",
    "influx_server",
    "kafka_server",
    "mongo_db",
    "mongo_uri",
    "prometheus_server",
    "require",
    "rsyslog",
]


def require(available: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) when a server the test needs is not there."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is not available, and CI must run every test")
    pytest.skip(f"{what} is not available")


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    """The integration tests' own Redis database, empty at the start of the test."""
    require(port_open(REDIS_HOST, REDIS_PORT), f"Redis on {REDIS_HOST}:{REDIS_PORT}")
    client = admin_redis(TEST_REDIS_DB)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; all stopped (SIGTERM, then SIGKILL) when it ends."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop(timeout_s=15)


@pytest.fixture(autouse=True)
def _fresh_context(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test reads its own config: no worker context carries over from another test."""
    from app.worker_context import close_context
    from pumps.memory import MemoryPump

    monkeypatch.delenv("IAM_PUMP_CONFIG", raising=False)
    close_context()
    MemoryPump.reset()
    yield
    close_context()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@contextlib.contextmanager
def mounted_small_disk(directory: Path, size_bytes: int) -> Iterator[Path]:
    """A filesystem of ``size_bytes`` mounted at ``directory`` for the test (needs root: skips
    locally, fails in CI, when mounting is refused)."""
    try:
        with small_filesystem(directory, size_bytes) as mounted:
            yield mounted
    except MountRefused as exc:
        require(False, f"a {size_bytes}-byte filesystem of the test's own ({exc})")
