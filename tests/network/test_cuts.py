"""Links between real processes on hosts of their own cut for 60 s each, all three at once:
worker <-> Redis, worker <-> sink, reporter <-> Redis. No accepted record is lost or stored
twice, nothing goes to the dead letters, the worker host's health endpoint says what is
unreachable while it is, and everything recovers once the link is back."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.network.scenarios import RATE, CutResult, run_cut

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.netfault,
    pytest.mark.timeout(900),
]

CUT_S = 60.0
#: A probe's answer comes within the health checks' deadline (5 s) and some slack.
ANSWER_WITHIN_S = 8.0
#: test name -> the link it cuts
LINKS = {
    "test_worker_redis_cut": "wr",
    "test_worker_sink_cut": "ws",
    "test_reporter_redis_cut": "rr",
}


@pytest.fixture(scope="module")
def cuts(
    netns: None, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[CutResult]]]:
    """The cuts of the selected tests, run concurrently, each on a deployment of its own."""
    selected = {item.name for item in request.session.items} & set(LINKS)
    with ThreadPoolExecutor(max_workers=len(LINKS)) as pool:
        futures = {
            LINKS[name]: pool.submit(
                run_cut, tmp_path_factory.mktemp(f"cut-{LINKS[name]}"), LINKS[name], cut_s=CUT_S
            )
            for name in sorted(selected)
        }
        yield futures


def _result(cuts: dict[str, Future[CutResult]], link: str) -> CutResult:
    result = cuts[link].result(timeout=900)
    print("\n" + result.report())
    assert result.lost == 0, "accepted records missing from the sink"
    assert result.duplicated == 0, "MongoDB upserts by record id: no duplicates expected"
    assert result.dead_letters == 0 and result.stats.get("lost_batches", 0) == 0
    assert result.reporter["lost_at_stop"] == 0 and result.reporter["dropped_buffer_full"] == 0
    assert result.health_back_s is not None, "the health endpoint never said 200 again"
    assert result.delivered_s is not None
    return result


def test_worker_redis_cut(cuts: dict[str, Future[CutResult]]) -> None:
    result = _result(cuts, "wr")
    assert result.during and all(o.health.status == 503 for o in result.during)
    assert all({"redis", "broker"} <= set(o.health.failing) for o in result.during)
    assert all(o.health.took_s < ANSWER_WITHIN_S for o in result.during)


def test_worker_sink_cut(cuts: dict[str, Future[CutResult]]) -> None:
    result = _result(cuts, "ws")
    assert result.during and all(o.health.status == 503 for o in result.during)
    assert all(o.health.failing == ["pump:mongo"] for o in result.during)
    assert all(o.health.took_s < ANSWER_WITHIN_S for o in result.during)
    assert result.stats.get("retries:mongo", 0) > 0


def test_reporter_redis_cut(cuts: dict[str, Future[CutResult]]) -> None:
    result = _result(cuts, "rr")
    # The worker is fine: its endpoint says so; the reporter holds the records meanwhile.
    assert all(o.health.status == 200 for o in result.during)
    held = [o.reporter.get("buffered", 0) + o.reporter.get("pending", 0) for o in result.during]
    assert max(held) >= RATE * CUT_S / 2, held
