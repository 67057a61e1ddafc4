"""``iam-pump health-server``, as the systemd unit, the compose file and the Kubernetes manifests
start it: the endpoint alone, shown the fleet's counters, stopped cleanly by SIGTERM."""

from __future__ import annotations

import signal
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.flower import get
from tests.support import REPO, Proc, base_config, celery_env, wait_until, write_config

pytestmark = pytest.mark.integration


def test_health_server_serves_health_and_the_fleet_metrics_then_stops_on_sigterm(
    tmp_path: Path, redis_db: redis.Redis, procs: list[Proc]
) -> None:
    config_values = base_config(tmp_path)
    config = write_config(tmp_path / "c.yaml", config_values)
    redis_db.rpush("analytics-iam-system-analytics", b"x", b"y", b"z")  # three records waiting
    server = Proc(
        [sys.executable, "-m", "app.cli", "health-server"],
        env=celery_env(config),
        log=tmp_path / "health.log",
        cwd=REPO,
    )
    procs.append(server)
    base = f"http://{config_values['health-check-address']}"

    def alive() -> bool:
        try:
            return get(f"{base}/livez")[0] == 200
        except OSError:  # not listening yet
            return False

    assert wait_until(alive, 30), server.output()
    # No worker consumes any queue: the pipeline is not ready, and the answer says why.
    status, body = get(f"{base}/readyz")
    assert status == 503 and "pump.csv" in body and "ingest" in body, body
    status, metrics = get(f"{base}/metrics")
    assert status == 200
    assert "iam_pump_redis_up 1.0" in metrics
    assert "iam_pump_redis_list_length 3.0" in metrics
    # No worker and no beat: only the endpoint runs (nothing consumed the list).
    assert redis_db.llen("analytics-iam-system-analytics") == 3
    server.send(signal.SIGTERM)
    assert server.popen.wait(15) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/healthz", timeout=2)
