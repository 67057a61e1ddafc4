"""What the influx pump adds to the contract kit (run in ``tests/unit/test_pump_contract.py``),
against a real InfluxDB 1.x read back with InfluxQL: iam's fields and tags, point times from the
record, no two records of one second on one point, refused points found one by one, and iam's
``meta`` keys."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from influxdb import InfluxDBClient

from app.record import AnalyticsRecord
from pumps.base import WriteResult
from pumps.deadline import Deadline
from pumps.errors import PumpPermanentError
from pumps.influx import InfluxPump, time_offset_ns
from pumps.registry import meta_problems
from pumps.testing import copies, make_records, opened
from tests.conftest import require
from tests.servers_influx import (
    InfluxServer,
    point_count,
    start_influxd,
    stop_influxd,
    stored_ids,
)

NOW_S = 1_795_500_000
WEEK_S = 7 * 86_400


def soon() -> Deadline:
    return Deadline.after(10)


def influx_pump(server: InfluxServer, database: str, **meta: Any) -> InfluxPump:
    return InfluxPump.create(
        "influx", {"database_name": database, "address": server.url, **meta}, timeout_s=10
    )


def query(server: InfluxServer, database: str, text: str) -> list[dict[str, Any]]:
    client = server.client(database)
    try:
        return list(client.query(text, epoch="ns").get_points())
    finally:
        client.close()


# -- the offset: no server ------------------------------------------------------------------


def test_offsets_are_the_same_everywhere_and_distinct_within_a_batch() -> None:
    batch = "0f3c2a9d8e7b4c5a9e1d2c3b4a5f6e7d"
    offsets = [time_offset_ns(f"{batch}-{position}") for position in range(20_000)]
    assert len(set(offsets)) == len(offsets)
    assert all(0 <= offset < 1_000_000_000 for offset in offsets)
    # A hash of the text, not Python's salted hash(): this value holds on every machine.
    assert time_offset_ns(f"{batch}-0") == 91_191_904
    assert time_offset_ns(f"{batch}-7") == (time_offset_ns(f"{batch}-0") + 7) % 1_000_000_000


def test_records_purged_in_one_epoch_never_share_an_offset() -> None:
    """Purged batches are ``<epoch>-<records removed before>``: the counts add up."""
    epoch = "a1b2c3"
    offsets = {
        time_offset_ns(f"{epoch}-{start}-{position}")
        for start in range(0, 50_000, 1000)
        for position in range(1000)
    }
    assert len(offsets) == 50_000


def test_other_ids_are_hashed_whole() -> None:
    assert time_offset_ns("no-counts-here") != time_offset_ns("no-counts-there")
    assert 0 <= time_offset_ns("") < 1_000_000_000


# -- meta ----------------------------------------------------------------------------------


def test_iams_meta_keys_load() -> None:
    meta = {
        "database_name": "iam_analytics",
        "address": "http://influx.internal:8086",
        "username": "iam",
        "password": "secret",
        "fields": ["request", "conclusion", "timestamp"],
        "tags": ["username", "effect"],
    }
    assert meta_problems({"influx": {"type": "influx", "meta": meta}}) == []
    pump = InfluxPump.create("influx", meta, timeout_s=5)
    assert pump.meta.field_names == ("request", "conclusion", "timestamp")
    assert pump.meta.tag_names == ("effect", "username")


@pytest.mark.parametrize(
    ("meta", "path", "words"),
    [
        ({}, "pumps.i.meta.database_name", "Field required"),
        ({"database_name": "d", "tags": ["user"]}, "pumps.i.meta.tags", "'user'"),
        ({"database_name": "d", "fields": ["Request"]}, "pumps.i.meta.fields", "known:"),
        ({"database_name": "d", "address": "localhost:8086"}, "pumps.i.meta.address", "http"),
        (
            {"database_name": "d", "fields": ["username"], "tags": ["username"]},
            "pumps.i.meta",
            "both fields and tags",
        ),
        ({"database_name": "d", "retention": "7d"}, "pumps.i.meta.retention", "unknown key"),
    ],
)
def test_bad_meta_is_named_by_its_path(meta: dict[str, Any], path: str, words: str) -> None:
    problems = meta_problems({"i": {"type": "influx", "meta": meta}})
    assert any(where == path and words in message for where, message in problems), problems


# -- against the server --------------------------------------------------------------------


@pytest.mark.integration
def test_fields_and_tags_are_iams_and_values_come_back_as_written(
    influx_server: InfluxServer, influx_database: str
) -> None:
    record = AnalyticsRecord(
        timestamp=NOW_S,
        username="alice smith,ops=1",
        effect="allow",
        conclusion='says "yes"',
        request='{\n  "resource": "articles:1",\n  "path": "C:\\\\temp"\n}',
        policies="[]",
        deciders="naïve ☃",
        expire_at=make_records("t", 1)[0].expire_at,
        id="b1-0",
    )
    with opened(influx_pump(influx_server, influx_database, tags=["username", "effect"])) as pump:
        assert pump.write([record], deadline=soon()) == WriteResult()
    tag_keys = {row["tagKey"] for row in query(influx_server, influx_database, "SHOW TAG KEYS")}
    assert tag_keys == {"username", "effect"}
    field_types = {
        row["fieldKey"]: row["fieldType"]
        for row in query(influx_server, influx_database, "SHOW FIELD KEYS")
    }
    assert field_types == {
        "id": "string",
        "timestamp": "integer",
        "conclusion": "string",
        "request": "string",
        "policies": "string",
        "deciders": "string",
        "expireAt": "string",
    }
    (point,) = query(influx_server, influx_database, 'SELECT * FROM "analytics"')
    assert point["time"] == NOW_S * 1_000_000_000 + time_offset_ns("b1-0")
    assert point["username"] == "alice smith,ops=1"
    assert point["request"] == record.request  # newlines, quotes and backslashes intact
    assert point["conclusion"] == record.conclusion
    assert point["deciders"] == "naïve ☃"
    assert point["timestamp"] == NOW_S
    assert point["expireAt"] == "2030-06-01T12:00:00Z"  # as Go's JSON writes it
    by_tag = query(
        influx_server,
        influx_database,
        'SELECT count("id") FROM "analytics" WHERE effect = \'allow\'',
    )
    assert by_tag[0]["count"] == 1


@pytest.mark.integration
def test_only_the_fields_asked_for_and_the_id_are_stored(
    influx_server: InfluxServer, influx_database: str
) -> None:
    records = make_records("few", 3)
    meta = {"fields": ["conclusion"], "tags": ["effect"]}
    with opened(influx_pump(influx_server, influx_database, **meta)) as pump:
        pump.write(records, deadline=soon())
    fields = {row["fieldKey"] for row in query(influx_server, influx_database, "SHOW FIELD KEYS")}
    assert fields == {"id", "conclusion"}


@pytest.mark.integration
def test_many_records_of_one_second_and_tag_set_are_each_a_point(
    influx_server: InfluxServer, influx_database: str
) -> None:
    """iam stamps points with the write time: records of one batch in one microsecond with the
    same tags overwrite each other. Here each record's offset is its own."""
    batches = [make_records(f"same{n}", 2000, timestamp=NOW_S) for n in range(3)]
    for batch in batches:
        for index, record in enumerate(batch):
            batch[index] = dataclasses.replace(record, username="one", effect="allow")
    with opened(influx_pump(influx_server, influx_database, tags=["username", "effect"])) as pump:
        for batch in batches:
            assert pump.write(batch, deadline=soon()) == WriteResult()
    expected = Counter(record.id for batch in batches for record in batch)
    assert stored_ids(influx_server, influx_database) == expected
    assert point_count(influx_server, influx_database) == 6000


@pytest.mark.integration
def test_a_redelivered_batch_rewrites_the_same_points(
    influx_server: InfluxServer, influx_database: str
) -> None:
    records = make_records("again", 50)
    with opened(influx_pump(influx_server, influx_database, tags=["username"])) as pump:
        pump.write(records, deadline=soon())
        first = query(influx_server, influx_database, 'SELECT "id" FROM "analytics"')
        pump.write(copies(records), deadline=soon())
        pump.write(list(reversed(copies(records))), deadline=soon())
    assert query(influx_server, influx_database, 'SELECT "id" FROM "analytics"') == first
    assert point_count(influx_server, influx_database) == 50


@pytest.mark.integration
def test_points_influxdb_refuses_are_returned_alone_and_the_rest_is_written(
    influx_server: InfluxServer, influx_database: str
) -> None:
    """A field type conflict holds within one shard (a week here): the records of that week are
    refused with InfluxDB's reason, those of the next week are written."""
    pump = influx_pump(influx_server, influx_database)
    with opened(pump):
        client = influx_server.client(influx_database)
        try:
            client.write_points(
                [f"analytics conclusion=1i {NOW_S * 1_000_000_000}"], protocol="line"
            )
        finally:
            client.close()
        records = make_records("conflict", 40)
        for index in range(0, 40, 4):  # a quarter of them a week later, in another shard
            records[index] = dataclasses.replace(records[index], timestamp=NOW_S + WEEK_S)
        result = pump.write(records, deadline=soon())
    refused = {record.id for record, _ in result.rejected}
    later = {record.id for record in records if record.timestamp == NOW_S + WEEK_S}
    assert refused == {record.id for record in records} - later
    assert all("field type conflict" in reason for _, reason in result.rejected)
    assert stored_ids(influx_server, influx_database) == Counter(dict.fromkeys(later, 1))


@pytest.mark.integration
def test_a_batch_influxdb_refuses_whole_is_refused_in_one_request(
    influx_server: InfluxServer, influx_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every point in a shard whose ``conclusion`` is an integer: InfluxDB says it dropped them
    all, and the pump does not halve 500 records down to single points to hear it again."""
    caplog.set_level(logging.INFO, logger="pumps.influx")
    pump = influx_pump(influx_server, influx_database)
    with opened(pump):
        client = influx_server.client(influx_database)
        try:
            client.write_points(
                [f"analytics conclusion=1i {NOW_S * 1_000_000_000}"], protocol="line"
            )
        finally:
            client.close()
        records = make_records("all", 500)
        result = pump.write(records, deadline=soon())
    assert [record.id for record, _ in result.rejected] == [record.id for record in records]
    assert all("field type conflict" in reason for _, reason in result.rejected)
    assert not [entry for entry in caplog.records if "writing halves" in entry.getMessage()]
    assert stored_ids(influx_server, influx_database) == Counter()


@pytest.mark.integration
def test_a_time_influxdb_cannot_hold_refuses_that_record_alone(
    influx_server: InfluxServer, influx_database: str
) -> None:
    records = make_records("time", 3)
    records[1] = dataclasses.replace(records[1], timestamp=10**12)
    with opened(influx_pump(influx_server, influx_database)) as pump:
        result = pump.write(records, deadline=soon())
    assert [(r.id, "outside" in reason) for r, reason in result.rejected] == [(records[1].id, True)]
    assert stored_ids(influx_server, influx_database) == Counter(
        {records[0].id: 1, records[2].id: 1}
    )


@pytest.mark.integration
def test_the_database_is_created_at_open_and_an_existing_one_is_kept(
    influx_server: InfluxServer, influx_database: str
) -> None:
    with opened(influx_pump(influx_server, influx_database)) as pump:
        pump.write(make_records("one", 2), deadline=soon())
    with opened(influx_pump(influx_server, influx_database)) as pump:
        pump.check()
        pump.write(make_records("two", 3), deadline=soon())
    assert point_count(influx_server, influx_database) == 5


@pytest.mark.integration
def test_request_json_round_trips_through_influxql(
    influx_server: InfluxServer, influx_database: str
) -> None:
    records = make_records("json", 5)
    with opened(influx_pump(influx_server, influx_database, tags=["username"])) as pump:
        pump.write(records, deadline=soon())
    wanted = records[3]
    rows = query(
        influx_server,
        influx_database,
        f'SELECT "request" FROM "analytics" WHERE "id" = \'{wanted.id}\'',
    )
    assert [json.loads(row["request"]) for row in rows] == [json.loads(wanted.request)]


# -- a server that asks for credentials ----------------------------------------------------


@pytest.fixture(scope="module")
def influx_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """influxd with ``auth-enabled``: an admin, and a user who may only write to ``granted``."""
    require(shutil.which("influxd") is not None, "influxd (apt-get install influxdb)")
    process, url = start_influxd(Path(tmp_path_factory.mktemp("influxd-auth")), auth=True)
    server = InfluxServer(url)
    host, port = server.address
    try:
        first = InfluxDBClient(host, port, timeout=10, retries=1)
        first.query("CREATE USER admin WITH PASSWORD 'admin-pw' WITH ALL PRIVILEGES", method="POST")
        first.close()
        admin = InfluxDBClient(host, port, "admin", "admin-pw", timeout=10, retries=1)
        admin.create_database("granted")
        admin.create_user("writer", "writer-pw")
        admin.grant_privilege("write", "granted", "writer")
        admin.close()
        yield server
    finally:
        stop_influxd(process)


@pytest.mark.integration
def test_refused_credentials_are_a_permanent_error(influx_with_auth: InfluxServer) -> None:
    for username, password in [("admin", "wrong"), ("", "")]:
        pump = influx_pump(influx_with_auth, "granted", username=username, password=password)
        with pytest.raises(PumpPermanentError, match="InfluxDB refused create database"):
            pump.open()
        pump.close()


@pytest.mark.integration
def test_a_user_who_may_only_write_is_warned_and_writes(
    influx_with_auth: InfluxServer, caplog: pytest.LogCaptureFixture
) -> None:
    records = make_records("writer", 4)
    meta = {"username": "writer", "password": "writer-pw"}
    with opened(influx_pump(influx_with_auth, "granted", **meta)) as pump:
        assert pump.write(records, deadline=soon()) == WriteResult()
    assert any(
        entry.levelno == logging.WARNING and "not allowed to create database" in entry.getMessage()
        for entry in caplog.records
    )
    host, port = influx_with_auth.address
    admin = InfluxDBClient(host, port, "admin", "admin-pw", database="granted", timeout=10)
    try:
        ids = Counter(p["id"] for p in admin.query('SELECT "id" FROM "analytics"').get_points())
    finally:
        admin.close()
    assert ids == Counter(record.id for record in records)
