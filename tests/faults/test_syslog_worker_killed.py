"""End to end into a real rsyslogd over TCP, with the pump's worker SIGKILLed mid-run.

Records go through the reporter, a real ingest worker and a real pump worker into the ``syslog``
pump; the pump worker's whole process group is killed while it holds tasks, a replacement starts,
and every record must be in rsyslog's file. Copies are allowed (the README says the syslog pump
is at-least-once over TCP): a batch the killed worker had sent, or half sent, is sent again whole,
with the same record ids.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest
import redis

from tests.faults.conftest import fault_config
from tests.faults.helpers import make_records, report, start_sweeping_beat, with_quick_sweep
from tests.servers_syslog import Rsyslog, new_tag
from tests.support import Proc, start_worker, wait_until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECORDS = 20_000
#: A killed worker's tasks come back after the visibility timeout (at most 2 min by default).
REDELIVERY_PROMISE_S = 120


def ids_by_request(server: Rsyslog, tag: str) -> dict[str, set[str]]:
    """Each request rsyslog wrote, with the record ids it came with; and the cut lines."""
    seen: dict[str, set[str]] = defaultdict(set)
    for line in server.lines(tag):
        record = line.record()
        if record is not None:
            seen[str(record["request"])].add(str(record["id"]))
    return seen


def copies_written(server: Rsyslog, tag: str) -> int:
    return sum(1 for line in server.lines(tag) if line.record() is not None)


def lines_in(server: Rsyslog, tag: str) -> int:
    """Lines in the tag's file, cheaply (read while the workers write)."""
    path = server.out / f"{tag}.log"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_pump_worker_killed_mid_run_loses_nothing(
    tmp_path: Path, broker: str, faults_db: redis.Redis, procs: list[Proc], rsyslog: Rsyslog
) -> None:
    tag = new_tag()
    pump = {
        "type": "syslog",
        "meta": {
            "transport": "tcp",
            "network_addr": f"127.0.0.1:{rsyslog.tcp_port}",
            "log_level": 134,
            "tag": tag,
        },
    }
    config = write_config(
        tmp_path / "c.yaml",
        with_quick_sweep(
            fault_config(
                tmp_path,
                broker,
                pumps={"syslog": pump},
                analytics={"records-buffer-size": 100, "pool-size": 4},
            )
        ),
    )
    start_sweeping_beat(config, tmp_path, procs)
    records = make_records("syslog", RECORDS)
    report(records, config)  # 200 batches of 100 wait in the broker
    ingest = start_worker(config, tmp_path / "ingest.log", queues="ingest,purge", name="ingest")
    procs.append(ingest)
    victim = start_worker(config, tmp_path / "pump.log", queues="pump.syslog", name="pump")
    procs.append(victim)
    assert wait_until(lambda: lines_in(rsyslog, tag) >= 1000, 60, interval_s=0.02)
    if not broker:
        assert wait_until(lambda: faults_db.hlen("unacked") > 0, 30, interval_s=0.01)
    victim.kill_group(signal.SIGKILL)
    victim.popen.wait(10)
    written_before = lines_in(rsyslog, tag)
    if not broker:
        held = faults_db.hlen("unacked")
        print(f"\n{held} task(s) held by the killed pump worker")
        assert held > 0, "the killed worker held no task: no fault injected"
    assert written_before < RECORDS, "everything was written before the kill: no fault injected"
    replacement = start_worker(config, tmp_path / "pump2.log", queues="pump.syslog", name="pump2")
    procs.append(replacement)

    expected = {record.request for record in records}
    started = time.monotonic()
    wait_until(
        lambda: expected <= set(ids_by_request(rsyslog, tag)),
        REDELIVERY_PROMISE_S + 30,
        interval_s=0.5,
    )
    elapsed = time.monotonic() - started
    rsyslog.settle(tag)
    seen = ids_by_request(rsyslog, tag)
    lost = len(expected - set(seen))
    copies = copies_written(rsyslog, tag)
    cut = len(rsyslog.lines(tag)) - copies - 1  # less settle()'s marker
    print(
        f"\n[syslog tcp, pump worker SIGKILL ({'amqp' if broker else 'redis'})] records: "
        f"{RECORDS}, written before the kill: {written_before}, lost: {lost}, "
        f"duplicated: {copies - len(seen)}, cut lines: {cut}, all there {elapsed:.1f}s after "
        "the replacement started"
    )
    assert lost == 0
    assert set(seen) == expected
    # A redelivered record keeps its id: one id per request, however often it was written.
    assert all(len(ids) == 1 for ids in seen.values())
    assert len({next(iter(ids)) for ids in seen.values()}) == RECORDS
    assert elapsed < REDELIVERY_PROMISE_S
