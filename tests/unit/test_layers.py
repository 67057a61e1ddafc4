"""The floors of the code, seen from outside: what importing the reporter costs a host process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support import REPO

# Runs in a fresh interpreter: imports the reporter the way a web application does, reads a
# config that names store pumps, makes and starts and stops a reporter, then tells what the
# process holds.
_PROBE = """
import json, sys
from app.analytics import Analytics, AnalyticsOptions, AnalyticsRecord
options = AnalyticsOptions.from_yaml(sys.argv[1])
reporter = Analytics(options)
reporter.start()
reporter.stop(timeout_s=1)
from celery import _state
from kombu.transport import redis as kombu_redis
apps = [a.main for a in list(_state._apps)]
print(json.dumps({
    "current_app": getattr(_state._tls, "current_app", None) is not None,
    "default_app": _state.default_app is not None,
    "apps": apps,
    "kombu_patched": getattr(kombu_redis.QoS.restore_unacked_once, "guarded_by_iam_pump", False),
    "modules": sorted(
        name for name in sys.modules
        if name.split(".")[0] in ("tasks", "pymongo", "elasticsearch", "bson", "influxdb", "pumps")
        or name in ("app.celery_app", "app.worker_context", "celeryconfig")
    ),
}))
"""


def test_importing_the_reporter_makes_no_worker_app_and_loads_no_sink_driver(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "pumps": {
                    "m": {"type": "mongo", "meta": {"mongo_url": "mongodb://127.0.0.1:1/x"}},
                    "e": {
                        "type": "elasticsearch",
                        "meta": {"elasticsearch_url": "http://127.0.0.1:1"},
                    },
                    "i": {
                        "type": "influx",
                        "meta": {"database_name": "x", "address": "http://127.0.0.1:1"},
                    },
                }
            }
        )
    )
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["modules"] == [], "the reporter imported worker or sink modules"
    assert not seen["current_app"] and not seen["default_app"], "a Celery app was made current"
    assert "iam_pump" not in seen["apps"], "the worker's Celery app was made"
    assert not seen["kombu_patched"], "kombu was patched"


def test_celery_finds_the_worker_app_as_app_dot_app() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "import app; print(app.app.main, app.celery is app.app)"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["iam_pump", "True"]


def test_import_linter_contracts_hold() -> None:
    linter = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run(
        [str(linter), "--no-cache"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout
