"""A real Prometheus server (Debian's ``prometheus``, 2.42) for the prometheus pump's tests.

One per test session, on free ports, its storage in a temporary folder, stopped by PID at the
end. It scrapes one target every second: ``target_address``, where the tests' pumps listen.
Absent binary: the tests skip locally and fail in CI (:func:`tests.conftest.require`).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import IN_CI, free_port, wait_until

PROMETHEUS_BINARY = "prometheus"
SCRAPE_INTERVAL_S = 1
PROMETHEUS_START_TIMEOUT_S = 60
#: The scrape path the tests' pumps serve.
METRICS_PATH = "/metrics"
JOB_NAME = "iam-pump"


@dataclass(frozen=True)
class PrometheusServer:
    """A running Prometheus: where to query it and the one address it scrapes."""

    url: str
    target_address: str
    log: Path

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (``/api/v1/query``)."""
        params = urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, expression: str, *labels: str) -> dict[tuple[str, ...], float]:
        """An instant query's samples keyed by the values of ``labels``."""
        return {
            tuple(sample["metric"].get(label, "") for label in labels): float(sample["value"][1])
            for sample in self.query(expression)
        }

    def target_health(self) -> str:
        """``up``, ``down`` or ``unknown``: the last scrape of the pumps' address."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as reply:
            targets = json.load(reply)["data"]["activeTargets"]
        return str(targets[0]["health"]) if targets else "unknown"


def _config(target: str) -> str:
    return (
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
        f"  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB_NAME}\n"
        f"    metrics_path: {METRICS_PATH}\n"
        "    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def prometheus_server() -> Iterator[PrometheusServer]:
    """Debian's Prometheus scraping ``target_address`` every second."""
    binary = shutil.which(PROMETHEUS_BINARY)
    if binary is None:
        message = "Prometheus (Debian package prometheus) is not installed"
        if IN_CI:
            pytest.fail(f"{message}, and CI must run every test")
        pytest.skip(message)
    folder = Path(tempfile.mkdtemp(prefix="iam-pump-prometheus-"))
    target = f"127.0.0.1:{free_port()}"
    config = folder / "prometheus.yml"
    config.write_text(_config(target), encoding="utf-8")
    url = f"http://127.0.0.1:{free_port()}"
    log = folder / "prometheus.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
                "--storage.tsdb.retention.time=1d",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = wait_until(
            lambda: _ready(url) or process.poll() is not None,
            PROMETHEUS_START_TIMEOUT_S,
            interval_s=0.2,
        )
        if not started:
            raise AssertionError(
                f"Prometheus not ready in {PROMETHEUS_START_TIMEOUT_S} s:\n"
                f"{log.read_text()[-3000:]}"
            )
        if process.poll() is not None:
            raise AssertionError(f"Prometheus exited:\n{log.read_text()[-3000:]}")
        yield PrometheusServer(url=url, target_address=target, log=log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
