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

RECORDS = 20_000
ROUNDS = 2
MODES = ("plain", "wire", "shaped")
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


def _carry(deployment: Deployment, mode: str, log: Path) -> None:
    # "plain": the kernel bridges the worker's links; "wire": the userspace wire, no delay;
    # "shaped": the wire with DELAY_MS and LOSS.
    for link in SHAPED:
        if mode == "plain":
            deployment.net.bridge(link)
        else:
            delay_ms, loss = (DELAY_MS, LOSS) if mode == "shaped" else (0.0, 0.0)
            deployment.net.shape(link, delay_ms=delay_ms, loss=loss, log=log)


def test_throughput_with_delay_and_loss_on_the_worker_links(netns: None, tmp_path: Path) -> None:
    binary = mongo_standin()
    assert binary is not None
    deployment = Deployment(tmp_path, tag="tp")
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    rtt_ms: dict[str, float] = {}
    try:
        deployment.start_servers(binary)
        deployment.start_worker(deployment.worker_config())
        for round_ in range(ROUNDS):
            for mode in MODES:  # interleaved, so the machine's drift hits every mode alike
                _carry(deployment, mode, tmp_path / "wire.log")
                rtt_ms.setdefault(mode, deployment.redis_rtt_ms())
                rates[mode].append(_run(deployment, f"{mode}{round_}"))
        accepted = set(deployment.accepted())
        stored = deployment.stored()
        lost = len(accepted - set(stored))
        duplicated = sum(count - 1 for count in stored.values())
        dead = deployment.dead_letters()
    finally:
        deployment.close()
    mean = {mode: sum(values) / len(values) for mode, values in rates.items()}
    runs = "; ".join(
        f"{mode} " + " / ".join(f"{rate:,.0f}" for rate in values) for mode, values in rates.items()
    )
    print(
        f"\n[throughput, {RECORDS} records a run, worker -c 2, MongoDB stand-in] records/s: "
        f"{runs} (plain links; userspace wire without delay; {DELAY_MS:.0f} ms delay + "
        f"{LOSS:.0%} loss each way on the worker's links); shaped/plain "
        f"{mean['shaped'] / mean['plain']:.2f}x, shaped/wire {mean['shaped'] / mean['wire']:.2f}x; "
        f"lost {lost}, duplicated {duplicated}, dead letters {dead}; Redis PING from the "
        f"worker: " + ", ".join(f"{mode} {ms:.2f} ms" for mode, ms in rtt_ms.items())
    )
    assert rtt_ms["shaped"] >= 2 * DELAY_MS, "the wire did not delay"
    assert len(accepted) == ROUNDS * len(MODES) * RECORDS
    assert lost == 0 and duplicated == 0 and dead == 0
