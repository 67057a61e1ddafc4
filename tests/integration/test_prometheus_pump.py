"""The prometheus pump scraped by a real Prometheus server (Debian's 2.42): what Prometheus's
HTTP API answers equals what was sent, per (code, username), after a redelivered batch, a
restart, a second process taking the endpoint over, folding of usernames past the limit, and
end to end through real Celery workers with one SIGKILLed mid-run.
"""

from __future__ import annotations

import dataclasses
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.record import AnalyticsRecord
from pumps.base import WriteResult
from pumps.deadline import Deadline
from pumps.prometheus import OTHER_USERNAME, PrometheusPump, status_code
from pumps.testing.records import copies
from tests.faults.helpers import report
from tests.servers_prometheus import PrometheusServer
from tests.support import (
    Proc,
    base_config,
    celery_env,
    free_port,
    redis_url,
    start_beat,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

METRIC = "iam_user_authorization_status_total"
FOLDED_METRIC = "iam_user_authorization_status_folded_records_total"
#: Prometheus scrapes every second; on a loaded machine a new value may take a few scrapes.
SCRAPED_WITHIN_S = 30
EFFECTS = ("allow", "deny", "", "Allow")


def make_records(tag: str, count: int, *, users: int = 7) -> list[AnalyticsRecord]:
    """A batch whose usernames repeat and whose effects mix allowed and not."""
    batch = uuid.uuid4().hex
    return [
        AnalyticsRecord(
            timestamp=1_795_500_000 + index,
            username=f"{tag}-user-{index % users}",
            effect=EFFECTS[index % len(EFFECTS)],
            request=f'{{"n": {index}}}',
            id=f"{batch}-{index}",
        )
        for index in range(count)
    ]


def by_label(records: list[AnalyticsRecord]) -> dict[tuple[str, str], float]:
    """What the counter should say per (code, username) for these records."""
    counted = Counter((status_code(record), record.username) for record in records)
    return {label: float(count) for label, count in counted.items()}


def scraped(prometheus: PrometheusServer, tag: str) -> dict[tuple[str, str], float]:
    # (?s): a username may hold a newline, which "." matches only with that flag.
    return prometheus.values(f'{METRIC}{{username=~"(?s){tag}-.*"}}', "code", "username")


def assert_scraped(
    prometheus: PrometheusServer, tag: str, expected: dict[tuple[str, str], float]
) -> None:
    seen: dict[tuple[str, str], float] = {}

    def equal() -> bool:
        nonlocal seen
        seen = scraped(prometheus, tag)
        return seen == expected

    assert wait_until(equal, SCRAPED_WITHIN_S, interval_s=0.5), (
        f"Prometheus has {seen}, expected {expected}; target {prometheus.target_health()}"
    )


def soon() -> Deadline:
    return Deadline.after(10)


@pytest.fixture
def key_prefix(redis_db: redis.Redis) -> Iterator[str]:
    # Under our own prefix, the only keys the least-privilege user may touch.
    prefix = f"iam-pump:prom-{uuid.uuid4().hex[:12]}"
    yield prefix
    for key in redis_db.scan_iter(f"{prefix}:*"):
        redis_db.delete(key)


@pytest.fixture
def make_pump(prometheus_server: PrometheusServer, key_prefix: str) -> Iterator[Any]:
    """Pumps serving the address Prometheus scrapes, all closed at the end."""
    made: list[PrometheusPump] = []

    def make(**meta: Any) -> PrometheusPump:
        raw = {
            "listen_address": prometheus_server.target_address,
            "redis_url": redis_url(),
            "key_prefix": key_prefix,
            "bind_retry_interval_s": 0.5,
            **meta,
        }
        pump = PrometheusPump.create("prom", raw, timeout_s=10)
        pump.open()
        made.append(pump)
        return pump

    yield make
    for pump in made:
        pump.close()


def test_scraped_counts_equal_what_was_sent(
    prometheus_server: PrometheusServer, make_pump: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    pump = make_pump()
    assert pump.serving
    first, second = make_records(tag, 500), make_records(tag, 333, users=11)
    assert pump.write(first, deadline=soon()) == WriteResult()
    assert pump.write(second, deadline=soon()) == WriteResult()
    expected = by_label(first + second)
    assert {code for code, _ in expected} == {"0", "1"}
    assert_scraped(prometheus_server, tag, expected)

    url = f"http://{prometheus_server.target_address}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert f"# HELP {METRIC} authorization effect per user" in text
    assert f"# TYPE {METRIC} counter" in text
    pump.check()


def test_usernames_that_need_escaping_reach_prometheus_as_they_are(
    prometheus_server: PrometheusServer, make_pump: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    records = [
        dataclasses.replace(record, username=f"{tag}-{name}")
        for record, name in zip(
            make_records(tag, 4), ['quote"d', "back\\slash", "new\nline", "zoë"], strict=True
        )
    ]
    make_pump().write(records, deadline=soon())
    assert_scraped(prometheus_server, tag, by_label(records))


def test_a_scrape_while_redis_is_away_fails_rather_than_showing_wrong_counts(
    make_pump: Any,
) -> None:
    pump = make_pump(
        listen_address=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{pump.meta.listen_address}/metrics", timeout=10)
    caught.value.close()
    assert caught.value.code == 503
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{pump.meta.listen_address}/other", timeout=10)
    caught.value.close()
    assert caught.value.code == 404


def test_redelivered_batch_and_restart_change_nothing(
    prometheus_server: PrometheusServer, make_pump: Any
) -> None:
    """A batch written again adds nothing; a new process starts from the fleet's totals, so
    Prometheus sees one counter that never went back (no reset)."""
    tag = uuid.uuid4().hex[:8]
    batch = make_records(tag, 400)
    pump = make_pump()
    pump.write(batch, deadline=soon())
    pump.write(copies(batch), deadline=soon())
    pump.write(list(reversed(copies(batch))), deadline=soon())  # order does not matter
    assert_scraped(prometheus_server, tag, by_label(batch))

    pump.close()  # the process goes away...
    assert wait_until(lambda: prometheus_server.target_health() == "down", SCRAPED_WITHIN_S)
    restarted = make_pump()  # ...and a new one starts
    later = make_records(tag, 250)
    restarted.write(later, deadline=soon())
    restarted.write(copies(batch), deadline=soon())  # redelivered across the restart
    assert_scraped(prometheus_server, tag, by_label(batch + later))
    resets = prometheus_server.values(f'resets({METRIC}{{username=~"{tag}-.*"}}[10m])', "username")
    assert resets and set(resets.values()) == {0.0}


def test_usernames_past_the_limit_fold_into_other(
    prometheus_server: PrometheusServer, make_pump: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    pump = make_pump(max_usernames=3)
    records = make_records(tag, 60, users=6)  # users 0-2 come first in sorted order
    pump.write(records, deadline=soon())
    kept = {f"{tag}-user-{index}" for index in range(3)}
    own = by_label([record for record in records if record.username in kept])
    folded = [record for record in records if record.username not in kept]
    other = {(code,): float(n) for code, n in Counter(map(status_code, folded)).items()}

    assert_scraped(prometheus_server, tag, own)
    assert prometheus_server.values(f'{METRIC}{{username="{OTHER_USERNAME}"}}', "code") == other
    assert wait_until(
        lambda: prometheus_server.values(FOLDED_METRIC) == {(): float(len(folded))},
        SCRAPED_WITHIN_S,
    )
    # A username that has its label keeps it; a new one still folds.
    again = make_records(tag, 4, users=4)  # users 0-3: three kept, user-3 folds again
    pump.write(again, deadline=soon())
    assert_scraped(
        prometheus_server, tag, by_label([r for r in records + again if r.username in kept])
    )
    assert wait_until(
        lambda: prometheus_server.values(FOLDED_METRIC) == {(): float(len(folded) + 1)},
        SCRAPED_WITHIN_S,
    )


def test_another_process_takes_the_endpoint_over(
    prometheus_server: PrometheusServer, make_pump: Any
) -> None:
    """Two hosts of the pump on one address: one serves, the other waits; when the first goes,
    the second serves the totals of both."""
    tag = uuid.uuid4().hex[:8]
    first = make_pump()
    second = make_pump()
    assert first.serving and not second.serving
    second.check()  # the endpoint is served, by another
    one, two = make_records(tag, 100), make_records(tag, 70)
    first.write(one, deadline=soon())
    second.write(two, deadline=soon())
    assert_scraped(prometheus_server, tag, by_label(one + two))
    first.close()
    assert wait_until(lambda: second.serving, 10)
    three = make_records(tag, 30)
    second.write(three, deadline=soon())
    assert_scraped(prometheus_server, tag, by_label(one + two + three))


@pytest.mark.slow
def test_end_to_end_with_a_worker_killed_mid_run(
    tmp_path: Path,
    redis_db: redis.Redis,
    procs: list[Proc],
    prometheus_server: PrometheusServer,
) -> None:
    """Records through the reporter, ingest and two prefork children into the pump; the whole
    worker is SIGKILLed while it holds tasks and a replacement finishes. Prometheus ends with
    exactly the records sent: none lost, none counted twice."""
    tag = uuid.uuid4().hex[:8]
    pumps = {
        "prom": {
            "type": "prometheus",
            "timeout": 5,
            # No redis_url: the counts go to the configuration's redis: server.
            "meta": {
                "listen_address": prometheus_server.target_address,
                "bind_retry_interval_s": 1,
            },
        }
    }
    config = base_config(
        tmp_path,
        pumps=pumps,
        analytics={"records-buffer-size": 200, "pool-size": 4},
        delivery={
            "retry-backoff-base-s": 0.2,
            "retry-backoff-max-s": 2,
            "visibility-timeout-s": 15,
            # A task a killed worker took with it is sent again by the ledger sweep.
            "redelivery-window-s": 15,
            "sweep-interval-s": 5,
        },
    )
    config_path = write_config(tmp_path / "c.yaml", config)
    procs.append(start_beat(config_path, tmp_path / "beat.log", tmp_path))
    records = [
        AnalyticsRecord(
            username=f"{tag}-user-{index % 9}",
            effect=EFFECTS[index % len(EFFECTS)],
            request=f"{tag}-{index}",
        )
        for index in range(20_000)
    ]
    expected = by_label(records)
    report(records, config_path)
    env = celery_env(config_path)
    worker = start_worker(config_path, tmp_path / "w1.log", env=env)
    procs.append(worker)
    assert wait_until(lambda: scraped(prometheus_server, tag), SCRAPED_WITHIN_S, interval_s=0.2)
    assert wait_until(lambda: redis_db.hlen("unacked") > 0, 30, interval_s=0.01)
    worker.kill_group(signal.SIGKILL)
    worker.popen.wait(10)
    held = redis_db.hlen("unacked")
    at_kill = sum(scraped(prometheus_server, tag).values())
    print(f"\n{held} task(s) held by the killed worker; {at_kill:.0f} of {len(records)} scraped")
    assert held > 0, "the killed worker held no task: no fault injected"
    replacement = start_worker(config_path, tmp_path / "w2.log", name="w2", env=env)
    procs.append(replacement)
    assert_delivered = wait_until(
        lambda: sum(scraped(prometheus_server, tag).values()) >= len(records), 120, interval_s=1
    )
    assert assert_delivered, (
        f"{sum(scraped(prometheus_server, tag).values())} of {len(records)}; "
        f"{replacement.output()[-3000:]}"
    )
    time.sleep(3)  # anything counted twice would show now
    assert_scraped(prometheus_server, tag, expected)
    again = replacement.output().count("was counted already")
    print(f"{again} batch(es) written again and not counted again")
    assert not redis_db.keys("*dead-letters*")
