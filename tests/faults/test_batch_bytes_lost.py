"""Batch bytes removed from the broker's Redis behind our back (a flush, or eviction under a
``maxmemory-policy`` other than ``noeviction``): the tasks that name them say so loudly (a
dead-letter entry, a counter, an error in the log) instead of taking the batch for done, and
every other batch is delivered."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from app.stores.batches import BatchStore, EnvelopeStore
from app.stores.dead_letters import DeadLetterStore
from pumps.settings import load_pump_settings
from tests.faults.conftest import fault_config
from tests.faults.helpers import make_records, report, requests_in
from tests.support import Proc, run_cli, start_worker, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_evicted_batch_bytes_are_reported_and_the_rest_delivered(
    tmp_path: Path, faults_db: redis.Redis, procs: list[Proc]
) -> None:
    csv_dir = tmp_path / "csv"
    config = write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            "",
            analytics={"records-buffer-size": 400, "pool-size": 4},  # batches of 100
            pumps={"csv": {"type": "csv", "meta": {"csv_dir": str(csv_dir)}}},
        ),
    )
    settings = load_pump_settings(config)
    envelopes = EnvelopeStore(faults_db, settings.key_prefix)
    batches = BatchStore(faults_db, settings.key_prefix)
    records = make_records("evict", 1000)
    report(records, config)
    assert envelopes.waiting() == 10

    # One envelope vanishes before ingest runs.
    [first_envelope, *_] = sorted(faults_db.scan_iter(match=envelopes.key("*")))
    faults_db.delete(first_envelope)
    procs.append(start_worker(config, tmp_path / "ingest.log", queues="ingest", name="in"))
    assert wait_until(lambda: batches.held() == 9, 60), procs[-1].output()[-3000:]

    # One clean batch vanishes before its write task runs.
    [first_batch, *_] = sorted(faults_db.scan_iter(match=batches.key("*")))
    faults_db.delete(first_batch)
    procs.append(start_worker(config, tmp_path / "pumps.log", queues="pump.csv", name="out"))
    assert wait_until(lambda: batches.held() == 0, 60), procs[-1].output()[-3000:]
    assert wait_until(lambda: sum(requests_in(csv_dir).values()) == 800, 30)
    assert max(requests_in(csv_dir).values()) == 1

    dead = DeadLetterStore(faults_db, settings)
    lost = [e for g in ("ingest", "csv") for e in dead.entries(g) if e.stage == "lost"]
    assert sorted(e.group for e in lost) == ["csv", "ingest"]
    assert all("not in Redis" in e.error and not e.replayable for e in lost)
    assert int(faults_db.hget(settings.key("stats"), "lost_batches") or 0) == 2
    assert "not in Redis" in procs[0].output() and "not in Redis" in procs[1].output()
    status = run_cli("status", "--config", str(config))
    assert "lost_batches" in status.stdout, status.stdout
    assert "batches kept on the broker: 0 waiting for ingest, 0 for pumps" in status.stdout
