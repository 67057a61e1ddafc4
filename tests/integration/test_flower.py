"""Flower with this project, proven: its HTTP API lists our workers, their queues and the
ingest and write tasks they ran; its page, opened in a headless Chromium, lists the workers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
from app.messages import INGEST_TASK, WRITE_TASK
from tests.conftest import require
from tests.flower import browser, browser_available, get_json, start_flower
from tests.support import (
    Proc,
    base_config,
    free_port,
    read_csv_rows,
    start_worker,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CREDENTIALS = "pump-ops:correct-horse-7"


@dataclass
class Fleet:
    config: Path
    csv_dir: Path
    base: str  # Flower's URL


@pytest.fixture
def fleet(tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]) -> Iterator[Fleet]:
    """Two worker groups as the README's "Deploying" section runs them, and Flower."""
    config = write_config(tmp_path / "c.yaml", base_config(tmp_path))
    procs.append(
        start_worker(config, tmp_path / "intake.log", queues="ingest,purge", name="intake")
    )
    procs.append(start_worker(config, tmp_path / "csv.log", queues="pump.csv", name="pumpcsv"))
    port = free_port()
    procs.append(start_flower(config, tmp_path / "flower.log", port=port, credentials=CREDENTIALS))
    yield Fleet(config=config, csv_dir=tmp_path / "csv", base=f"http://127.0.0.1:{port}")


def report(config: Path, tag: str, count: int) -> None:
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    analytics.start()
    for index in range(count):
        record = AnalyticsRecord(username=f"user-{index}", effect="allow", request=f"{tag}-{index}")
        while not analytics.record_hit(record):
            time.sleep(0.001)
    analytics.stop()


def workers_by_group(workers: dict[str, Any] | None) -> dict[str, set[str]]:
    """{worker name prefix: names of the queues it consumes} from /api/workers."""
    found: dict[str, set[str]] = {}
    for name, info in (workers or {}).items():
        queues = {queue["name"] for queue in info.get("active_queues") or []}
        found[name.split("@", 1)[0]] = queues
    return found


def test_flower_api_lists_the_workers_their_queues_and_the_tasks(fleet: Fleet) -> None:
    seen: dict[str, set[str]] = {}

    def both_workers_with_their_queues() -> bool:
        seen.update(workers_by_group(get_json(f"{fleet.base}/api/workers?refresh=1", CREDENTIALS)))
        return seen.get("intake") == {"ingest", "purge"} and seen.get("pumpcsv") == {"pump.csv"}

    assert wait_until(both_workers_with_their_queues, 60, interval_s=1), seen

    # Task events reach Flower only once it has switched them on in the workers: records
    # shipped before that are delivered but not shown, so ship until both kinds appear.
    tasks: dict[str, Any] = {}
    shipped = 0

    def ingest_and_write_tasks_succeeded() -> bool:
        nonlocal shipped
        report(fleet.config, f"flower{shipped}", 20)
        shipped += 20
        tasks.update(get_json(f"{fleet.base}/api/tasks", CREDENTIALS) or {})
        done = {(task["name"], task["state"]) for task in tasks.values()}
        return {(INGEST_TASK, "SUCCESS"), (WRITE_TASK, "SUCCESS")} <= done

    assert wait_until(ingest_and_write_tasks_succeeded, 90, interval_s=1), tasks
    by_name: dict[str, list[dict[str, Any]]] = {}
    for task in tasks.values():
        by_name.setdefault(task["name"], []).append(task)
    assert {task["worker"].split("@")[0] for task in by_name[INGEST_TASK]} == {"intake"}
    writes = [task for task in by_name[WRITE_TASK] if task["state"] == "SUCCESS"]
    assert {task["worker"].split("@")[0] for task in writes} == {"pumpcsv"}
    assert all("csv" in task["args"] for task in writes)  # write("csv", batch)
    assert wait_until(lambda: len(read_csv_rows(fleet.csv_dir)) == shipped, 60)
    print(f"\nflower: {len(tasks)} tasks seen, {shipped} records shipped and written")


def test_flower_page_in_chromium_lists_the_workers(fleet: Fleet) -> None:
    require(browser_available(), "chromium and chromium-driver (Debian)")
    driver = browser(CREDENTIALS)
    try:
        page: list[str] = [""]

        def lists_both_workers() -> bool:
            driver.get(f"{fleet.base}/workers")
            time.sleep(1)  # the table fills in from the page's own API call
            page[0] = driver.find_element("tag name", "body").text
            return "intake@" in page[0] and "pumpcsv@" in page[0]

        assert wait_until(lists_both_workers, 60, interval_s=1), page[0][-2000:]
        assert "Online" in page[0]
    finally:
        driver.quit()
