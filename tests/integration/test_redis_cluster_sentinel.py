"""iam's ``redis:`` block on a Redis Cluster and on a master watched by Sentinel, for real.

The cluster is three masters made with ``redis-cli --cluster create``; the Sentinel setup is a
master, a replica and three sentinels (``redis-server --sentinel``). Either holds iam's list and
our state; the Celery broker is the ordinary test Redis (kombu cannot use a cluster). Records go
from the reporter / iam's list through a real worker and beat to CSV files, every one once; the
Sentinel test fails the master over in the middle of the run and loses nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from app.codec import encode_go_record
from app.config import Settings, load_settings
from app.stores.clients import redis_client
from app.stores.stats import Counter, Stats
from tests.conftest import require
from tests.faults.helpers import await_delivery, make_records, report, requests_in
from tests.redis_topologies import OwnCluster, OwnSentinels, binaries_present
from tests.support import (
    REDIS_HOST,
    REDIS_PASSWORD,
    REDIS_PORT,
    REDIS_USERNAME,
    TEST_REDIS_DB,
    Proc,
    base_config,
    run_cli,
    start_beat,
    start_worker,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[OwnCluster]:
    require(binaries_present(), "redis-server and redis-cli")
    own = OwnCluster(tmp_path / "cluster")
    yield own
    own.stop()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[OwnSentinels]:
    require(binaries_present(), "redis-server and redis-cli")
    own = OwnSentinels(tmp_path / "sentinel")
    yield own
    own.stop()


def _config(tmp_path: Path, redis_block: dict[str, Any], **extra: Any) -> Path:
    config = base_config(tmp_path)
    # The tests' own Redis is the broker, with its login (the least-privilege suite sets one).
    login = f"{quote(REDIS_USERNAME)}:{quote(REDIS_PASSWORD)}@" if REDIS_PASSWORD else ""
    config["broker-url"] = f"redis://{login}{REDIS_HOST}:{REDIS_PORT}/{TEST_REDIS_DB}"
    config["redis"] = redis_block
    config.update(extra)
    return write_config(tmp_path / "iam-pump.yaml", config)


def test_reporter_list_on_a_cluster_worker_and_beat_deliver_every_record_once(
    tmp_path: Path, cluster: OwnCluster, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    config = _config(
        tmp_path,
        {"enable-cluster": True, "addrs": cluster.addrs},
        analytics={"transport": "redis-list", "records-buffer-size": 2000, "pool-size": 2},
    )
    settings = load_settings(config)
    procs.append(start_worker(config, tmp_path / "worker.log"))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))

    client = redis_client(settings)
    go_records = make_records("go", 2000)
    client.rpush(settings.analytics_key, *(encode_go_record(r) for r in go_records))
    reported = make_records("py", 3000)
    report(reported, config)  # the reporter's redis-list transport, pushing to the cluster
    expected = {r.request for r in go_records + reported}
    lost, duplicated, _ = await_delivery(
        tmp_path / "csv", expected, timeout_s=90, label="Redis Cluster, 3 masters"
    )
    assert lost == 0
    assert duplicated == 0
    assert wait_for_purged(client, settings, len(expected))

    # Our keys share the slot of iam's list: one master holds all of them.
    list_node = cluster.node_of(settings.analytics_key)
    for key in (settings.key("purge", "offset"), settings.key("stats")):
        assert cluster.node_of(key) == list_node, key
    assert int(client.get(settings.key("purge", "offset")) or 0) == len(expected)
    assert client.llen(settings.analytics_key) == 0

    status = run_cli("status", "--config", str(config))
    print(status.stdout[-1500:])
    assert status.returncode == 0, status.stdout + status.stderr
    assert "Redis Cluster via" in status.stdout
    client.close()


def wait_for_purged(client: redis.Redis, settings: Settings, count: int) -> bool:
    def purged() -> bool:
        return Stats(client, settings).read().total(Counter.PURGED_RECORDS) >= count

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not purged():
        time.sleep(0.25)
    return purged()


class ConfirmedWriter:
    """iam-authz-server's part, written carefully: RPUSH a batch to iam's list through the
    sentinels, then ``WAIT`` for the replica; a batch counts as handed over only once the replica
    has it, and is pushed again otherwise (a Redis error, or a failover under way)."""

    def __init__(self, settings: Settings, batches: list[list[bytes]]) -> None:
        self._client = redis_client(settings)
        self._key = settings.analytics_key
        self._batches = batches
        self.pushed_again = 0
        self.errors: list[str] = []
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self._batches:
                while not self._hand_over(batch):
                    self.pushed_again += 1
                    time.sleep(0.1)
                time.sleep(0.02)
        finally:
            self._client.close()
            self.done.set()

    def _hand_over(self, batch: list[bytes]) -> bool:
        try:
            self._client.rpush(self._key, *batch)
            return bool(self._client.wait(1, 2000) >= 1)
        except redis.RedisError as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return False

    def join(self, timeout_s: float) -> bool:
        return self.done.wait(timeout_s)


@pytest.mark.parametrize("failover", ["planned", "master-killed"])
def test_a_sentinel_failover_mid_run_loses_nothing(
    tmp_path: Path,
    sentinels: OwnSentinels,
    redis_db: redis.Redis,
    procs: list[Proc],
    failover: str,
) -> None:
    config = _config(
        tmp_path,
        {"master-name": OwnSentinels.MASTER_NAME, "addrs": sentinels.addrs},
        delivery={
            "retry-backoff-base-s": 0.2,
            "retry-backoff-max-s": 2,
            "purge-chunk-size": 200,
            # A purge killed with the master holds iam's lock no longer than this.
            "iam-lock-ttl-s": 5,
        },
    )
    settings = load_settings(config)
    procs.append(start_worker(config, tmp_path / "worker.log"))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))

    records = make_records("sentinel", 6000)
    batches = [
        [encode_go_record(r) for r in records[start : start + 50]]
        for start in range(0, len(records), 50)
    ]
    writer = ConfirmedWriter(settings, batches)
    first_master = sentinels.master()
    # Fail over once records are flowing: some delivered, more in the list and on the way.
    assert wait_until_rows(tmp_path / "csv", 500, timeout_s=60)
    if failover == "planned":
        with sentinels.sentinel() as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", OwnSentinels.MASTER_NAME)
    else:
        sentinels.kill(first_master)
    moved = wait_until_true(lambda: sentinels.master() != first_master, timeout_s=60)
    print(f"\n[{failover}] master {first_master} -> {sentinels.master()}")
    assert moved, "the sentinels did not fail over"
    if failover == "master-killed":
        # Its supervisor starts it again, empty; the sentinels make it the new master's
        # replica, and the writer's WAIT has a replica to count again.
        sentinels.restart(first_master)
    assert writer.join(120), "the writer did not hand every batch over"
    print(f"writer: {writer.pushed_again} batches pushed again, errors: {writer.errors[:3]}")

    lost, duplicated, _ = await_delivery(
        tmp_path / "csv",
        {r.request for r in records},
        timeout_s=120,
        label=f"Sentinel failover ({failover})",
    )
    # A batch the writer pushed again, or a chunk whose trim the old master took but did not
    # pass on, is delivered twice: at-least-once, never less.
    print(f"duplicated: {duplicated}")
    assert lost == 0

    status = run_cli("status", "--config", str(config))
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"master {OwnSentinels.MASTER_NAME!r} of the sentinels" in status.stdout


def wait_until_rows(directory: Path, count: int, *, timeout_s: float) -> bool:
    return wait_until_true(lambda: len(requests_in(directory)) >= count, timeout_s=timeout_s)


def wait_until_true(predicate: Any, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except redis.RedisError:
            pass
        time.sleep(0.2)
    return bool(predicate())


def test_copies_of_a_client_reach_the_same_cluster_or_master(
    tmp_path: Path, cluster: OwnCluster, sentinels: OwnSentinels
) -> None:
    # The health checks' bounded client and the purge's database-0 client for iam's lock.
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from app.stores.clients import context_database, same_server

    on_cluster = load_settings(_config(tmp_path, {"enable-cluster": True, "addrs": cluster.addrs}))
    client = redis_client(on_cluster)
    copy = same_server(client, socket_timeout=1, retry=Retry(NoBackoff(), 0), db=0)
    for index in range(20):  # keys all over the slots: the copy knows the whole cluster
        copy.set(f"probe:{index}", index)
        assert client.get(f"probe:{index}") == str(index).encode()
    assert context_database(client) == 0
    copy.close()
    client.close()

    block = {"master-name": OwnSentinels.MASTER_NAME, "addrs": sentinels.addrs, "database": 3}
    behind = load_settings(_config(tmp_path, block))
    client = redis_client(behind)
    assert context_database(client) == 3
    zero = same_server(client, db=0)
    zero.set("iam-pump", "token")
    with redis.Redis(port=sentinels.master()) as master:
        assert master.get("iam-pump") == b"token"
        assert master.execute_command("SELECT", 3) and master.get("iam-pump") is None
    client.set("in-three", 1)
    with redis.Redis(port=sentinels.master(), db=3) as master:
        assert master.get("in-three") == b"1"
    zero.close()
    client.close()
