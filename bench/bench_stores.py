"""Records per second into MongoDB, Elasticsearch, Kafka, InfluxDB, syslog and Prometheus
counters: raw client, our pumps, and end to end.

    python bench/bench_stores.py --records 50000 [--pin none|pinned|both] [--pin-cpu 1]

``--pin pinned`` pins the MongoDB and Elasticsearch servers (every thread of the processes
listening on their ports) to ``--pin-cpu`` with ``taskset`` for the whole run, so the raw client
and the end-to-end run meet the same server on the same core; their earlier CPUs are given back
afterwards. ``--pin both`` runs everything unpinned, then pinned, and labels the rows.

For each store, the same records are written three ways, each into a fresh collection or index:

* ``raw``: the driver's own bulk call with the documents the pump would write (pymongo
  ``insert_many(ordered=False)``, Elasticsearch ``bulk``), in batches of ``--batch-size``; for
  mongo also the raw ``bulk_write`` of the same ``_id`` upserts the pump sends, and for the
  aggregates the raw ``$inc`` upserts without the once-per-batch guard; for syslog (a real
  ``rsyslogd`` the benchmark starts, TCP) one ``sendall`` per batch of the same messages, already
  formatted, and the standard library's ``SysLogHandler`` emitting each record; for prometheus
  prometheus-client's own ``Counter.labels(...).inc()`` per record in this process (iam's way,
  counts in one process's memory) and the raw Redis ``HINCRBY`` pipeline of the same per-batch
  counts without the once-per-batch guard; for InfluxDB the
  ``influxdb`` client's ``write_points`` of point dicts (its own line protocol), with the same
  measurement, tags, fields and times as the pump's points; for Kafka, confluent-kafka
  ``produce`` of each record's JSON (keyed by id) and one ``flush`` per batch, with the pump's
  producer settings (``acks=all``);
* ``pump``: our pump's ``write()`` in this process, one call per batch;
* ``e2e``: ``Analytics.record_hit`` -> Celery ingest -> write task -> pump, through a real
  ``celery worker`` subprocess, timed from the first record handed to the reporter until the
  store holds them all (worker start-up excluded).

InfluxDB is a real ``influxd`` (Debian's ``influxdb``) started on free ports for the run unless
``--influx-url`` names one. Ratios are against the ``raw`` row measured in the same run. Nothing
is asserted.

Kafka is ``--kafka-bootstrap`` (with ``--kafka-broker-version`` for a broker before 0.10), or
when none is given, a Kafka 0.9 broker started for the run from the jars that
``scripts/test-servers.sh install`` puts in place.

The end-to-end
runs need Redis and use database ``--redis-db`` (default 15; the other benchmarks in ``bench/``
use 12), which they flush: the benchmark owns that database while it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pymongo
import redis
from elasticsearch import Elasticsearch
from influxdb import InfluxDBClient
from pymongo import UpdateOne

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.analytics import Analytics, AnalyticsOptions  # noqa: E402
from app.record import AnalyticsRecord, go_expiry  # noqa: E402
from pumps.base import Pump  # noqa: E402
from pumps.deadline import Deadline  # noqa: E402
from pumps.elasticsearch import record_document as es_document  # noqa: E402
from pumps.influx import go_time_text, time_offset_ns  # noqa: E402
from pumps.kafka import KafkaPump, message_value  # noqa: E402
from pumps.mongo import record_document as mongo_document  # noqa: E402
from pumps.mongo_aggregate import MongoAggregatePump  # noqa: E402
from pumps.prometheus import CounterKeys, read_counts, status_code  # noqa: E402
from pumps.registry import resolve_pump_class  # noqa: E402
from pumps.syslog import SyslogPump  # noqa: E402
from tests.servers_influx import start_influxd, stop_influxd  # noqa: E402
from tests.servers_syslog import new_tag, start_rsyslog, stop_rsyslog  # noqa: E402
from tests.support import Proc, base_config, free_port, start_worker, write_config  # noqa: E402

DEFAULT_RECORDS = 50_000
DEFAULT_BATCH_SIZE_RECORDS = 1000
DEFAULT_E2E_TIMEOUT_S = 600.0
DEFAULT_WORKER_CONCURRENCY = 4
#: The Redis database the end-to-end runs own (and flush); the other benchmarks own 12.
DEFAULT_REDIS_DB = 15
POLL_INTERVAL_S = 0.2
PUMP_TIMEOUT_S = 60.0


@dataclass(slots=True)
class Row:
    store: str
    method: str
    records: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


def make_records(count: int, batch_size: int) -> list[AnalyticsRecord]:
    """Records like iam's, in batches of ``batch_size`` with ids ``<batch>-<position>``."""
    expire_at = datetime.now(UTC) + timedelta(days=1)
    now = int(time.time())
    records = []
    batch = uuid.uuid4().hex
    for index in range(count):
        if index % batch_size == 0:
            batch = uuid.uuid4().hex
        records.append(
            AnalyticsRecord(
                timestamp=now - count + index,
                username=f"user-{index % 50}",
                effect="allow" if index % 4 else "deny",
                conclusion="policies allow access" if index % 4 else "no policy allows access",
                request=json.dumps(
                    {
                        "subject": f"user-{index % 50}",
                        "action": "get",
                        "resource": f"resources:articles:{index % 20}",
                        "context": {"remoteIP": "192.168.0.5"},
                    }
                ),
                policies='[{"id": "68819e5a-738b-41ec-b03c-b58a1b19d043", "effect": "allow"}]',
                deciders='[{"id": "68819e5a-738b-41ec-b03c-b58a1b19d043", "effect": "allow"}]',
                expire_at=expire_at,
                id=f"{batch}-{index % batch_size}",
            )
        )
    return records


def batches(records: Sequence[AnalyticsRecord], size: int) -> list[Sequence[AnalyticsRecord]]:
    return [records[start : start + size] for start in range(0, len(records), size)]


def timed(store: str, method: str, count: int, action: Callable[[], None]) -> Row:
    started = time.perf_counter()
    action()
    return Row(store, method, count, time.perf_counter() - started)


def mongo_url(base: str, database: str) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))


def pump_writes(pump: Pump, groups: list[Sequence[AnalyticsRecord]]) -> Callable[[], None]:
    def run() -> None:
        for group in groups:
            result = pump.write(group, deadline=Deadline.after(pump.timeout_s))
            if result.rejected:
                raise RuntimeError(f"{len(result.rejected)} refused: {result.rejected[0][1]}")

    return run


def timed_pump(store: str, pump: Pump, groups: list[Sequence[AnalyticsRecord]]) -> Row:
    """The pump's ``write()`` over every group, timed between its ``open()`` and ``close()``."""
    pump.open()
    try:
        return timed(store, "pump write()", sum(map(len, groups)), pump_writes(pump, groups))
    finally:
        pump.close()


def end_to_end(
    args: argparse.Namespace,
    store: str,
    pump_entry: dict[str, Any],
    records: Sequence[AnalyticsRecord],
    stored: Callable[[], int],
) -> Row | None:
    """Records through the reporter and a real worker; None (with a note) when Redis is away."""
    client = redis.Redis(host=args.redis_host, port=args.redis_port, db=args.redis_db)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"  e2e skipped: Redis unreachable ({exc})", file=sys.stderr)
        client.close()
        return None
    client.flushdb()
    with tempfile.TemporaryDirectory(prefix="bench-stores-") as folder:
        tmp = Path(folder)
        config = base_config(
            tmp, redis_port=args.redis_port, db=args.redis_db, pumps={store: pump_entry}
        )
        config["redis"]["host"] = args.redis_host
        config["analytics"] = {"records-buffer-size": 20_000, "pool-size": 4}
        config_path = write_config(tmp / "config.yaml", config)
        worker: Proc = start_worker(
            config_path, tmp / "worker.log", concurrency=args.concurrency, name=f"bench-{store}"
        )
        try:
            started = time.perf_counter()
            deadline = time.monotonic() + args.e2e_timeout
            analytics = Analytics(AnalyticsOptions.from_yaml(str(config_path)))
            analytics.start()
            for record in records:
                while not analytics.record_hit(record):  # buffer full: offer it again
                    if time.monotonic() > deadline:
                        analytics.stop(timeout_s=1)
                        print(f"  e2e {store}: the reporter could not ship", file=sys.stderr)
                        return None
                    time.sleep(0.0005)
            analytics.stop()
            while stored() < len(records):
                if time.monotonic() > deadline:
                    print(
                        f"  e2e {store}: only {stored()} of {len(records)} arrived", file=sys.stderr
                    )
                    print(worker.output()[-2000:], file=sys.stderr)
                    return None
                time.sleep(POLL_INTERVAL_S)
            elapsed = time.perf_counter() - started
        finally:
            worker.stop(timeout_s=30)
            client.flushdb()
            client.close()
    return Row(store, "e2e (reporter -> celery -> pump)", len(records), elapsed)


def bench_mongo(args: argparse.Namespace, records: list[AnalyticsRecord]) -> list[Row]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        args.mongo_uri, serverSelectionTimeoutMS=5000
    )
    database = client[f"bench_{uuid.uuid4().hex[:8]}"]
    groups = batches(records, args.batch_size)
    rows = []
    try:
        documents = [[{"_id": r.id, **mongo_document(r)} for r in group] for group in groups]

        def raw_insert() -> None:
            for group in documents:
                database["raw_insert"].insert_many([dict(doc) for doc in group], ordered=False)

        def raw_upsert() -> None:
            for group in documents:
                operations = [
                    UpdateOne(
                        {"_id": doc["_id"]},
                        {"$setOnInsert": {k: v for k, v in doc.items() if k != "_id"}},
                        upsert=True,
                    )
                    for doc in group
                ]
                database["raw_upsert"].bulk_write(operations, ordered=False)

        rows.append(timed("mongo", "raw insert_many", len(records), raw_insert))
        rows.append(timed("mongo", "raw bulk_write upserts", len(records), raw_upsert))
        meta = {"mongo_url": mongo_url(args.mongo_uri, database.name), "collection_name": "pump"}
        pump = resolve_pump_class("mongo").create("mongo", meta, timeout_s=PUMP_TIMEOUT_S)
        rows.append(timed_pump("mongo", pump, groups))
        if not args.skip_e2e:
            entry = {
                "type": "mongo",
                "timeout": PUMP_TIMEOUT_S,
                "meta": {**meta, "collection_name": "e2e"},
            }
            row = end_to_end(
                args, "mongo", entry, records, lambda: database["e2e"].estimated_document_count()
            )
            if row is not None:
                rows.append(row)
    finally:
        client.drop_database(database.name)
        client.close()
    return rows


def bench_aggregate(args: argparse.Namespace, records: list[AnalyticsRecord]) -> list[Row]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        args.mongo_uri, serverSelectionTimeoutMS=5000
    )
    database = client[f"bench_{uuid.uuid4().hex[:8]}"]
    groups = batches(records, args.batch_size)
    meta = {"mongo_url": mongo_url(args.mongo_uri, database.name), "collection_name": "pump"}
    rows = []
    try:
        pump = resolve_pump_class("mongo-aggregate").create(
            "mongo-aggregate", meta, timeout_s=PUMP_TIMEOUT_S
        )
        # The same counter updates the pump makes (its own helpers, to be sure they are the
        # same), upserted without the once-per-batch guard: the baseline shows what it costs.
        assert isinstance(pump, MongoAggregatePump)
        unguarded = []
        for group in groups:
            counters = pump._count(list(group), [])
            operations = []
            for query, change in pump._updates("raw", counters):
                del change["$push"]
                operations.append(UpdateOne({"_id": query["_id"]}, change, upsert=True))
            unguarded.append(operations)

        def raw_inc() -> None:
            for operations in unguarded:
                database["raw_inc"].bulk_write(operations, ordered=False)

        rows.append(
            timed("mongo-aggregate", "raw bulk_write $inc (no guard)", len(records), raw_inc)
        )
        rows.append(timed_pump("mongo-aggregate", pump, groups))
        if not args.skip_e2e:
            entry = {
                "type": "mongo-aggregate",
                "timeout": PUMP_TIMEOUT_S,
                "meta": {**meta, "collection_name": "e2e"},
            }

            def counted() -> int:
                return sum(d["hits"] for d in database["e2e"].find({"dimension": "all"}))

            row = end_to_end(args, "mongo-aggregate", entry, records, counted)
            if row is not None:
                rows.append(row)
    finally:
        client.drop_database(database.name)
        client.close()
    return rows


def bench_elasticsearch(args: argparse.Namespace, records: list[AnalyticsRecord]) -> list[Row]:
    es = Elasticsearch(args.es_url.split(","), request_timeout=PUMP_TIMEOUT_S)
    name = f"bench_{uuid.uuid4().hex[:8]}"
    groups = batches(records, args.batch_size)
    rows = []
    try:
        bodies = []
        for group in groups:
            operations: list[dict[str, Any]] = []
            for record in group:
                operations += [
                    {"index": {"_index": f"{name}-raw", "_id": record.id}},
                    es_document(record),
                ]
            bodies.append(operations)

        def raw_bulk() -> None:
            for operations in bodies:
                response = es.bulk(operations=operations, refresh=False)
                if response["errors"]:
                    raise RuntimeError("raw bulk had errors")

        rows.append(timed("elasticsearch", "raw bulk", len(records), raw_bulk))
        meta = {"elasticsearch_url": args.es_url, "index_name": f"{name}-pump"}
        pump = resolve_pump_class("elasticsearch").create(
            "elasticsearch", meta, timeout_s=PUMP_TIMEOUT_S
        )
        rows.append(timed_pump("elasticsearch", pump, groups))
        if not args.skip_e2e:
            e2e_index = f"{name}-e2e"
            entry = {
                "type": "elasticsearch",
                "timeout": PUMP_TIMEOUT_S,
                "meta": {"elasticsearch_url": args.es_url, "index_name": e2e_index},
            }

            def indexed() -> int:
                if not es.indices.exists(index=e2e_index):
                    return 0
                es.indices.refresh(index=e2e_index)
                return int(es.count(index=e2e_index)["count"])

            row = end_to_end(args, "elasticsearch", entry, records, indexed)
            if row is not None:
                rows.append(row)
    finally:
        for index in es.indices.get(index=f"{name}*").body:
            es.indices.delete(index=index)
        for template in (f"{name}-pump", f"{name}-e2e"):
            if es.indices.exists_index_template(name=template):
                es.indices.delete_index_template(name=template)
        es.close()
    return rows


def bench_syslog(args: argparse.Namespace, records: list[AnalyticsRecord]) -> list[Row]:
    """TCP into a real rsyslogd of the benchmark's own; then the UDP pump, counting losses."""
    import logging.handlers
    import socket

    groups = batches(records, args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-syslog-") as folder:
        server = start_rsyslog(Path(folder))
        try:

            def lines(tag: str) -> int:
                path = server.out / f"{tag}.log"
                return path.read_bytes().count(b"\n") if path.exists() else 0

            def arrived(tag: str, count: int, action: Callable[[], None]) -> Callable[[], None]:
                def run() -> None:
                    action()
                    deadline = time.monotonic() + args.e2e_timeout
                    while lines(tag) < count and time.monotonic() < deadline:
                        time.sleep(0.01)
                    if lines(tag) < count:
                        raise RuntimeError(f"rsyslog wrote {lines(tag)} of {count} for {tag}")

                return run

            def meta(
                tag: str, transport: str = "tcp", port: int = server.tcp_port
            ) -> dict[str, Any]:
                return {
                    "transport": transport,
                    "network_addr": f"127.0.0.1:{port}",
                    "log_level": 134,
                    "tag": tag,
                }

            raw_tag = new_tag()
            formatter = SyslogPump.create("raw", meta(raw_tag), timeout_s=PUMP_TIMEOUT_S)
            payloads = [b"".join(formatter.messages(group)) for group in groups]

            def raw_sendall() -> None:
                with socket.create_connection(("127.0.0.1", server.tcp_port)) as sock:
                    for payload in payloads:
                        sock.sendall(payload)

            rows.append(
                timed(
                    "syslog",
                    "raw socket sendall per batch",
                    len(records),
                    arrived(raw_tag, len(records), raw_sendall),
                )
            )
            handler_tag = new_tag()
            bodies = [
                [message.split(b": ", 1)[1] for message in formatter.messages(g)] for g in groups
            ]

            def stdlib_handler() -> None:
                handler = logging.handlers.SysLogHandler(
                    ("127.0.0.1", server.tcp_port), socktype=socket.SOCK_STREAM
                )
                handler.append_nul = False
                handler.ident = f"{handler_tag}: "
                log = logging.getLogger("bench.syslog")
                log.propagate = False
                log.addHandler(handler)
                try:
                    for group in bodies:
                        for body in group:
                            log.warning("%s", body.decode().rstrip("\n") + "\n")
                finally:
                    log.removeHandler(handler)
                    handler.close()

            rows.append(
                timed(
                    "syslog",
                    "stdlib SysLogHandler per record",
                    len(records),
                    arrived(handler_tag, len(records), stdlib_handler),
                )
            )
            pump_tag = new_tag()
            pump = SyslogPump.create("syslog", meta(pump_tag), timeout_s=PUMP_TIMEOUT_S)
            pump.open()
            try:
                rows.append(
                    timed(
                        "syslog",
                        "pump write() tcp",
                        len(records),
                        arrived(pump_tag, len(records), pump_writes(pump, groups)),
                    )
                )
            finally:
                pump.close()
            udp_tag = new_tag()
            udp = SyslogPump.create(
                "udp", meta(udp_tag, "udp", server.udp_port), timeout_s=PUMP_TIMEOUT_S
            )
            udp.open()
            try:
                sent = timed(
                    "syslog", "pump write() udp (sent)", len(records), pump_writes(udp, groups)
                )
            finally:
                udp.close()
            time.sleep(2)
            print(
                f"  syslog udp: {len(records)} sent in {sent.seconds:.2f}s, "
                f"{len(records) - lines(udp_tag)} lost",
                file=sys.stderr,
            )
            rows.append(sent)
            if not args.skip_e2e:
                e2e_tag = new_tag()
                entry = {"type": "syslog", "timeout": PUMP_TIMEOUT_S, "meta": meta(e2e_tag)}
                row = end_to_end(args, "syslog", entry, records, lambda: lines(e2e_tag))
                if row is not None:
                    rows.append(row)
        finally:
            stop_rsyslog(server)
    return rows


def bench_prometheus(args: argparse.Namespace, records: list[AnalyticsRecord]) -> list[Row]:
    from collections import Counter

    from prometheus_client import CollectorRegistry
    from prometheus_client import Counter as PrometheusCounter

    groups = batches(records, args.batch_size)
    client = redis.Redis(host=args.redis_host, port=args.redis_port, db=args.redis_db)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    rows = []
    try:
        counter = PrometheusCounter(
            "iam_user_authorization_status",
            "authorization effect per user",
            ["code", "username"],
            registry=CollectorRegistry(),
        )

        def raw_counter() -> None:
            for record in records:
                counter.labels(status_code(record), record.username).inc()

        def raw_hincrby() -> None:
            for group in groups:
                counted = Counter(f"{status_code(r)}:{r.username}" for r in group)
                with client.pipeline(transaction=False) as pipe:
                    for name, count in counted.items():
                        pipe.hincrby(f"{prefix}:raw", name, count)
                    pipe.execute()

        rows.append(timed("prometheus", "raw Counter.inc (in-process)", len(records), raw_counter))
        rows.append(timed("prometheus", "raw redis HINCRBY (no guard)", len(records), raw_hincrby))
        redis_url = f"redis://{args.redis_host}:{args.redis_port}/{args.redis_db}"
        meta = {
            "listen_address": f"127.0.0.1:{free_port()}",
            "redis_url": redis_url,
            "key_prefix": prefix,
        }
        pump = resolve_pump_class("prometheus").create("prometheus", meta, timeout_s=PUMP_TIMEOUT_S)
        rows.append(timed_pump("prometheus", pump, groups))
        if not args.skip_e2e:
            # No redis_url: the counts go to the worker's redis: server (the benchmark's database).
            entry = {
                "type": "prometheus",
                "timeout": PUMP_TIMEOUT_S,
                "meta": {"listen_address": f"127.0.0.1:{free_port()}"},
            }
            keys = CounterKeys.for_pump("iam-pump", "prometheus")

            def counted() -> int:
                return sum(read_counts(client, keys).by_label.values())

            row = end_to_end(args, "prometheus", entry, records, counted)
            if row is not None:
                rows.append(row)
    finally:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()
    return rows


#: The tags of the InfluxDB runs (iam's example: who and what was decided); the rest are fields.
INFLUX_TAGS = ("effect", "username")


def influx_point(record: AnalyticsRecord) -> dict[str, Any]:
    """The pump's point for a record, as the ``influxdb`` client takes it (a dict)."""
    return {
        "measurement": "analytics",
        "time": record.timestamp * 1_000_000_000 + time_offset_ns(record.id),
        "tags": {"effect": record.effect, "username": record.username},
        "fields": {
            "id": record.id,
            "timestamp": record.timestamp,
            "conclusion": record.conclusion,
            "request": record.request,
            "policies": record.policies,
            "deciders": record.deciders,
            "expireAt": go_time_text(go_expiry(record)),
        },
    }


def bench_influx(args: argparse.Namespace, records: list[AnalyticsRecord]) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-influx-") as folder:
        process = None
        url = args.influx_url
        if not url:
            process, url = start_influxd(Path(folder))
        parts = urlsplit(url)
        client = InfluxDBClient(parts.hostname, parts.port or 8086, timeout=PUMP_TIMEOUT_S)
        name = f"bench_{uuid.uuid4().hex[:8]}"
        groups = batches(records, args.batch_size)
        databases = [f"{name}_raw", f"{name}_pump", f"{name}_e2e"]
        rows = []
        try:
            client.create_database(databases[0])
            points = [[influx_point(record) for record in group] for group in groups]

            def raw_write() -> None:
                for group in points:
                    client.write_points(group, time_precision="n", database=databases[0])

            rows.append(timed("influx", "raw write_points", len(records), raw_write))
            meta = {"database_name": databases[1], "address": url, "tags": list(INFLUX_TAGS)}
            pump = resolve_pump_class("influx").create("influx", meta, timeout_s=PUMP_TIMEOUT_S)
            rows.append(timed_pump("influx", pump, groups))
            for database in databases[:2]:
                counted = list(
                    client.query(
                        'SELECT count("id") FROM "analytics"', database=database
                    ).get_points()
                )
                if not counted or counted[0]["count"] != len(records):
                    print(f"  influx {database}: {counted} points", file=sys.stderr)
            if not args.skip_e2e:
                entry = {
                    "type": "influx",
                    "timeout": PUMP_TIMEOUT_S,
                    "meta": {**meta, "database_name": databases[2]},
                }

                def points_stored() -> int:
                    if databases[2] not in {d["name"] for d in client.get_list_database()}:
                        return 0
                    result = client.query(
                        'SELECT count("id") FROM "analytics"', database=databases[2]
                    )
                    counted = list(result.get_points())
                    return int(counted[0]["count"]) if counted else 0

                row = end_to_end(args, "influx", entry, records, points_stored)
                if row is not None:
                    rows.append(row)
        finally:
            for database in databases:
                client.drop_database(database)
            client.close()
            if process is not None:
                stop_influxd(process)
    return rows


def bench_kafka(args: argparse.Namespace, records: list[AnalyticsRecord]) -> list[Row]:
    from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

    from tests.servers_kafka import BROKER_VERSION, KafkaServer

    server: KafkaServer | None = None
    folder = tempfile.TemporaryDirectory(prefix="bench-kafka-")
    bootstrap, version = args.kafka_bootstrap, args.kafka_broker_version
    if not bootstrap:
        server = KafkaServer(Path(folder.name))
        server.start()
        bootstrap, version = server.bootstrap, BROKER_VERSION
    client = {"api.version.request": False, "broker.version.fallback": version} if version else {}
    name = f"bench-{uuid.uuid4().hex[:8]}"
    groups = batches(records, args.batch_size)
    rows = []
    try:
        meta = {"broker": [bootstrap], "topic": f"{name}-pump", "broker_version": version}
        pump = KafkaPump.create("kafka", meta, timeout_s=PUMP_TIMEOUT_S)
        # The raw producer gets the pump's own settings, the plainest way to the same messages.
        settings = {
            key: value
            for key, value in pump.producer_config().items()
            if key not in {"error_cb", "logger"}
        }
        documents = [[(r.id, json.loads(message_value(r, {}))) for r in g] for g in groups]
        producer = Producer(settings)
        producer.list_topics(f"{name}-raw", timeout=30)  # created before the clock starts

        def raw_produce() -> None:
            for group in documents:
                for key, document in group:
                    while True:
                        try:
                            producer.produce(f"{name}-raw", json.dumps(document), key)
                            break
                        except BufferError:
                            producer.poll(0.01)
                if producer.flush(PUMP_TIMEOUT_S):
                    raise RuntimeError("raw produce: not all messages acknowledged")

        rows.append(timed("kafka", "raw produce + flush", len(records), raw_produce))
        producer.close()
        rows.append(timed_pump("kafka", pump, groups))
        if not args.skip_e2e:
            e2e_topic = f"{name}-e2e"
            entry = {
                "type": "kafka",
                "timeout": PUMP_TIMEOUT_S,
                "meta": {**meta, "topic": e2e_topic},
            }
            # One client asks for the topic's size the whole run (a new one per poll costs CPU
            # the worker would use).
            counter = Consumer({"bootstrap.servers": bootstrap, **client, "group.id": name})

            def produced() -> int:
                try:
                    partitions = counter.list_topics(e2e_topic, timeout=5).topics[e2e_topic]
                    spans = [
                        counter.get_watermark_offsets(TopicPartition(e2e_topic, p), timeout=5)
                        for p in partitions.partitions
                    ]
                except KafkaException:
                    return 0
                return sum(high - low for low, high in spans)

            try:
                row = end_to_end(args, "kafka", entry, records, produced)
            finally:
                counter.close()
            if row is not None:
                rows.append(row)
    finally:
        if server is not None:
            server.stop()
        folder.cleanup()
    return rows


def _port(url: str, default: int) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port or default


def listening_pids(port: int) -> list[int]:
    """The processes listening on a local TCP port (``ss -ltnpH``)."""
    done = subprocess.run(
        ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=30
    )
    return sorted({int(pid) for pid in re.findall(r"pid=(\d+)", done.stdout)})


@contextlib.contextmanager
def pinned_servers(ports: list[int], cpus: str | None) -> Iterator[str]:
    """Pin every thread of the servers on ``ports`` to ``cpus`` (``taskset -a``) while the block
    runs, then give them back the CPUs they had; with ``cpus`` None, leave them alone."""
    if cpus is None:
        yield "unpinned"
        return
    previous: dict[int, set[int]] = {}
    try:
        for port in ports:
            for pid in listening_pids(port):
                previous[pid] = os.sched_getaffinity(pid)
                subprocess.run(
                    ["taskset", "-a", "-cp", cpus, str(pid)],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
        if not previous:
            print("  --pin: no server found listening on " + str(ports), file=sys.stderr)
        yield f"servers pinned to cpu {cpus}"
    finally:
        for pid, mask in previous.items():
            cpu_list = ",".join(str(c) for c in sorted(mask))
            subprocess.run(
                ["taskset", "-a", "-cp", cpu_list, str(pid)], capture_output=True, timeout=30
            )


def print_table(rows: list[Row]) -> None:
    baseline: dict[str, float] = {}
    width = max([16, *(len(row.store) for row in rows)])
    header = (
        f"{'store':<{width}} {'method':<36} {'records':>8} {'seconds':>8} {'records/s':>10} "
        f"{'vs raw':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        baseline.setdefault(row.store, row.rate)
        ratio = row.rate / baseline[row.store]
        print(
            f"{row.store:<{width}} {row.method:<36} {row.records:>8} {row.seconds:>8.2f} "
            f"{row.rate:>10.0f} {ratio:>6.2f}x"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE_RECORDS)
    parser.add_argument(
        "--stores", default="mongo,mongo-aggregate,elasticsearch,kafka,influx,syslog,prometheus"
    )
    parser.add_argument(
        "--mongo-uri", default=os.environ.get("MONGO_URI", "mongodb://127.0.0.1:27017")
    )
    parser.add_argument("--es-url", default=os.environ.get("ES_URL", "http://127.0.0.1:9200"))
    parser.add_argument(
        "--influx-url",
        default=os.environ.get("INFLUX_URL", ""),
        help="an InfluxDB 1.x to use; default: influxd started on free ports for the run",
    )
    parser.add_argument(
        "--kafka-bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP", ""),
        help="host:port of a Kafka broker (default: start a Kafka 0.9 broker for the run)",
    )
    parser.add_argument(
        "--kafka-broker-version",
        default=os.environ.get("KAFKA_BROKER_VERSION", ""),
        help="the broker's version when older than 0.10 (e.g. 0.9.0)",
    )
    parser.add_argument("--skip-e2e", action="store_true", help="no Celery end-to-end runs")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_WORKER_CONCURRENCY)
    parser.add_argument("--e2e-timeout", type=float, default=DEFAULT_E2E_TIMEOUT_S)
    parser.add_argument("--redis-host", default=os.environ.get("REDIS_HOST", "127.0.0.1"))
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("REDIS_PORT", "6379")))
    parser.add_argument("--redis-db", type=int, default=DEFAULT_REDIS_DB, help="flushed!")
    parser.add_argument(
        "--pin",
        choices=("none", "pinned", "both"),
        default="none",
        help="pin the MongoDB / Elasticsearch servers to --pin-cpu (taskset) for the whole run "
        "(raw and e2e alike); 'both' runs everything unpinned, then pinned",
    )
    parser.add_argument("--pin-cpu", default="1", help="the CPU list the servers are pinned to")
    args = parser.parse_args(argv)

    records = make_records(args.records, args.batch_size)
    benches = {
        "mongo": bench_mongo,
        "mongo-aggregate": bench_aggregate,
        "elasticsearch": bench_elasticsearch,
        "syslog": bench_syslog,
        "prometheus": bench_prometheus,
        "influx": bench_influx,
        "kafka": bench_kafka,
    }
    rows: list[Row] = []
    modes = {"none": [False], "pinned": [True], "both": [False, True]}[args.pin]
    ports = [_port(args.mongo_uri, 27017), _port(args.es_url, 9200)]
    for pinned in modes:
        with pinned_servers(ports, args.pin_cpu if pinned else None) as label:
            for store in args.stores.split(","):
                print(f"... {store} ({label})", file=sys.stderr)
                found = benches[store](args, records)
                if args.pin != "none":
                    for row in found:
                        row.store = f"{store} [{label}]"
                rows += found
    print(
        f"\n{args.records} records, batches of {args.batch_size}, "
        f"MongoDB {args.mongo_uri}, Elasticsearch {args.es_url}\n"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
