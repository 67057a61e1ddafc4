"""The small WSGI application wsgi_overhead.py drives: an authorization-like JSON answer.

    BENCH_ANALYTICS=1 gunicorn -b 127.0.0.1:8000 wsgi_app:application   (PYTHONPATH=bench)

With ``BENCH_ANALYTICS=1`` each request builds one analytics record and calls ``record_hit``, as
iam-authz-server does per authorization; the reporter is created on the first request, in the
worker process (after gunicorn's fork), and ships to ``BENCH_BROKER_URL`` (Redis database 12).
With ``BENCH_ANALYTICS=0`` the handler is the same without the record.
``BENCH_SWITCH_INTERVAL_S`` sets ``sys.setswitchinterval`` in both, and
``BENCH_REPORTER_TRANSPORT`` (``memory``, ``pack`` or ``thread``) swaps the transport, and
``BENCH_FLUSH_INTERVAL_MS`` sets ``flush-interval`` (what-ifs).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from app.codec import encode_envelope
from app.transports import CeleryTransport, MemoryTransport, Transport

ENABLED = os.environ.get("BENCH_ANALYTICS", "1") == "1"
# What-if knob of wsgi_overhead.py --switch-interval: how long a thread that wants the GIL
# waits before the holder is asked to drop it (CPython's default is 5 ms).
if os.environ.get("BENCH_SWITCH_INTERVAL_S"):
    sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL_S"]))
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")
POLICIES = (
    '[{"id":"p1","description":"One policy to rule them all.","subjects":["users:<peter|ken>"],'
    '"effect":"allow","resources":["resources:articles:<.*>"],"actions":["<create|delete>"]}]'
)
DECIDERS = '[{"id":"p1","effect":"allow","reason":"matched subject, resource and action"}]'

_record_hit: list[Callable[[AnalyticsRecord], bool]] = []


class PackOnlyTransport:
    """What-if transport: packs the envelope like CeleryTransport and sends nothing."""

    def ship(self, batch_id: str, rows: Sequence[Sequence[Any]]) -> None:
        encode_envelope(batch_id, rows)

    def close(self) -> None:
        pass


def _transport(options: AnalyticsOptions) -> Transport | None:
    # What-if knob of wsgi_overhead.py --what-if-transport: "memory" keeps the rows (no broker),
    # "pack" packs them and drops them (no broker), "thread" publishes from the reporter's own
    # threads in this process (a transport passed in is used in-process); unset: the default,
    # a helper process publishes.
    kind = os.environ.get("BENCH_REPORTER_TRANSPORT", "")
    if kind == "memory":
        return MemoryTransport()
    if kind == "pack":
        return PackOnlyTransport()
    if kind == "thread":
        return CeleryTransport(options.broker_url, key_prefix=options.key_prefix)
    return None


def _reporter() -> Callable[[AnalyticsRecord], bool]:
    if not _record_hit:
        options = AnalyticsOptions(broker_url=BROKER_URL, redis_url=BROKER_URL)
        if os.environ.get("BENCH_FLUSH_INTERVAL_MS"):
            options = dataclasses.replace(
                options, flush_interval_ms=int(os.environ["BENCH_FLUSH_INTERVAL_MS"])
            )
        analytics = Analytics(options, transport=_transport(options))
        analytics.start()
        atexit.register(analytics.stop, timeout_s=5.0)
        _record_hit.append(analytics.record_hit)
    return _record_hit[0]


def answer(path: str, query: str) -> bytes:
    """The JSON answer to one authorization request; records it when analytics is on."""
    subject = query or "users:peter"
    request = json.dumps(
        {"resource": f"resources:articles{path}", "action": "delete", "subject": subject}
    )
    body = json.dumps({"allowed": True, "request": request}).encode()
    if ENABLED:
        _reporter()(
            AnalyticsRecord(
                timestamp=int(time.time()),
                username=subject,
                effect="allow",
                conclusion="policies p1 allow access",
                request=request,
                policies=POLICIES,
                deciders=DECIDERS,
            )
        )
    return body


def application(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    """Answer an authorization request; record it when analytics is on."""
    body = answer(environ.get("PATH_INFO", "/"), environ.get("QUERY_STRING", ""))
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]
