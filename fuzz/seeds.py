"""Write the hand-made part of the seed corpus: ``python -m fuzz.seeds``.

Real-looking valid inputs for each harness, in ``fuzz/corpus/<target>/seed-*``; the inputs the
fuzzer found (``found-*``: ones that crashed a decoder before it was fixed, and the corpus of a
five-minute run) sit beside them and are kept as they are.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from pathlib import Path

import msgpack

from app.codec import encode_clean_batch, encode_envelope, encode_go_envelope, encode_go_record
from app.codec import record_to_row as row
from app.config import default_config_text
from app.record import AnalyticsRecord

CORPUS = Path(__file__).with_name("corpus")

RECORDS = [
    AnalyticsRecord(
        1_700_000_000,
        "alice",
        "allow",
        "ok",
        '{"resource":"resources:articles:ladon-introduction","action":"delete"}',
        '[{"id":1,"effect":"allow"}]',
        '[{"id":1,"decider":"allow"}]',
        datetime(2030, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC),
    ),
    AnalyticsRecord(1_700_000_001, "bob", "deny", "no policy matched", "{}", "[]", "[]"),
    AnalyticsRecord(0, "", "", "", "", "", "", datetime(1, 1, 1, tzinfo=UTC)),
]


def go_bytes_with_nil_expiry() -> bytes:
    """A Go record whose ExpireAt is nil, as some iam versions send an unset time."""
    fields = {"TimeStamp": 1_700_000_002, "Username": "carol", "Effect": "allow"}
    fields |= {"Conclusion": "ok", "Request": "{}", "Policies": "[]", "Deciders": "[]"}
    return bytes(msgpack.packb({**fields, "ExpireAt": None}))


def go_bytes_timestamp96() -> bytes:
    """A Go record ending in the zero time as Go's msgpack writes it: ext 8, length 12, type -1."""
    record = encode_go_record(RECORDS[2])
    zero_time = b"\xc7\x0c\xff" + struct.pack(">Iq", 0, -62135596800)
    assert record.endswith(zero_time)
    return record


CONFIG_ALL_KEYS = """\
#! REDIS_HOST=10.0.0.7
#! REDIS_PASSWORD=s3cret
#! EXPIRY=1h30m
purge-delay: 10
health-check-path: healthz
health-check-address: 0.0.0.0:7070
omit-detailed-recording: true
analytics-key: analytics-iam-system-analytics
key-prefix: iam-pump
broker-url: ${BROKER_URL}
redis:
  host: ${REDIS_HOST:-127.0.0.1}:6380
  port: ${REDIS_PORT}
  password: ${REDIS_PASSWORD}
  database: 1
  optimisation-max-idle: 100
  enable-cluster: false
  use-ssl: false
pumps:
  csv:
    type: csv
    filters:
      usernames: [alice]
      skip-usernames: [bob]
    timeout: 5
    max-retries: 3
    meta:
      csv_dir: ./analytics-data
  mongo:
    type: mongo
    enabled: false
    meta:
      mongo_url: mongodb://user:pw@127.0.0.1:27017/iam_analytics
      collection_name: iam_analytics
  es:
    type: elasticsearch
    meta:
      index_name: iam_analytics
      elasticsearch_url: http://127.0.0.1:9200
log:
  level: debug
  format: json
  name: pump
delivery:
  retry-backoff-base-s: 0.5
  purge-chunk-size: 500
  visibility-timeout-s: 120
analytics:
  enable: true
  pool-size: 50
  flush-interval: 200
  storage-expiration-time: ${EXPIRY:-24h0m0s}
  transport: redis-list
"""

CONFIG_BROKER = """\
#! BROKER=amqp://guest:guest@127.0.0.1:5672//
broker-url: ${BROKER}
redis:
  addrs: ["127.0.0.1:6379"]
pumps:
  out: {type: stdout}
  agg: {type: mongo-aggregate, meta: {mongo_url: "mongodb://127.0.0.1/x"}}
"""

CONFIG_DEAD_LETTERS_TLS = """\
#! CA=/etc/ssl/certs/ca-certificates.crt
dead-letters: {request: redact, policies: drop}
redis:
  host: redis.internal
  use-ssl: true
  ssl-ca-file: ${CA}
  username: iam-pump
  password: ${REDIS_PASSWORD:-changeme}
pumps:
  mongo:
    type: mongo
    dead-letters: {request: keep}
    meta: {mongo_url: "mongodb://127.0.0.1:27017/iam"}
"""

CONFIG_ANCHORS = """\
pumps:
  a: &defaults {type: csv, timeout: 5, max-retries: 2, meta: {csv_dir: /tmp/a}}
  b: {<<: *defaults, type: memory, meta: {}}
"""

CONFIG_YAML_TRAPS = """\
#! WHEN=2001-02-30
#! LOOP=&l [*l]
when: ${WHEN}
date: 2001-02-30
loop: ${LOOP}
self: &s [*s]
a0: &a0 [x, x, x, x, x, x, x, x]
a1: &a1 [*a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0]
a2: [*a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1]
"""

SEEDS: dict[str, dict[str, bytes]] = {
    "go_record": {
        "seed-full": encode_go_record(RECORDS[0]),
        "seed-nil-expiry": go_bytes_with_nil_expiry(),
        "seed-timestamp96": go_bytes_timestamp96(),
        "seed-bad-utf8": encode_go_record(RECORDS[1]).replace(b"bob", b"b\xffb"),
    },
    "envelope": {
        "seed-reporter": encode_envelope("7f3c0a", [row(record) for record in RECORDS]),
        "seed-go": encode_go_envelope(
            "purge-1", [encode_go_record(record) for record in RECORDS] + [b"\xc1"]
        ),
        "seed-reporter-bad-utf8": encode_envelope("b2", [row(RECORDS[1])]).replace(
            b"bob", b"b\xffb"
        ),
        "seed-empty": encode_envelope("empty", []),
    },
    "clean_batch": {
        "seed-clean": encode_clean_batch(
            "7f3c0a", [[index, *row(record)] for index, record in enumerate(RECORDS)]
        ),
        "seed-clean-gap": encode_clean_batch("b9", [[4, *row(RECORDS[1])]]),
    },
    "dead_letter_raw": {
        # First byte: the treatments (request: byte % 3, policies: byte >> 2 % 3; keep, redact,
        # drop); then a record that failed to decode.
        "seed-go-drop-redact": b"\x05" + encode_go_record(RECORDS[0]),
        "seed-row-redact-keep": b"\x01" + bytes(msgpack.packb(row(RECORDS[0]))),
        "seed-go-bad-utf8": b"\x0a" + encode_go_record(RECORDS[0]).replace(b"alice", b"al\xffce"),
    },
    "config": {
        "seed-default": default_config_text().encode(),
        "seed-all-keys": CONFIG_ALL_KEYS.encode(),
        "seed-broker": CONFIG_BROKER.encode(),
        "seed-anchors": CONFIG_ANCHORS.encode(),
        "seed-dead-letters-tls": CONFIG_DEAD_LETTERS_TLS.encode(),
        "seed-yaml-traps": CONFIG_YAML_TRAPS.encode(),
    },
}


def main() -> None:
    """Write every seed file (overwriting the hand-made ones only)."""
    for target, seeds in SEEDS.items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (directory / name).write_bytes(data)


if __name__ == "__main__":
    main()
