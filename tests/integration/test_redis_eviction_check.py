"""The start-up check of the Redis servers we keep batches on, against redis-servers of the
test's own: ``allkeys-*`` stops a real worker with exit status 2 and a message that names the
server, the policy and the fix (unless ``delivery.allow-evicting-redis``); ``volatile-*`` and a
user without ``CONFIG`` give warnings and the worker starts; ``iam-pump status`` says the same."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.stores.eviction import Verdict, check_server, judge
from tests.conftest import require
from tests.support import (
    REPO,
    Proc,
    RedisServer,
    base_config,
    celery_env,
    run_cli,
    start_worker,
    write_config,
)

pytestmark = [pytest.mark.integration]


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    require(shutil.which("redis-server") is not None, "redis-server")
    policy: str = request.param
    own = RedisServer(tmp_path / "redis", maxmemory="50mb", maxmemory_policy=policy)
    yield own
    own.stop()


def _config(tmp_path: Path, server: RedisServer, **delivery: Any) -> Path:
    config = base_config(tmp_path, redis_port=server.port, db=0)
    config["delivery"].update(delivery)
    return write_config(tmp_path / "c.yaml", config)


def _worker_run(config: Path, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "celery", "-A", "app", "worker", "-c", "1", "-l", "info"]
    return subprocess.run(
        [*command, "--without-gossip", "--without-mingle"],
        env=celery_env(config),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.parametrize("server", ["allkeys-lru"], indirect=True)
def test_a_worker_refuses_an_allkeys_redis_with_exit_status_2(
    tmp_path: Path, server: RedisServer
) -> None:
    config = _config(tmp_path, server)
    worker = _worker_run(config)
    message = worker.stderr.strip().splitlines()[-1]
    print(f"\nexit {worker.returncode}: {message}")
    assert worker.returncode == 2
    assert f"127.0.0.1:{server.port}" in message and "allkeys-lru" in message
    assert "set maxmemory-policy noeviction" in message
    assert "delivery.allow-evicting-redis" in message
    assert "ready." not in worker.stdout + worker.stderr
    status = run_cli("status", "--config", str(config))
    assert status.returncode == 1 and "UNHEALTHY" in status.stdout
    assert "refused   the redis: server" in status.stdout


@pytest.mark.parametrize("server", ["allkeys-lru", "volatile-lru"], indirect=True)
def test_a_worker_starts_with_a_warning_on_volatile_or_when_allowed(
    tmp_path: Path, server: RedisServer, procs: list[Proc]
) -> None:
    allkeys = server.client().config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    config = _config(tmp_path, server, **({"allow-evicting-redis": True} if allkeys else {}))
    worker = start_worker(config, tmp_path / "w.log", concurrency=1)
    procs.append(worker)
    expected = "Starting anyway" if allkeys else "may be delivered twice"
    [warning] = [line for line in worker.output().splitlines() if expected in line]
    print(f"\n{warning}")
    assert f"127.0.0.1:{server.port}" in warning
    status = run_cli("status", "--config", str(config))
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"warning   the redis: server (redis://127.0.0.1:{server.port}/0)" in status.stdout


@pytest.mark.parametrize("server", ["allkeys-lru"], indirect=True)
def test_a_user_without_config_gets_a_warning_not_a_refusal(server: RedisServer) -> None:
    admin = server.client()
    admin.acl_setuser(
        "pump", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-config"]
    )
    user = server.client(username="pump", password="secret")
    finding = check_server("this server", user)
    print(f"\n{finding.message}")
    assert finding.verdict is Verdict.WARN
    assert "could not check its maxmemory-policy" in finding.message
    assert check_server("this server", admin).verdict is Verdict.REFUSE


@pytest.mark.parametrize(
    ("policy", "maxmemory", "allowed", "verdict"),
    [
        ("noeviction", 100, False, Verdict.OK),
        ("allkeys-lfu", 0, False, Verdict.OK),
        ("allkeys-random", 100, False, Verdict.REFUSE),
        ("allkeys-lru", 100, True, Verdict.WARN),
        ("volatile-ttl", 100, False, Verdict.WARN),
    ],
)
def test_verdicts(policy: str, maxmemory: int, allowed: bool, verdict: Verdict) -> None:
    assert judge("s", policy, maxmemory, allow_evicting=allowed).verdict is verdict


def test_the_broker_redis_is_checked_too_when_it_is_another_server() -> None:
    from app.config import parse_settings
    from app.stores.clients import batch_servers

    def names(text: str) -> list[str]:
        servers = batch_servers(parse_settings(text))
        for _name, client in servers:
            client.close()
        return [name for name, _client in servers]

    assert names("redis: {port: 6390}") == ["the redis: server (redis://127.0.0.1:6390/0)"]
    assert names("redis: {port: 6390}\nbroker-url: redis://:pw@10.0.0.7:6379/1") == [
        "the redis: server (redis://127.0.0.1:6390/0)",
        "the broker's Redis (redis://:***@10.0.0.7:6379/1)",
    ]
    assert len(names("broker-url: amqp://guest:guest@127.0.0.1:5672//")) == 1
