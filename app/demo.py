"""A demo producer: fake authorization decisions through both ways in, so files appear.

Half the records go through :class:`~app.analytics.Analytics` (``record_hit``), half are written
to iam's Redis list exactly as iam-authz-server writes them.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import redis

from app.analytics import Analytics, AnalyticsOptions
from app.codec import encode_go_record
from app.config import Settings
from app.record import AnalyticsRecord
from app.stores.clients import redis_client

logger = logging.getLogger(__name__)

DEFAULT_DEMO_RATE_PER_S = 200
_USERS = ("alice", "bob", "carol", "dave", "erin")
_RESOURCES = ("resources:articles:ladon-introduction", "resources:books:iam", "resources:tokens")
_ACTIONS = ("get", "delete", "update")


def fake_record(sequence: int) -> AnalyticsRecord:
    """One plausible record; ``sequence`` makes its request unique."""
    allowed = random.random() < 0.8
    request = {
        "resource": random.choice(_RESOURCES),
        "action": random.choice(_ACTIONS),
        "subject": "users:" + random.choice(_USERS),
        "context": {"remoteIP": "192.168.0.5", "demo_sequence": sequence},
    }
    return AnalyticsRecord(
        username=random.choice(_USERS),
        effect="allow" if allowed else "deny",
        conclusion="policies matched" if allowed else "no policy allowed the request",
        request=json.dumps(request),
        policies='[{"id":"demo-policy"}]',
        deciders='[{"id":"demo-policy"}]',
    )


class DemoProducer:
    """Produces ``rate_per_s`` records a second until stopped."""

    def __init__(self, settings: Settings, *, rate_per_s: int = DEFAULT_DEMO_RATE_PER_S) -> None:
        self.settings = settings
        self.rate_per_s = rate_per_s
        self.analytics = Analytics(AnalyticsOptions.from_settings(settings))
        self._redis = redis_client(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-producer", daemon=True)
        self.produced = 0

    def start(self) -> None:
        self.analytics.start()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            go_records = []
            for _ in range(self.rate_per_s):
                record = fake_record(self.produced)
                self.produced += 1
                if self.produced % 2:
                    self.analytics.record_hit(record)
                else:
                    record.expire_at = None
                    go_records.append(encode_go_record(record))
            try:
                if go_records:
                    self._redis.rpush(self.settings.analytics_key, *go_records)
            except redis.RedisError as exc:
                logger.warning("demo: Redis did not take %d records: %s", len(go_records), exc)
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.analytics.stop()
        self._redis.close()
