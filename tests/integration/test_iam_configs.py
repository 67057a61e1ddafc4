"""iam's own config files run unchanged: the production ``iam-pump.yaml`` of marmotedu/iam.

``tests/fixtures/iam/iam-pump.yaml`` is a verbatim copy of ``configs/iam-pump.yaml`` from
marmotedu/iam (commit 16c723d3). An operator fills its ``${...}`` variables from the environment
and starts the pump on it; so does this test, against a Redis of its own (the file uses
database 0) and the MongoDB server the store tests use, then reads the records back by id.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymongo
import pytest

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from tests.support import REPO, Proc, RedisServer, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "iam"
RECORDS = 1000  # the file caps the collection at 1 MB


def health(address: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


def start_pump(config: Path, env: dict[str, str], log: Path) -> Proc:
    return Proc(
        [sys.executable, "-m", "app.cli", "run", "--config", str(config), "--concurrency", "2"],
        env=env,
        log=log,
        cwd=REPO,
    )


def ship(config: Path, run: str, count: int) -> None:
    """What iam-authz-server does: the reporter, configured from the same file."""
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    analytics.start()
    for index in range(count):
        record = AnalyticsRecord(
            timestamp=int(time.time()),
            username=f"user-{index % 7}",
            effect="allow" if index % 3 else "deny",
            conclusion="",
            request=f"{run}-{index}",
            policies="",
            deciders="",
            expire_at=datetime(2100, 1, 1, tzinfo=UTC),
        )
        while not analytics.record_hit(record):
            time.sleep(0.001)
    assert analytics.stop().shipped_records == count


def test_iams_production_config_runs_unchanged(
    tmp_path: Path,
    mongo_uri: str,
    procs: list[Proc],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = RedisServer(tmp_path / "redis")
    database = f"iam_{int(time.time() * 1000) % 10**9}"
    address = f"127.0.0.1:{free_port()}"
    variables = {
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(server.port),
        "REDIS_PASSWORD": "",
        "IAM_PUMP_COLLECTION_NAME": "iam_analytics",
        "IAM_PUMP_MONGO_URL": f"{mongo_uri.rstrip('/')}/{database}",
        "IAM_LOG_DIR": str(tmp_path / "log"),
        # The file binds 0.0.0.0:7070; a test must not take a port others may use.
        "IAM_PUMP_HEALTH_CHECK_ADDRESS": address,
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "log").mkdir()
    config = tmp_path / "iam-pump.yaml"
    config.write_bytes((FIXTURES / "iam-pump.yaml").read_bytes())
    mongo: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        variables["IAM_PUMP_MONGO_URL"], serverSelectionTimeoutMS=5000
    )
    try:
        pump = start_pump(config, dict(os.environ), tmp_path / "run.log")
        procs.append(pump)
        pump.wait_for_output("ready.", 90)
        assert wait_until(lambda: health(address)[0] == 200, 30), health(address)
        checks = health(address)[1]["checks"]
        assert checks.get("pump:mongo") == "ok", checks

        ship(config, "iam", RECORDS)
        collection = mongo[database]["iam_analytics"]

        def stored() -> list[str]:
            return [doc["request"] for doc in collection.find({}, {"request": 1, "_id": 0})]

        # The file's purge-delay is 10 s: the Go pump's cadence, kept.
        assert wait_until(lambda: len(stored()) >= RECORDS, 90), pump.output()[-3000:]
        time.sleep(1)
        requests = stored()
        assert len(requests) == len(set(requests)) == RECORDS
        assert set(requests) == {f"iam-{index}" for index in range(RECORDS)}
    finally:
        mongo.drop_database(database)
        mongo.close()
        server.stop()
