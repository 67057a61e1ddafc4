"""Who may see what: record content stays out of the worker's log, and out of Redis once a
batch is dead-lettered with ``request`` and ``policies`` hidden.

One scenario, run by a real worker and beat: a Go chunk on the Redis list and a reporter batch,
both with malformed records, an oversized record, and a pump that fails every write, every record
carrying a marker in ``request`` and ``policies``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from app.analytics import AnalyticsRecord
from app.codec import decode_clean_batch, encode_go_record
from app.config import parse_settings
from app.record import GO_FIELD_NAMES
from app.stores.dead_letters import DeadLetter, DeadLetterStore
from tests.conftest import require
from tests.faults.conftest import AMQP_URL, purge_amqp_queues
from tests.faults.helpers import report, requests_in
from tests.support import (
    Proc,
    base_config,
    port_open,
    start_beat,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIST_KEY = "analytics-iam-system-analytics"
GOOD = 20


def go_map(marker: str, **values: object) -> dict[str, object]:
    row = [1, "u", "allow", "", f"{marker}-req-bad", f"{marker}-pol-bad", "", msgpack.Timestamp(0)]
    base: dict[str, object] = dict(zip(GO_FIELD_NAMES, row, strict=True))
    base.update(values)
    return base


def bad_go_items(marker: str) -> list[bytes]:
    """Malformed list items, each with the marker where a reader could find it."""
    good = encode_go_record(AnalyticsRecord(request=f"{marker}-req-cut", policies="p"))
    non_utf8 = msgpack.packb(go_map(marker, Username="PLACEHOLDER")).replace(
        b"PLACEHOLDER",
        b"\xff\xfe" * 5 + b"x",  # same length: still a valid map
    )
    return [
        msgpack.packb(go_map(marker, TimeStamp=f"{marker}-as-time")),  # wrong type, marker in it
        good[: good.index(b"-req-cut") + 4],  # cut inside the request: not msgpack
        non_utf8,
        msgpack.packb({**go_map(marker, Effect=7), "Extra": f"{marker}-extra"}),
        msgpack.packb([1, f"{marker}-in-a-list"]),
    ]


def run_scenario(
    tmp_path: Path, broker: str, procs: list[Proc], *, hide: dict[str, Any]
) -> tuple[str, Path, Proc, Proc, Any]:
    """Send everything, wait until delivered and dead-lettered; return (marker, config, worker,
    beat, settings)."""
    marker = f"MARK{uuid.uuid4().hex[:12]}"
    csv_dir = tmp_path / "csv"
    config_data = base_config(
        tmp_path,
        pumps={
            "csv": {
                "type": "csv",
                "max-record-size-bytes": 4096,
                "meta": {"csv_dir": str(csv_dir)},
            },
            "failing": {
                "type": "memory",
                "max-retries": 1,
                "meta": {"fail_times": 1_000_000},
                **hide.get("failing", {}),
            },
        },
        **hide.get("top", {}),
    )
    if broker:
        config_data["broker-url"] = broker
        purge_amqp_queues(broker, ["ingest", "purge", "pump.csv", "pump.failing"])
    config = write_config(tmp_path / "c.yaml", config_data)
    settings = parse_settings(config.read_text())
    good = {
        side: [
            AnalyticsRecord(
                username=f"u{i}", request=f"{marker}-req-{side}-{i}", policies=f"{marker}-pol-{i}"
            )
            for i in range(GOOD)
        ]
        for side in ("go", "py")
    }
    go_good = [encode_go_record(record) for record in good["go"]]
    client = redis.Redis.from_url(settings.redis.url)
    client.rpush(LIST_KEY, *bad_go_items(marker), *go_good)
    worker = start_worker(config, tmp_path / "w.log")
    procs.append(worker)
    beat = start_beat(config, tmp_path / "beat.log", tmp_path)
    procs.append(beat)
    wrong_type = AnalyticsRecord(username=1234, request=f"{marker}-req-row")  # type: ignore[arg-type]
    oversized = AnalyticsRecord(username="big", request=f"{marker}-req-big-" + "x" * 5000)
    report([*good["py"], wrong_type, oversized], config)

    store = DeadLetterStore(client, settings)

    def settled() -> bool:
        failing = sum(entry.record_count for entry in store.entries("failing"))
        return (
            store.count("ingest") == 2
            and store.count("csv") == 1
            and failing == 2 * GOOD + 1
            and len(requests_in(csv_dir)) == 2 * GOOD
        )

    assert wait_until(settled, 60), [(e.group, e.record_count) for e in all_entries(store)]
    counts = requests_in(csv_dir)
    expected = {record.request for record in good["go"] + good["py"]}
    lost = len(expected - set(counts))
    duplicated = sum(n - 1 for n in counts.values())
    entries = [(entry.group, entry.record_count) for entry in all_entries(store)]
    print(
        f"\n[privacy, {'amqp' if broker else 'redis'}] csv: {len(expected)} expected, "
        f"lost {lost}, duplicated {duplicated}; dead letters: {entries}"
    )
    assert lost == 0
    client.close()
    return marker, config, worker, beat, settings


def all_entries(store: DeadLetterStore) -> list[DeadLetter]:
    return [entry for group in store.groups() for entry in store.entries(group)]


def keys_holding(client: redis.Redis, needle: bytes) -> list[str]:
    """Every key of the database whose value contains ``needle``."""
    found = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "hash":
            values = [*client.hgetall(key).values()]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "set":
            values = [*client.smembers(key)]
        elif kind == "zset":
            values = client.zrange(key, 0, -1)
        else:
            values = [client.dump(key) or b""]
        if any(needle in value for value in values):
            found.append(key.decode())
    return found


@pytest.mark.parametrize("broker_name", ["redis", "amqp"])
def test_the_workers_log_carries_no_record_content(
    tmp_path: Path, broker_name: str, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    if broker_name == "amqp":
        require(port_open("127.0.0.1", 5672), "RabbitMQ on 127.0.0.1:5672")
    broker = AMQP_URL if broker_name == "amqp" else ""
    marker, _, worker, beat, settings = run_scenario(tmp_path, broker, procs, hide={})
    # Kept in full: the markers did go through the worker, into its dead letters.
    store = DeadLetterStore(redis_db, settings)
    assert any(marker.encode() in entry.pack() for entry in store.entries("failing"))
    assert any(marker.encode() in raw for e in store.entries("ingest") for raw in e.raw)
    log = worker.output() + beat.output()
    assert "retrying in" in log and "dead-lettered" in log and "malformed" in log, log[-3000:]
    leaked = [line for line in log.splitlines() if marker in line]
    print(f"log lines: {len(log.splitlines())}, with the marker: {len(leaked)}")
    assert not leaked, leaked[:5]


def test_hidden_fields_leave_no_record_content_in_redis(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    hide = {
        "top": {"dead-letters": {"request": "redact", "policies": "drop"}},
        "failing": {"dead-letters": {"request": "drop"}},
    }
    marker, _, worker, _, settings = run_scenario(tmp_path, "", procs, hide=hide)
    # Nothing in the database holds the marker once the batches are done (the batch bytes are
    # released as the writes finish, so give them a moment).
    assert wait_until(lambda: not keys_holding(redis_db, marker.encode()), 20), keys_holding(
        redis_db, marker.encode()
    )
    store = DeadLetterStore(redis_db, settings)
    for entry in store.entries("failing"):
        # The pump's own block drops request; policies follows the top-level block.
        assert entry.redacted == {"request": "drop", "policies": "drop"}
        assert entry.payload is not None
        _, records = decode_clean_batch(entry.payload)
        assert {(r.request, r.policies) for r in records} == {("", "")}
        assert all(r.username for r in records)
    [too_big] = store.entries("csv")
    assert too_big.redacted == {"request": "redact", "policies": "drop"}
    assert too_big.payload is not None
    [big] = decode_clean_batch(too_big.payload)[1]
    assert big.request.startswith("[redacted: ") and big.username == "big"
    ingest = store.entries("ingest")
    reasons = [reason for entry in ingest for reason in entry.reasons]
    assert len(reasons) == len(bad_go_items(marker)) + 1
    kept_raw = [raw for entry in ingest for raw in entry.raw if raw]
    assert kept_raw and all(b"[redacted: " in raw or b"Request" not in raw for raw in kept_raw)
    print(f"ingest reasons: {reasons}")
    assert worker.popen.poll() is None
