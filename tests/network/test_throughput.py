"""Throughput across slow, lossy links: the worker's links to Redis and to the sink delay every
frame 5 ms and lose 1% of them (both ways), against the same deployment on plain links. The
reporter host sends a fixed number of records flat out; the rate is records over the time until
the last one is in the sink. Nothing may be lost either way."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.network.harness import Deployment, mongo_standin
from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.netfault]

RECORDS = 30_000
DELAY_MS = 5.0
LOSS = 0.01
#: The worker's links
SHAPED = ("wr", "ws")


def _run(deployment: Deployment, tag: str) -> float:
    """Send RECORDS flat out; returns records/s until the last is stored."""
    before = deployment.stored_count()
    deployment.start_reporter(rate=0, limit=RECORDS, tag=tag)
    started = time.monotonic()  # the reporter's interpreter is up and about to send
    assert wait_until(lambda: deployment.stored_count() >= before + RECORDS, 240, 0.1), tag
    elapsed = time.monotonic() - started
    final = deployment.reporter_final()
    assert final["shipped_records"] == RECORDS and final["lost_at_stop"] == 0, final
    return RECORDS / elapsed


def test_throughput_with_delay_and_loss_on_the_worker_links(netns: None, tmp_path: Path) -> None:
    binary = mongo_standin()
    assert binary is not None
    deployment = Deployment(tmp_path, tag="tp")
    try:
        deployment.start_servers(binary)
        deployment.start_worker(deployment.worker_config())
        plain = _run(deployment, "plain")
        for link in SHAPED:
            deployment.net.shape(link, delay_ms=0, loss=0, log=tmp_path / f"wire-{link}.log")
        forwarded = _run(deployment, "forwarded")
        for link in SHAPED:
            deployment.net.shape(
                link, delay_ms=DELAY_MS, loss=LOSS, log=tmp_path / f"wire-{link}.log"
            )
        shaped = _run(deployment, "shaped")
        accepted = set(deployment.accepted())
        stored = deployment.stored()
        lost = len(accepted - set(stored))
        duplicated = sum(count - 1 for count in stored.values())
        dead = deployment.dead_letters()
        stats = deployment.stats()
    finally:
        deployment.close()
    print(
        f"\n[throughput, {RECORDS} records a run, worker -c 2, MongoDB stand-in] plain links "
        f"{plain:,.0f}/s; userspace wire, no delay {forwarded:,.0f}/s; "
        f"{DELAY_MS:.0f} ms delay + {LOSS:.0%} loss each way {shaped:,.0f}/s "
        f"({shaped / plain:.2f}x plain, {shaped / forwarded:.2f}x the wire without delay); "
        f"lost {lost}, duplicated {duplicated}, dead letters {dead}; {stats}"
    )
    assert len(accepted) == 3 * RECORDS
    assert lost == 0 and duplicated == 0 and dead == 0
