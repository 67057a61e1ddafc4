"""Exactly once where the sink can upsert: MongoDB stores each record id once through a killed
worker's redelivery and through dead letters replayed twice."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from pymongo.database import Database

from app.config import parse_settings
from app.stores.dead_letters import DeadLetterStore
from tests.faults.conftest import fault_config
from tests.faults.helpers import make_records, report
from tests.stores import mongo_url_for
from tests.support import Proc, free_port, run_cli, start_worker, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def mongo_pump(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "mongo",
        "timeout": 5,
        "meta": {"mongo_url": url, "collection_name": "analytics"},
        **extra,
    }


def tally_mongo(database: Database[dict[str, Any]], expected: set[str]) -> tuple[int, int]:
    requests = [doc["request"] for doc in database["analytics"].find({}, {"request": 1})]
    return len(expected - set(requests)), len(requests) - len(set(requests))


def test_killed_worker_redelivery_stores_each_record_once(
    tmp_path: Path,
    broker: str,
    faults_db: redis.Redis,
    procs: list[Proc],
    mongo_db: Database[dict[str, Any]],
) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            broker,
            pumps={"mongo": mongo_pump(mongo_url_for(mongo_db.name))},
            analytics={"records-buffer-size": 200, "pool-size": 4},
        ),
    )
    records = make_records("once", 10_000)
    expected = {r.request for r in records}
    report(records, config)
    ingest = start_worker(config, tmp_path / "i.log", queues="ingest", name="ingest")
    pump = start_worker(config, tmp_path / "p1.log", queues="pump.mongo", name="p1")
    procs += [ingest, pump]
    assert wait_until(lambda: mongo_db["analytics"].estimated_document_count() > 500, 60)
    pump.kill_group(signal.SIGKILL)
    pump.popen.wait(10)
    held = faults_db.hlen("unacked") if not broker else -1
    procs.append(start_worker(config, tmp_path / "p2.log", queues="pump.mongo", name="p2"))
    started = time.monotonic()
    assert wait_until(lambda: tally_mongo(mongo_db, expected)[0] == 0, 150, interval_s=1), (
        f"store: {mongo_db['analytics'].count_documents({})} documents, "
        f"missing {tally_mongo(mongo_db, expected)[0]}; dead letters: "
        f"{faults_db.hlen('iam-pump:dead-letters:mongo')}; stats: "
        f"{faults_db.hgetall('iam-pump:stats')}"
    )

    def written() -> int:
        return int(faults_db.hget("iam-pump:stats", "written_records:mongo") or 0)

    # Tasks the killed worker held come back (after the visibility timeout on Redis) even when
    # their write had landed before the kill: wait for them, then count.
    assert wait_until(lambda: written() >= len(expected), 150, interval_s=1)
    lost, duplicated = tally_mongo(mongo_db, expected)
    print(
        f"\n[mongo, pump worker SIGKILL ({'amqp' if broker else 'redis'})] records: "
        f"{len(expected)}, lost: {lost}, duplicated in the store: {duplicated}, records "
        f"written (incl. redelivered): {written()}, tasks held at the kill: {held}, "
        f"{time.monotonic() - started:.1f}s"
    )
    assert lost == 0 and duplicated == 0


def test_dead_letters_replayed_twice_are_stored_once(
    tmp_path: Path,
    faults_db: redis.Redis,
    procs: list[Proc],
    mongo_db: Database[dict[str, Any]],
) -> None:
    down_url = f"mongodb://127.0.0.1:{free_port()}/{mongo_db.name}"
    config_path = tmp_path / "c.yaml"
    write_config(
        config_path,
        fault_config(
            tmp_path,
            "",
            pumps={"mongo": mongo_pump(down_url, **{"max-retries": 0, "timeout": 1})},
            analytics={"records-buffer-size": 1000, "pool-size": 4},
        ),
    )
    worker = start_worker(config_path, tmp_path / "w1.log")
    procs.append(worker)
    records = make_records("replay", 2000)
    report(records, config_path)
    settings = parse_settings(config_path.read_text())
    store = DeadLetterStore(faults_db, settings)
    assert wait_until(lambda: store.count("mongo") == 8, 60), worker.output()[-2000:]
    kept = store.entries("mongo")
    worker.stop()

    # The server is back (the config now points at it): replay, put the same entries back as if
    # the first replay had not been recorded, and replay again.
    write_config(
        config_path,
        fault_config(
            tmp_path,
            "",
            pumps={"mongo": mongo_pump(mongo_url_for(mongo_db.name))},
        ),
    )
    procs.append(start_worker(config_path, tmp_path / "w2.log", name="w2"))
    expected = {r.request for r in records}
    for round_ in (1, 2):
        result = run_cli("dead-letters", "replay", "mongo", "--all", "--config", str(config_path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "replayed 8 entries" in result.stdout
        assert wait_until(lambda: tally_mongo(mongo_db, expected)[0] == 0, 60)
        if round_ == 1:
            for entry in kept:
                store.put(entry)
    time.sleep(3)
    lost, duplicated = tally_mongo(mongo_db, expected)
    print(
        f"\n[mongo, dead letters replayed twice] records: {len(expected)}, lost: {lost}, "
        f"duplicated in the store: {duplicated}"
    )
    assert lost == 0 and duplicated == 0
    assert store.count("mongo") == 0
