"""Least privilege on Redis: the integration suite (workers, beat and its purge, the reporter,
the command line, the health endpoint) runs as a Redis user with only ``iam-pump redis-acl``'s
rules, on a server of the test's own whose default user is off, and what lies outside those
rules is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from app.config import parse_settings
from app.redis_acl import acl_rules
from tests.security.own_redis import OwnRedis
from tests.support import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PUMP_USER = "iam-pump"
PUMP_PASSWORD = "pump-secret"
ADMIN_USER = "test-admin"
ADMIN_PASSWORD = "admin-secret"
#: The integration tests name their own lists ``test-...`` instead of iam's default list.
TEST_LIST_PATTERN = "~test-*"
#: Commands a process may try and do without (a start-up check that only warns when refused).
TOLERATED_DENIALS = {"config|get"}


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A Redis whose default user is off, with the pump's user (default key-prefix, iam's
    default list, database 0) and an administrator for the tests' own flushing."""
    rules = acl_rules(parse_settings("{}"))
    pump = " ".join([rules[0], rules[1], f">{PUMP_PASSWORD}", *rules[2:], TEST_LIST_PATTERN])
    server = OwnRedis(
        tmp_path / "redis",
        [
            "user default off",
            f"user {ADMIN_USER} on >{ADMIN_PASSWORD} ~* &* +@all",
            f"user {PUMP_USER} {pump}",
        ],
    )
    yield server
    server.stop()


def _client(server: OwnRedis, user: str | None, password: str | None) -> redis.Redis:
    return redis.Redis(port=server.port, username=user, password=password)


def test_outside_the_acl_is_refused(acl_redis: OwnRedis) -> None:
    pump = _client(acl_redis, PUMP_USER, PUMP_PASSWORD)
    pump.set("iam-pump:probe", "1")  # inside: allowed
    assert pump.get("iam-pump:probe") == b"1"
    refused: dict[str, Callable[[], object]] = {
        "FLUSHALL": lambda: pump.flushall(),
        "FLUSHDB": lambda: pump.flushdb(),
        "CONFIG SET": lambda: pump.config_set("maxmemory-policy", "allkeys-lru"),
        "KEYS": lambda: pump.keys("*"),
        "ACL SETUSER": lambda: pump.acl_setuser("x"),
        "SET outside the key patterns": lambda: pump.set("other-app:secret", "1"),
        "GET outside the key patterns": lambda: pump.get("session:alice"),
    }
    for what, call in refused.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
        print(f"refused for {PUMP_USER}: {what}")
    with pytest.raises(redis.exceptions.AuthenticationError):
        _client(acl_redis, None, None).ping()
    print("refused: the default user (no password)")
    pump.close()


#: Integration modules that never use the tests' Redis as the pump's user: the sink-only pump
#: tests (Kafka, InfluxDB, syslog) and those that start Redis servers of their own.
OWN_SERVERS = (
    "test_kafka_pump.py",
    "test_influx_pump.py",
    "test_syslog_pump.py",
    "test_redis_cluster_sentinel.py",
    "test_iam_configs.py",
    "test_probes.py",
)


@pytest.mark.timeout(1000)
def test_integration_suite_runs_as_the_least_privilege_user(
    acl_redis: OwnRedis, tmp_path: Path
) -> None:
    env = dict(os.environ)
    env.update(
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(acl_redis.port),
        REDIS_USERNAME=PUMP_USER,
        REDIS_PASSWORD=PUMP_PASSWORD,
        REDIS_ADMIN_USERNAME=ADMIN_USER,
        REDIS_ADMIN_PASSWORD=ADMIN_PASSWORD,
        IAM_PUMP_TEST_REDIS_DB="0",  # the database the README's ACL line is written for
    )
    log = tmp_path / "integration.log"
    started = time.monotonic()
    with log.open("wb") as out:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/integration",
                "-q",
                "-p",
                "no:cacheprovider",
                *(f"--ignore=tests/integration/{name}" for name in OWN_SERVERS),
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    elapsed = time.monotonic() - started
    output = log.read_text(encoding="utf-8", errors="replace")
    print(f"\nintegration suite as {PUMP_USER}: exit {result.returncode} in {elapsed:.0f}s")
    print(output.strip().splitlines()[-1])
    failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert result.returncode == 0, "\n".join([*failed, output[-6000:]])

    admin = _client(acl_redis, ADMIN_USER, ADMIN_PASSWORD)
    denials = admin.acl_log(count=1000)
    admin.close()
    for entry in denials:
        print(f"ACL denial: {entry}")
    unexpected = [
        entry
        for entry in denials
        if not (entry["reason"] == "command" and entry["object"] in TOLERATED_DENIALS)
    ]
    print(f"ACL denials: {len(denials)}, unexpected: {len(unexpected)}")
    assert not unexpected
