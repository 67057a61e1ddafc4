"""A link cut for a while under a steady reporter: what the endpoints said, what arrived.

:func:`run_cut` drives one :class:`~tests.network.harness.Deployment` through warm-up, the cut,
the mend and the drain, and returns a :class:`CutResult` for the test to judge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.network.harness import Deployment, Health, mongo_standin
from tests.support import wait_until

#: records/s the reporter host sends during the cut tests
RATE = 200
#: How often the health endpoint is asked during the cut.
OBSERVE_EVERY_S = 5.0


@dataclass
class Observation:
    """One look at the deployment: seconds since the cut, health, sink, reporter."""

    at_s: float
    health: Health
    stored: int
    reporter: dict[str, Any]

    def line(self) -> str:
        held = self.reporter.get("buffered", 0) + self.reporter.get("pending", 0)
        return (
            f"  t={self.at_s:5.1f}s health {self.health.status} "
            f"failing={self.health.failing} ({self.health.took_s:.1f}s) stored={self.stored} "
            f"reporter holds {held}, ship failures {self.reporter.get('ship_failures', 0)}"
        )


@dataclass
class CutResult:
    """What one cut showed."""

    link: str
    cut_s: float
    during: list[Observation] = field(default_factory=list)
    health_back_s: float | None = None
    delivered_s: float | None = None
    accepted: int = 0
    lost: int = 0
    duplicated: int = 0
    dead_letters: int = 0
    reporter: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def report(self) -> str:
        lines = [
            f"[cut {self.link} for {self.cut_s:.0f}s] accepted {self.accepted}, lost {self.lost}, "
            f"duplicated {self.duplicated}, dead letters {self.dead_letters}; health 200 again "
            f"{self.health_back_s}s after the mend, everything stored {self.delivered_s}s after "
            f"the mend; wall {self.wall_s:.0f}s",
            f"  reporter: {self.reporter}",
            f"  worker counters: {self.stats}",
        ]
        return "\n".join(lines + [o.line() for o in self.during])


def _observe(deployment: Deployment, since: float) -> Observation:
    health = deployment.health(timeout_s=30)
    return Observation(
        at_s=round(time.monotonic() - since, 1),
        health=health,
        stored=deployment.stored_count(),
        reporter=deployment.reporter_progress(),
    )


def run_cut(workdir: Path, link: str, *, cut_s: float) -> CutResult:
    """Build a deployment, cut ``link`` (wr, ws or rr) for ``cut_s`` seconds, measure."""
    started = time.monotonic()
    binary = mongo_standin()
    assert binary is not None
    deployment = Deployment(workdir, tag=f"cut-{link}")
    try:
        deployment.start_servers(binary)
        deployment.start_worker(deployment.worker_config())
        deployment.start_reporter(rate=RATE)
        assert wait_until(lambda: deployment.stored_count() > RATE, 60), "nothing arrives"
        result = CutResult(link=link, cut_s=cut_s)
        wire = deployment.net.links[link]
        wire.cut()
        cut_at = time.monotonic()
        mend_at = cut_at + cut_s
        while time.monotonic() < mend_at - 1:
            result.during.append(_observe(deployment, cut_at))
            time.sleep(max(0.0, min(OBSERVE_EVERY_S, mend_at - 1 - time.monotonic())))
        time.sleep(max(0.0, mend_at - time.monotonic()))
        wire.mend()
        mended_at = time.monotonic()
        if wait_until(lambda: deployment.health(timeout_s=15).status == 200, 120, 1.0):
            result.health_back_s = round(time.monotonic() - mended_at, 1)
        time.sleep(max(0.0, 5 - (time.monotonic() - mended_at)))
        result.reporter = deployment.stop_reporter()
        accepted = set(deployment.accepted())
        if wait_until(lambda: accepted <= set(deployment.stored()), 240, 1.0):
            result.delivered_s = round(time.monotonic() - mended_at, 1)
        stored = deployment.stored()
        result.accepted = len(accepted)
        result.lost = len(accepted - set(stored))
        result.duplicated = sum(count - 1 for count in stored.values())
        result.dead_letters = deployment.dead_letters()
        result.stats = deployment.stats()
        result.wall_s = time.monotonic() - started
        return result
    finally:
        deployment.close()
