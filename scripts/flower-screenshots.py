#!/usr/bin/env python3
"""Regenerate the README's pictures of Flower (docs/flower-*.png).

Starts a Redis server of its own on a free port, three worker groups (``-Q ingest,purge``,
``-Q pump.csv`` and ``-Q pump.archive``), Flower, then stops the archive worker, so its queue
fills while a reporter ships records; then Debian's headless Chromium takes the workers
dashboard, the Broker tab with the pump queues, and the tasks list. Everything it started is
stopped at the end.

    python scripts/flower-screenshots.py [--out docs]      # or: make flower-screenshots
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord  # noqa: E402
from tests.flower import browser, get_json, start_flower  # noqa: E402
from tests.support import (  # noqa: E402
    Proc,
    base_config,
    free_port,
    start_worker,
    wait_until,
    write_config,
)

CREDENTIALS = "flower:screenshots"


def ship(config: Path, tag: str, count: int) -> None:
    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    analytics.start()
    for index in range(count):
        record = AnalyticsRecord(
            username=f"user-{index % 5}",
            effect="allow" if index % 4 else "deny",
            request=f"{tag}-{index}",
        )
        while not analytics.record_hit(record):
            time.sleep(0.001)
    analytics.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder of the PNGs")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("needs redis-server", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="flower-shots-") as folder:
        tmp = Path(folder)
        redis_port = free_port()
        redis_server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            config = write_config(
                tmp / "iam-pump.yaml",
                base_config(tmp, redis_port=redis_port, db=0)
                | {
                    "pumps": {
                        "csv": {"type": "csv", "meta": {"csv_dir": str(tmp / "csv")}},
                        "archive": {"type": "csv", "meta": {"csv_dir": str(tmp / "archive")}},
                    },
                },
            )
            procs.append(
                start_worker(config, tmp / "intake.log", queues="ingest,purge", name="intake")
            )
            procs.append(start_worker(config, tmp / "csv.log", queues="pump.csv", name="pump-csv"))
            archive = start_worker(
                config, tmp / "archive.log", queues="pump.archive", name="pump-archive"
            )
            procs.append(archive)
            port = free_port()
            procs.append(
                start_flower(config, tmp / "flower.log", port=port, credentials=CREDENTIALS)
            )
            base = f"http://127.0.0.1:{port}"
            if not wait_until(
                lambda: len(get_json(f"{base}/api/workers?refresh=1", CREDENTIALS) or {}) == 3,
                60,
                interval_s=1,
            ):
                print("Flower did not list the three workers", file=sys.stderr)
                return 1
            # The archive pump's only worker stops: Flower still knows its queue, which now
            # fills (what the IamPumpQueueWithoutConsumer alert is for).
            archive.stop(timeout_s=30)
            for round_ in range(12):
                ship(config, f"shot{round_}", 250)
                time.sleep(0.5)
            driver = browser(CREDENTIALS, width=1400, height=800)
            try:
                for page, name in (
                    ("workers", "dashboard"),
                    ("broker", "broker"),
                    ("tasks", "tasks"),
                ):
                    driver.get(f"{base}/{page}")
                    time.sleep(3)  # the tables fill in from the page's own API calls
                    target = args.out / f"flower-{name}.png"
                    driver.save_screenshot(str(target))
                    print(f"wrote {target}")
            finally:
                driver.quit()
        finally:
            for proc in reversed(procs):
                proc.stop(timeout_s=15)
            redis_server.terminate()
            redis_server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
