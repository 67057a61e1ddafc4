"""Our purge and a Go iam-pump draining the same list at once: each record read by exactly one.

The Go side is played by a drainer issuing the commands iam's pump issues: its redsync lock
(``SET iam-pump <random> NX PX 600000`` in database 0, compare-and-delete release) around
``MULTI; LRANGE list 0 -1; DEL list; EXEC``. Our side is ``tasks.purge.drain`` in a loop, its
batches read back from the envelopes it leaves on the broker (no worker consumes them).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import redis
from celery import Celery

from app.codec import encode_go_record
from app.config import IAM_LOCK_KEY, parse_settings
from app.worker_context import WorkerContext
from tasks.purge import drain
from tests.faults.helpers import make_records
from tests.support import RedisServer

pytestmark = [pytest.mark.integration]

LIST_KEY = "analytics-iam-system-analytics"
RECORDS = 40_000
PRODUCERS = 4
#: The list and our keys live here; iam's lock lives in database 0 whatever this is.
LIST_DB = 3

# Compare-and-delete, as redsync releases its mutex.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    own = RedisServer(tmp_path / "redis")
    yield own
    own.stop()


class GoDrainer(threading.Thread):
    """iam's pump loop without its sleep: lock, read-and-delete the whole list, unlock."""

    def __init__(self, server: RedisServer, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.lock_client = server.client(db=0)
        self.list_client = server.client(db=LIST_DB)
        self.stop = stop
        self.read: list[bytes] = []
        self.drains = 0

    def run(self) -> None:
        release = self.lock_client.register_script(_RELEASE)
        while not self.stop.is_set():
            token = uuid.uuid4().hex
            if not self.lock_client.set(IAM_LOCK_KEY, token, nx=True, px=600_000):
                time.sleep(0.001)
                continue
            try:
                pipe = self.list_client.pipeline(transaction=True)
                pipe.lrange(LIST_KEY, 0, -1)
                pipe.delete(LIST_KEY)
                items, _ = pipe.execute()
                self.read.extend(items)
                self.drains += 1
            finally:
                release(keys=[IAM_LOCK_KEY], args=[token])
            time.sleep(0.01)


def produce(server: RedisServer, tag: str, count: int) -> None:
    client = server.client(db=LIST_DB)
    encoded = [encode_go_record(r) for r in make_records(tag, count)]
    for start in range(0, count, 10):  # a steady trickle for about 3 s
        client.rpush(LIST_KEY, *encoded[start : start + 10])
        time.sleep(0.002)
    client.close()


def requests_in(items: list[bytes]) -> list[str]:
    return [str(msgpack.unpackb(item)["Request"]) for item in items]


def our_reads(client: redis.Redis) -> list[bytes]:
    items: list[bytes] = []
    for key in client.scan_iter("iam-pump:envelope:*"):
        envelope = msgpack.unpackb(client.get(key))
        items.extend(envelope["go"])
    return items


def test_purge_and_go_pump_each_record_read_once(tmp_path: Path, server: RedisServer) -> None:
    settings = parse_settings(
        f"redis: {{host: 127.0.0.1, port: {server.port}, database: {LIST_DB}}}\n"
        "delivery: {purge-chunk-size: 300}\n"
        f"pumps: {{csv: {{type: csv, meta: {{csv_dir: {tmp_path}}}}}}}\n"
    )
    celery = Celery("iam-lock-test", broker=settings.broker, set_as_current=False)
    celery.conf.update(task_serializer="msgpack", accept_content=["msgpack"])
    context = WorkerContext.build(settings, celery)
    stop = threading.Event()
    go = GoDrainer(server, stop)
    producers = [
        threading.Thread(target=produce, args=(server, f"p{n}", RECORDS // PRODUCERS))
        for n in range(PRODUCERS)
    ]
    started = time.monotonic()
    go.start()
    for producer in producers:
        producer.start()
    runs = Counter[str]()
    try:
        while any(p.is_alive() for p in producers) or context.redis.llen(LIST_KEY):
            runs[drain(context, budget_s=0.5)["status"]] += 1
    finally:
        stop.set()
        go.join(30)
        for producer in producers:
            producer.join(30)
        lock_left = server.client(db=0).exists(IAM_LOCK_KEY)
        ours = our_reads(context.redis)
        context.close()
        celery.close()

    expected = {f"p{n}-{i}" for n in range(PRODUCERS) for i in range(RECORDS // PRODUCERS)}
    read = Counter(requests_in(go.read) + requests_in(ours))
    lost = len(expected - read.keys())
    twice = sum(1 for n in read.values() if n > 1)
    print(
        f"\niam lock: {RECORDS} records, Go side read {len(go.read)} in {go.drains} drains, "
        f"our purge {len(ours)} in {dict(runs)} runs; lost {lost}, read twice {twice} "
        f"({time.monotonic() - started:.1f} s)"
    )
    assert lost == 0 and twice == 0
    assert read.keys() == expected
    assert go.read and ours, "both sides should have drained part of the list"
    assert not lock_left, "the iam-pump lock must be released"
