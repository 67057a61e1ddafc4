"""Bad input never sinks a batch: each bad record is set aside with its reason, the good ones
of the same chunk or batch are delivered, and no worker crashes or loops."""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import pytest
import redis

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from app.codec import encode_go_record
from app.config import parse_settings
from app.record import GO_FIELD_NAMES
from app.stores.dead_letters import DeadLetterStore
from tests.faults.conftest import fault_config
from tests.faults.helpers import await_delivery, make_records
from tests.support import Proc, start_beat, start_worker, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIST_KEY = "analytics-iam-system-analytics"


def go_map(**values: object) -> dict[str, object]:
    base: dict[str, object] = dict(
        zip(GO_FIELD_NAMES, [1, "u", "allow", "", "r", "", "", msgpack.Timestamp(0)], strict=True)
    )
    base.update(values)
    return base


def bad_go_items() -> dict[bytes, str]:
    """Raw list items and a word each reason must contain."""
    good = encode_go_record(AnalyticsRecord(username="x"))
    non_utf8 = msgpack.packb(go_map(Username="PLACEHOLDER")).replace(
        b"PLACEHOLDER", b"\xff\xfe" * 5 + b"x"
    )
    return {
        good[: len(good) // 2]: "not msgpack",
        b"\x00\x01garbage": "not msgpack",
        b"\xc1": "not msgpack",
        msgpack.packb(go_map(TimeStamp="yesterday")): "TimeStamp must be an integer",
        msgpack.packb(go_map(Effect=7)): "Effect must be a string",
        msgpack.packb({k: v for k, v in go_map().items() if k != "Request"}): "missing field",
        non_utf8: "UTF-8",
        msgpack.packb([1, 2, 3]): "expected a msgpack map",
        struct.pack(">B", 0x88): "not msgpack",
    }


def test_bad_records_are_set_aside_and_their_neighbours_delivered(
    tmp_path: Path, broker: str, faults_db: redis.Redis, procs: list[Proc]
) -> None:
    config_data = fault_config(
        tmp_path,
        broker,
        delivery={"purge-chunk-size": 1000},
        pumps={
            "csv": {
                "type": "csv",
                "max-record-size-bytes": 4096,
                "meta": {"csv_dir": str(tmp_path / "csv")},
            }
        },
    )
    config = write_config(tmp_path / "c.yaml", config_data)
    settings = parse_settings(config.read_text())

    # One chunk from the Go side with good and bad records mixed.
    good_go = make_records("go", 50)
    bad = bad_go_items()
    items = [encode_go_record(r) for r in good_go]
    for offset, raw in enumerate(bad):
        items.insert(offset * 5, raw)
    faults_db.rpush(LIST_KEY, *items)

    # One batch from the reporter with a wrong type, an unencodable value and an oversized record.
    good_py = make_records("py", 50)
    wrong_type = AnalyticsRecord(username=12345, request="wrong-type")  # type: ignore[arg-type]
    unencodable = AnalyticsRecord(username="x", request=object())  # type: ignore[arg-type]
    oversized = AnalyticsRecord(username="big", request="oversized-" + "x" * 10_000)
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    analytics.start()
    for record in [*good_py[:25], wrong_type, unencodable, oversized, *good_py[25:]]:
        assert analytics.record_hit(record)
    stats = analytics.stop()
    assert stats.rejected == 1 and stats.shipped_records == 52

    worker = start_worker(config, tmp_path / "w.log")
    procs.append(worker)
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))
    lost, duplicated, _ = await_delivery(
        tmp_path / "csv",
        {r.request for r in good_go + good_py},
        timeout_s=60,
        label=f"bad input ({'amqp' if broker else 'redis'})",
    )
    assert lost == 0 and duplicated == 0

    store = DeadLetterStore(faults_db, settings)
    assert wait_until(lambda: store.count("ingest") == 2 and store.count("csv") == 1, 30)
    malformed = store.entries("ingest")
    reasons = [reason for entry in malformed for reason in entry.reasons]
    assert len(reasons) == len(bad) + 1
    for raw, word in bad.items():
        entry = next(e for e in malformed if raw in e.raw)
        assert word in entry.reasons[entry.raw.index(raw)], (raw, entry.reasons)
    assert any("Username must be a string" in reason for reason in reasons)
    [too_big] = store.entries("csv")
    assert too_big.record_count == 1 and "over the limit of 4096" in too_big.error

    # Nothing crashed or looped: every batch was ingested once and the worker is alive.
    assert worker.popen.poll() is None
    assert int(faults_db.hget("iam-pump:stats", "ingested_batches") or 0) == 2
    assert "Traceback" not in worker.output()
