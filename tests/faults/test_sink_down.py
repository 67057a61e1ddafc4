"""A sink that goes away: retried with backoff and delivered when it is back; one that stays away
fills its dead letters, which an operator lists, inspects, replays and drops. The other pumps
keep flowing all along."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.faults.conftest import fault_config
from tests.faults.helpers import await_delivery, make_records, report, requests_in
from tests.support import Proc, run_cli, start_worker, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def take_away(directory: Path) -> Path:
    """Make a CSV sink unusable for real: its folder is moved and a file stands in its place."""
    away = directory.with_name(directory.name + ".away")
    directory.mkdir(parents=True, exist_ok=True)
    directory.rename(away)
    directory.write_text("not a folder")
    return away


def bring_back(directory: Path, away: Path) -> None:
    directory.unlink()
    away.rename(directory)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("dead-letters", *args, "--config", str(config))


def test_sink_down_for_a_while_then_back_delivers_everything(
    tmp_path: Path, broker: str, faults_db: redis.Redis, procs: list[Proc]
) -> None:
    flaky_dir, steady_dir = tmp_path / "flaky", tmp_path / "steady"
    config = write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            broker,
            pumps={
                "flaky": {"type": "csv", "max-retries": 20, "meta": {"csv_dir": str(flaky_dir)}},
                "steady": {"type": "csv", "meta": {"csv_dir": str(steady_dir)}},
            },
            delivery={"retry-backoff-base-s": 0.5, "retry-backoff-max-s": 3},
        ),
    )
    away = take_away(flaky_dir)
    procs.append(start_worker(config, tmp_path / "w.log"))
    records = make_records("down", 5000)
    expected = {r.request for r in records}
    report(records, config)
    # The other pump is not held up by the dead one.
    assert wait_until(lambda: set(requests_in(steady_dir)) == expected, 30)
    assert wait_until(lambda: int(faults_db.hget("iam-pump:stats", "retries:flaky") or 0) > 5, 30)
    time.sleep(3)
    bring_back(flaky_dir, away)
    lost, duplicated, _ = await_delivery(
        flaky_dir,
        expected,
        timeout_s=60,
        label=f"sink down then back ({'amqp' if broker else 'redis'})",
    )
    assert lost == 0 and duplicated == 0
    assert faults_db.hlen("iam-pump:dead-letters:flaky") == 0


def test_sink_that_stays_down_fills_dead_letters_which_replay_delivers(
    tmp_path: Path, broker: str, faults_db: redis.Redis, procs: list[Proc]
) -> None:
    dead_dir, steady_dir = tmp_path / "dead", tmp_path / "steady"
    config = write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            broker,
            pumps={
                "dead": {"type": "csv", "max-retries": 2, "meta": {"csv_dir": str(dead_dir)}},
                "steady": {"type": "csv", "meta": {"csv_dir": str(steady_dir)}},
            },
            analytics={"records-buffer-size": 2000, "pool-size": 4},
            delivery={"retry-backoff-base-s": 0.2, "retry-backoff-max-s": 1},
        ),
    )
    away = take_away(dead_dir)
    procs.append(start_worker(config, tmp_path / "w.log"))
    records = make_records("dlq", 3000)
    expected = {r.request for r in records}
    report(records, config)
    assert wait_until(lambda: set(requests_in(steady_dir)) == expected, 30)
    assert wait_until(lambda: faults_db.hlen("iam-pump:dead-letters:dead") == 6, 60)

    listing = cli(config, "list")
    assert listing.returncode == 0
    line = next(line for line in listing.stdout.splitlines() if line.startswith("dead "))
    assert line.split()[1:3] == ["6", "3000"]
    assert "cannot create" in line or "cannot write" in line

    entries = cli(config, "list", "dead").stdout.splitlines()[1:]
    first_id = entries[0].split()[0]
    shown = cli(config, "show", "dead", first_id)
    assert shown.returncode == 0 and "replayable: yes" in shown.stdout
    assert "dlq-" in shown.stdout

    refused = cli(config, "drop", "dead", first_id)
    assert refused.returncode == 2 and "--yes" in refused.stdout
    assert faults_db.hlen("iam-pump:dead-letters:dead") == 6

    bring_back(dead_dir, away)
    replayed = cli(config, "replay", "dead", "--all")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    lost, duplicated, _ = await_delivery(
        dead_dir,
        expected,
        timeout_s=60,
        label=f"dead letters replayed ({'amqp' if broker else 'redis'})",
    )
    assert lost == 0 and duplicated == 0
    assert faults_db.hlen("iam-pump:dead-letters:dead") == 0


def test_dropping_dead_letters_needs_confirmation(
    tmp_path: Path, faults_db: redis.Redis, procs: list[Proc]
) -> None:
    dead_dir = tmp_path / "dead"
    config = write_config(
        tmp_path / "c.yaml",
        fault_config(
            tmp_path,
            "",
            pumps={"dead": {"type": "csv", "max-retries": 0, "meta": {"csv_dir": str(dead_dir)}}},
        ),
    )
    take_away(dead_dir)
    procs.append(start_worker(config, tmp_path / "w.log"))
    report(make_records("drop", 10), config)
    assert wait_until(lambda: faults_db.hlen("iam-pump:dead-letters:dead") == 1, 30)
    entry_id = cli(config, "list", "dead").stdout.splitlines()[1].split()[0]
    assert cli(config, "drop", "dead", "--all").returncode == 2
    dropped = cli(config, "drop", "dead", entry_id, "--yes")
    assert dropped.returncode == 0 and "dropped 1 entry" in dropped.stdout
    assert faults_db.hlen("iam-pump:dead-letters:dead") == 0
    shutil.rmtree(tmp_path / "csv", ignore_errors=True)
