"""The whole path with real processes: Redis, ``celery worker`` and ``celery beat``."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from app.codec import encode_go_record
from app.config import load_settings, parse_settings
from app.stores.batches import BatchStore, EnvelopeStore
from pumps.csv import go_time_string
from tests.support import (
    REPO,
    Proc,
    base_config,
    celery_env,
    read_csv_rows,
    run_cli,
    start_beat,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

EXPIRE_AT = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)


def make_record(tag: str, index: int) -> AnalyticsRecord:
    return AnalyticsRecord(
        timestamp=1_700_000_000 + index,
        username=f"user-{index % 7}",
        effect="allow" if index % 3 else "deny",
        conclusion=f'conclusion {index}, with "quotes"',
        request=f"{tag}-{index}",
        policies=f'[{{"id": "p{index}"}}]',
        deciders="ü-deciders",
        expire_at=EXPIRE_AT,
    )


def expected_row(record: AnalyticsRecord) -> dict[str, str]:
    return {
        "TimeStamp": str(record.timestamp),
        "Username": record.username,
        "Effect": record.effect,
        "Conclusion": record.conclusion,
        "Request": record.request,
        "Policies": record.policies,
        "Deciders": record.deciders,
        "ExpireAt": go_time_string(record.expire_at),
    }


def count_by_request(rows: list[dict[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["Request"]] = counts.get(row["Request"], 0) + 1
    return counts


def kept_bytes(client: redis.Redis) -> int:
    """Envelopes and clean batches still kept on the broker (0 once everything is delivered)."""
    settings = parse_settings("pumps: {out: {type: stdout}}")  # the default key prefix
    envelopes = EnvelopeStore(client, settings.key_prefix)
    return envelopes.waiting() + BatchStore(client, settings.key_prefix).held()


def report(records: list[AnalyticsRecord], config_path: Path) -> None:
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config_path)))
    analytics.start()
    for record in records:
        # A full buffer refuses the record (counted); this producer waits and offers it again.
        while not analytics.record_hit(record):
            time.sleep(0.001)
    stats = analytics.stop()
    assert stats.shipped_records == len(records), stats


def test_reporter_and_go_records_reach_csv_exactly_once_with_every_field(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    list_key = f"test-list-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "c.yaml", base_config(tmp_path, **{"analytics-key": list_key}))
    procs.append(start_worker(config, tmp_path / "worker.log"))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))

    python_records = [make_record("py", i) for i in range(10_000)]
    go_records = [make_record("go", i) for i in range(10_000)]
    for start in range(0, len(go_records), 1000):
        redis_db.rpush(list_key, *(encode_go_record(r) for r in go_records[start : start + 1000]))
    report(python_records, config)

    csv_dir = tmp_path / "csv"
    assert wait_until(lambda: len(read_csv_rows(csv_dir)) >= 20_000, 120), (
        f"{len(read_csv_rows(csv_dir))} rows; worker log:\n{procs[0].output()[-3000:]}"
    )
    time.sleep(1)
    rows = read_csv_rows(csv_dir)
    by_request = {row["Request"]: row for row in rows}
    expected = {r.request: expected_row(r) for r in python_records + go_records}
    lost = set(expected) - set(by_request)
    duplicated = {k: n for k, n in count_by_request(rows).items() if n > 1}
    print(f"\nrecords: {len(expected)}, lost: {len(lost)}, duplicated: {len(duplicated)}")
    assert not lost and not duplicated
    assert by_request == expected
    assert redis_db.llen(list_key) == 0
    assert kept_bytes(redis_db) == 0


def test_sigterm_under_load_loses_nothing(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        base_config(tmp_path, analytics={"records-buffer-size": 2000, "pool-size": 4}),
    )
    worker = start_worker(config, tmp_path / "worker1.log")
    procs.append(worker)
    records = [make_record("load", i) for i in range(60_000)]
    report(records, config)
    csv_dir = tmp_path / "csv"
    assert wait_until(lambda: len(read_csv_rows(csv_dir)) > 0, 30)
    queued = redis_db.llen("ingest") + redis_db.llen("pump.csv")
    worker.send(signal.SIGTERM)
    assert worker.popen.wait(60) == 0
    written_before_restart = len(read_csv_rows(csv_dir))
    procs.append(start_worker(config, tmp_path / "worker2.log", name="w2"))
    assert wait_until(lambda: len(count_by_request(read_csv_rows(csv_dir))) >= len(records), 120)
    counts = count_by_request(read_csv_rows(csv_dir))
    lost = {r.request for r in records} - set(counts)
    duplicated = sum(n - 1 for n in counts.values())
    print(
        f"\nrecords: {len(records)}, written before restart: {written_before_restart}, "
        f"lost: {len(lost)}, duplicated: {duplicated}"
    )
    assert queued > 0, "the worker had finished before SIGTERM: nothing was under load"
    assert not lost


def test_malformed_records_on_the_list_are_set_aside_and_the_rest_delivered(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    list_key = f"test-list-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "c.yaml", base_config(tmp_path, **{"analytics-key": list_key}))
    good = [make_record("good", i) for i in range(100)]
    items = [encode_go_record(r) for r in good]
    items[10:10] = [b"\xc1 not msgpack", b"\x88\xa9TimeSt", encode_go_record(good[0])[:-3]]
    redis_db.rpush(list_key, *items)
    procs.append(start_worker(config, tmp_path / "worker.log"))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))
    csv_dir = tmp_path / "csv"
    assert wait_until(lambda: len(read_csv_rows(csv_dir)) >= 100, 60)
    assert sorted(row["Request"] for row in read_csv_rows(csv_dir)) == sorted(
        r.request for r in good
    )
    result = run_cli("dead-letters", "list", "ingest", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "not msgpack" in result.stdout
    assert redis_db.hlen("iam-pump:dead-letters:ingest") == 1


def test_redis_list_transport_feeds_the_same_pipeline(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    list_key = f"test-list-{uuid.uuid4().hex[:8]}"
    config = write_config(
        tmp_path / "c.yaml",
        base_config(tmp_path, **{"analytics-key": list_key}, analytics={"transport": "redis-list"}),
    )
    records = [make_record("list", i) for i in range(2000)]
    report(records, config)
    assert redis_db.llen(list_key) == 2000
    procs.append(start_worker(config, tmp_path / "worker.log"))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))
    csv_dir = tmp_path / "csv"
    assert wait_until(lambda: len(read_csv_rows(csv_dir)) >= 2000, 60)
    assert {row["Request"]: row for row in read_csv_rows(csv_dir)} == {
        r.request: expected_row(r) for r in records
    }


def test_retries_then_dead_letters_and_other_pumps_flow(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        base_config(
            tmp_path,
            pumps={
                "csv": {"type": "csv", "meta": {"csv_dir": str(tmp_path / "csv")}},
                "flaky": {"type": "memory", "meta": {"fail_times": 2}},
                "broken": {
                    "type": "memory",
                    "max-retries": 2,
                    "meta": {"fail_times": 1000, "fail_kind": "temporary"},
                },
                "refused": {
                    "type": "memory",
                    "meta": {"fail_times": 1000, "fail_kind": "permanent"},
                },
            },
        ),
    )
    procs.append(start_worker(config, tmp_path / "worker.log", concurrency=1))
    records = [make_record("r", i) for i in range(500)]
    report(records, config)

    def stat(name: str) -> int:
        return int(redis_db.hget("iam-pump:stats", name) or 0)

    assert wait_until(lambda: stat("written_records:flaky") == 500, 60)
    assert wait_until(lambda: redis_db.hlen("iam-pump:dead-letters:broken") >= 1, 60)
    assert wait_until(lambda: redis_db.hlen("iam-pump:dead-letters:refused") >= 1, 60)
    assert stat("retries:flaky") == 2
    assert stat("retries:broken") == 2
    assert len(read_csv_rows(tmp_path / "csv")) == 500
    result = run_cli("dead-letters", "list", "--config", str(config))
    assert "broken" in result.stdout and "injected failure" in result.stdout
    # Written or dead-lettered, no batch is left behind in Redis.
    assert wait_until(lambda: kept_bytes(redis_db) == 0, 30)


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_iam_pump_run_serves_health_and_metrics_and_runs_the_pipeline(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    settings = base_config(tmp_path)
    config = write_config(tmp_path / "c.yaml", settings)
    run = Proc(
        [
            sys.executable,
            "-m",
            "app.cli",
            "run",
            "--config",
            str(config),
            "--demo",
            "--demo-rate",
            "100",
            "--concurrency",
            "1",
        ],
        env=celery_env(config),
        log=tmp_path / "run.log",
        cwd=REPO,
    )
    procs.append(run)
    run.wait_for_output("ready.", 60)
    base = f"http://{settings['health-check-address']}"
    status, body = get_json(f"{base}/healthz")
    assert status == 200 and body["status"] == "ok", body
    assert set(body["checks"]) == {"redis", "broker", "pump:csv", "queues"}
    assert body["consumers"] == {"ingest": 1, "purge": 1, "pump.csv": 1}
    assert get_json(f"{base}/livez") == (200, {"status": "ok"})
    assert wait_until(lambda: len(read_csv_rows(tmp_path / "csv")) > 0, 30)
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert "iam_pump_redis_up 1.0" in metrics
    assert "iam_pump_lost_batches_total 0.0" in metrics
    assert 'iam_pump_written_records_total{pump="csv"}' in metrics
    assert "iam_pump_resent_tasks_total 0.0" in metrics
    assert re.search(r"^iam_pump_ledger_claims \d+\.0$", metrics, re.MULTILINE), metrics
    assert "iam_pump_ledger_oldest_progress_age_seconds" in metrics
    status_out = run_cli("status", "--config", str(config)).stdout
    assert re.search(r"^ledger: \d+ claims owed", status_out, re.MULTILINE), status_out
    # Ctrl+C in a terminal signals the whole foreground group: the worker must still see a
    # single request to stop (one soft shutdown), not the terminal's SIGINT and then ours.
    os.killpg(run.popen.pid, signal.SIGINT)
    assert run.popen.wait(60) == 0
    assert "Warm shutdown" not in run.output(), run.output()[-2000:]


def test_health_names_what_is_broken(tmp_path: Path, redis_db: redis.Redis) -> None:
    from app.config import parse_settings
    from app.health import HealthChecker
    from app.stores.clients import redis_client

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    settings = parse_settings(
        json.dumps(
            base_config(
                tmp_path, pumps={"csv": {"type": "csv", "meta": {"csv_dir": str(blocker / "csv")}}}
            )
        )
    )
    checker = HealthChecker(settings, redis_client(settings))
    report_ = checker.check()
    assert not report_.healthy
    assert report_.as_dict()["failing"] == ["pump:csv"]
    checker.close()

    from tests.support import free_port

    down = parse_settings(json.dumps(base_config(tmp_path, redis_port=free_port())))
    checker = HealthChecker(down, redis_client(down))
    body = checker.check().as_dict()
    assert body["status"] == "unhealthy" and {"redis", "broker"} <= set(body["failing"])
    checker.close()


def test_healthz_finds_mongodb_and_elasticsearch_pumps_usable_when_their_servers_are_up(
    tmp_path: Path, redis_db: redis.Redis, mongo_uri: str, es_url: str
) -> None:
    """The health server opens its pumps before it checks them (it used to answer "not open")."""
    from app.health import HealthServer
    from app.stores.clients import redis_client
    from pumps.settings import parse_pump_settings
    from tests.stores import mongo_url_for

    database = f"health_{uuid.uuid4().hex[:8]}"
    config = base_config(
        tmp_path,
        pumps={
            "mongo": {"type": "mongo", "meta": {"mongo_url": mongo_url_for(database)}},
            "es": {
                "type": "elasticsearch",
                "meta": {"elasticsearch_url": es_url, "index_name": database},
            },
        },
    )
    settings = parse_pump_settings(json.dumps(config))
    server = HealthServer(settings, redis_client(settings))
    server.start()
    try:
        status, body = get_json("http://{}:{}/healthz".format(*server.address))
    finally:
        server.stop()
    # No worker runs here, so only the queues check fails (a worker's own endpoint is ready:
    # tests/integration/test_probes.py).
    assert status == 503, body
    assert body["checks"] == {
        "redis": "ok",
        "broker": "ok",
        "pump:mongo": "ok",
        "pump:es": "ok",
        "queues": "no live consumer on ingest, pump.mongo, pump.es",
    }


def test_iam_pump_run_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pumps: {x: {type: nope}}\n")
    result = run_cli("run", "--config", str(bad))
    assert result.returncode == 2
    assert "pumps.x.type" in result.stderr


def test_expiry_is_100_years_ahead_unless_record_expiration_time_is_set(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    """iam's default (no expiry: 100 years ahead), then the opt-in, through the CSV pump."""
    default = write_config(tmp_path / "d.yaml", base_config(tmp_path))
    opt_in = write_config(
        tmp_path / "c.yaml",
        base_config(
            tmp_path,
            analytics={"storage-expiration-time": "24h0m0s", "record-expiration-time": "2h"},
        ),
    )
    procs.append(start_worker(default, tmp_path / "worker.log"))
    report([AnalyticsRecord(username="x", request="never")], default)
    report([AnalyticsRecord(username="x", request="exp")], opt_in)
    assert wait_until(lambda: len(read_csv_rows(tmp_path / "csv")) == 2, 30)
    expiry_of = {
        row["Request"]: datetime.strptime(
            row["ExpireAt"].split(".")[0].replace(" +0000 UTC", ""), "%Y-%m-%d %H:%M:%S"
        ).replace(tzinfo=UTC)
        for row in read_csv_rows(tmp_path / "csv")
    }
    now = datetime.now(UTC)
    assert abs((expiry_of["never"] - (now + timedelta(days=36500))).total_seconds()) < 60
    assert abs((expiry_of["exp"] - (now + timedelta(hours=2))).total_seconds()) < 60


def task_arguments(raw: bytes) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments of a Celery message as kombu's Redis list holds it."""
    message = json.loads(raw)
    args, kwargs, _ = msgpack.unpackb(base64.b64decode(message["body"]))
    return args, kwargs


def test_tasks_name_batches_kept_once_until_every_pump_wrote_them(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        base_config(
            tmp_path,
            pumps={
                "csv": {"type": "csv", "meta": {"csv_dir": str(tmp_path / "csv")}},
                "mem": {"type": "memory"},
            },
        ),
    )
    settings = load_settings(config)
    store = BatchStore(redis_db, settings.key_prefix)
    envelopes = EnvelopeStore(redis_db, settings.key_prefix)
    # No worker yet: the reporter's ingest tasks name envelopes kept on the broker.
    records = [make_record("kept", i) for i in range(3000)]
    report(records, config)
    assert redis_db.llen("ingest") >= 1
    for raw in redis_db.lrange("ingest", 0, -1):
        args, kwargs = task_arguments(raw)
        assert args == [] and set(kwargs) == {"ref"} and set(kwargs["ref"]) == {"key"}
        assert len(raw) < 4096, "an ingest task carries the envelope's key, not its bytes"
        assert envelopes.load(kwargs["ref"]["key"])
    assert envelopes.waiting() == redis_db.llen("ingest")

    # Only ingest runs: the write tasks wait in the pump queues.
    procs.append(start_worker(config, tmp_path / "ingest.log", queues="ingest", name="in"))
    assert wait_until(lambda: redis_db.llen("pump.csv") >= 1 and store.held() >= 1, 60)
    assert wait_until(lambda: redis_db.llen("pump.csv") == redis_db.llen("pump.mem"), 30)
    for raw in redis_db.lrange("pump.csv", 0, -1):
        args, kwargs = task_arguments(raw)
        assert args == ["csv"] and set(kwargs) == {"ref"} and set(kwargs["ref"]) == {"key"}
        assert len(raw) < 4096, "a write task carries the batch's key, not its bytes"
        assert store.holders(kwargs["ref"]["key"]) == ["csv", "mem"]

    procs.append(start_worker(config, tmp_path / "pumps.log", queues="pump.csv,pump.mem"))
    assert wait_until(lambda: len(read_csv_rows(tmp_path / "csv")) >= len(records), 60)
    assert wait_until(lambda: store.held() == 0, 30), "every batch is removed once written"
    assert envelopes.waiting() == 0
    assert sorted(row["Request"] for row in read_csv_rows(tmp_path / "csv")) == sorted(
        r.request for r in records
    )
    assert int(redis_db.hget("iam-pump:stats", "written_records:mem") or 0) == len(records)
