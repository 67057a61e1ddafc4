"""``dead-letters show`` and ``replay`` on entries whose request or policies were hidden."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis

from app.codec import encode_clean_batch, records_to_clean_rows
from app.config import parse_settings
from app.record import AnalyticsRecord
from app.stores.dead_letters import DeadLetterStore
from tests.support import base_config, run_cli, write_config

pytestmark = pytest.mark.integration


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("dead-letters", *args, "--config", str(config))


def test_show_names_hidden_fields_and_replay_needs_allow_redacted(
    tmp_path: Path, redis_db: redis.Redis
) -> None:
    config_data = base_config(tmp_path, **{"dead-letters": {"policies": "drop"}})
    config_data["pumps"]["csv"]["dead-letters"] = {"request": "redact"}
    config = write_config(tmp_path / "c.yaml", config_data)
    settings = parse_settings(config.read_text())
    records = [
        AnalyticsRecord(username=f"u{i}", request=f"BODY-{i}-xyz", policies="POLICY", id=f"b1-{i}")
        for i in range(2)
    ]
    payload = encode_clean_batch("b1", records_to_clean_rows(records))
    store = DeadLetterStore(redis_db, settings)
    entry = store.put_batch(
        "csv", "b1", payload, stage="write", error="sink said: BODY-0-xyz is bad", record_count=2
    )
    kept = store.get("csv", entry.id)
    assert kept is not None and kept.error == "sink said: [redacted] is bad"

    shown = cli(config, "show", "csv", entry.id)
    assert shown.returncode == 0, shown.stderr
    assert "redacted:   policies dropped, request redacted" in shown.stdout
    assert "'[redacted: 10 bytes]'" in shown.stdout and "BODY" not in shown.stdout

    refused = cli(config, "replay", "csv", entry.id)
    assert refused.returncode == 1, refused.stdout
    assert "--allow-redacted" in refused.stdout
    assert store.count("csv") == 1 and redis_db.llen("pump.csv") == 0

    replayed = cli(config, "replay", "csv", entry.id, "--allow-redacted")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert store.count("csv") == 0 and redis_db.llen("pump.csv") == 1
