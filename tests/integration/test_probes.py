"""Probes as an orchestrator uses them, on real processes started as the README says: two workers
(``-Q ingest,purge`` and ``-Q pump.csv``), each with ``--health-address``, and one beat."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.faults.helpers import make_records, report, requests_in
from tests.support import (
    REPO,
    Proc,
    base_config,
    celery_env,
    free_port,
    run_cli,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The readiness probe period the README recommends; the pipeline must be ready again within it
#: once Redis is back.
PROBE_PERIOD_S = 10.0
#: What the README promises for a stopped pump worker.
NO_CONSUMER_WITHIN_S = 30.0


def probe(url: str) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError as error:
        return 0, {"error": str(error)}


class PersistentRedis:
    """A redis-server of this test's own that keeps its data across a stop and a start on the
    same port (append-only file, fsync always), as a production Redis does across a restart."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.directory), "--save", "", "--appendonly", "yes"]
        args += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(self.answers, 10, interval_s=0.05), "redis-server did not start"

    def answers(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


class LivenessWatch:
    """Polls ``/livez`` of each address twice a second from a thread; keeps every non-200 with
    its time (time.monotonic())."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.failures: list[tuple[str, int, dict[str, Any], float]] = []
        self.phase = "start"
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for address in self.addresses:
                status, body = probe(f"http://{address}/livez")
                self.polls += 1
                if status != 200:
                    body = {**body, "phase": self.phase}
                    self.failures.append((address, status, body, time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def start_beat_serving(config: Path, tmp_path: Path, address: str) -> Proc:
    """``celery -A app beat --health-address ADDRESS``, as the README starts it."""
    args = [sys.executable, "-m", "celery", "-A", "app", "beat", "-l", "info"]
    args += ["-s", str(tmp_path / "beat-schedule"), "--health-address", address]
    proc = Proc(args, env=celery_env(config), log=tmp_path / "beat.log", cwd=REPO)
    proc.wait_for_output("beat: Starting", timeout_s=60)
    return proc


def ready(address: str) -> bool:
    return probe(f"http://{address}/readyz")[0] == 200


def test_livez_holds_through_a_redis_outage_and_readyz_names_what_is_missing(
    tmp_path: Path, procs: list[Proc]
) -> None:
    server = PersistentRedis(tmp_path / "redis")
    try:
        _run_scenario(tmp_path, procs, server)
    finally:
        for proc in reversed(procs):
            proc.stop(timeout_s=15)
        procs.clear()
        server.stop()


def _run_scenario(tmp_path: Path, procs: list[Proc], server: PersistentRedis) -> None:
    config = write_config(tmp_path / "c.yaml", base_config(tmp_path, redis_port=server.port, db=0))
    intake_address, csv_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    procs.append(
        start_worker(
            config,
            tmp_path / "intake.log",
            queues="ingest,purge",
            name="intake",
            extra_args=["--health-address", intake_address],
        )
    )
    csv_worker = start_worker(
        config,
        tmp_path / "csv.log",
        queues="pump.csv",
        name="csv",
        extra_args=["--health-address", csv_address],
    )
    procs.append(csv_worker)
    beat_address = f"127.0.0.1:{free_port()}"
    procs.append(start_beat_serving(config, tmp_path, beat_address))
    addresses = [intake_address, csv_address, beat_address]
    assert wait_until(lambda: all(ready(a) for a in addresses), 30), [
        probe(f"http://{a}/readyz") for a in addresses
    ]
    watch = LivenessWatch(addresses)
    stopped = float("inf")
    try:
        before = make_records("before", 300)
        report(before, config)

        watch.phase = "outage"
        server.stop()
        outage_began = time.monotonic()

        def redis_named(address: str) -> bool:
            status, body = probe(f"http://{address}/readyz")
            return status == 503 and "redis" in body.get("failing", [])

        assert wait_until(lambda: all(redis_named(a) for a in addresses), PROBE_PERIOD_S), [
            probe(f"http://{a}/readyz") for a in addresses
        ]
        body = probe(f"http://{intake_address}/readyz")[1]
        assert body["checks"]["redis"].startswith("Redis did not answer"), body
        # Records keep coming while Redis is down: the reporter holds and retries them.
        during = make_records("during", 300)
        producer = threading.Thread(target=report, args=(during, config), daemon=True)
        producer.start()
        time.sleep(max(0.0, 8 - (time.monotonic() - outage_began)))

        server.start()
        watch.phase = "back"
        back = time.monotonic()
        assert wait_until(lambda: all(ready(a) for a in addresses), PROBE_PERIOD_S), [
            probe(f"http://{a}/readyz") for a in addresses
        ]
        ready_after_s = time.monotonic() - back
        print(f"\nready again {ready_after_s:.1f}s after Redis came back")
        producer.join(120)
        assert not producer.is_alive(), "the reporter did not ship its records"

        expected = {record.request for record in before + during}
        assert wait_until(lambda: expected <= set(requests_in(tmp_path / "csv")), 120), (
            f"lost: {len(expected - set(requests_in(tmp_path / 'csv')))}"
        )

        watch.phase = "csv worker stopped"
        # The only pump.csv worker stops: readiness and status name the queue.
        stopped = time.monotonic()
        csv_worker.stop(timeout_s=30)

        def pump_queue_named(address: str) -> bool:
            status, body = probe(f"http://{address}/readyz")
            return status == 503 and "pump.csv" in body["checks"].get("queues", "")

        still_up = [intake_address, beat_address]
        assert wait_until(
            lambda: all(pump_queue_named(a) for a in still_up), NO_CONSUMER_WITHIN_S
        ), [probe(f"http://{a}/readyz") for a in still_up]
        print(f"pump.csv named without a consumer {time.monotonic() - stopped:.1f}s after stop")
        status_run = run_cli("status", "--json", "--config", str(config))
        assert status_run.returncode == 1, status_run.stderr
        reported = json.loads(status_run.stdout)
        assert reported["consumers"]["pump.csv"] == 0 and reported["consumers"]["ingest"] == 1
        assert reported["checks"]["queues"] == "no live consumer on pump.csv"
        text = run_cli("status", "--config", str(config)).stdout
        assert "pump.csv                 0  <- no consumer" in text, text
        with urllib.request.urlopen(f"http://{intake_address}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'iam_pump_queue_consumers{queue="pump.csv"} 0.0' in metrics
        assert 'iam_pump_queue_consumers{queue="ingest"} 1.0' in metrics
        assert 'iam_pump_write_duration_seconds_count{pump="csv"}' in metrics
    finally:
        watch.stop()
    assert watch.polls > 20
    # The intake's and beat's /livez never failed; the csv worker's did not until it was stopped.
    for address in (intake_address, beat_address):
        assert [f for f in watch.failures if f[0] == address] == [], (address, watch.failures)
    until_stopped = [f for f in watch.failures if f[0] == csv_address and f[3] < stopped]
    assert until_stopped == [], until_stopped


def test_a_worker_with_store_pumps_is_ready_when_the_stores_are_up(
    tmp_path: Path, procs: list[Proc], redis_db: redis.Redis, mongo_uri: str, es_url: str
) -> None:
    """The worker's health endpoint opens MongoDB and Elasticsearch pumps to check them: ready,
    never "not open"."""
    from tests.stores import mongo_url_for

    database = f"probes_{uuid.uuid4().hex[:8]}"
    config = write_config(
        tmp_path / "c.yaml",
        base_config(
            tmp_path,
            pumps={
                "mongo": {"type": "mongo", "meta": {"mongo_url": mongo_url_for(database)}},
                "es": {
                    "type": "elasticsearch",
                    "meta": {"elasticsearch_url": es_url, "index_name": database},
                },
            },
        ),
    )
    address = f"127.0.0.1:{free_port()}"
    procs.append(start_worker(config, tmp_path / "w.log", extra_args=["--health-address", address]))
    assert wait_until(lambda: ready(address), 30), probe(f"http://{address}/readyz")
    status, body = probe(f"http://{address}/readyz")
    assert status == 200
    assert body["checks"] == {
        "redis": "ok",
        "broker": "ok",
        "pump:mongo": "ok",
        "pump:es": "ok",
        "queues": "ok",
    }
    assert body["consumers"] == {"ingest": 1, "purge": 1, "pump.mongo": 1, "pump.es": 1}
    assert probe(f"http://{address}/livez") == (200, {"status": "ok"})
