"""The systemd units pass ``systemd-analyze verify``, in a root of the test's own where the
programs they start exist (as they do after the README's install into /opt/iam-pump)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from app.config import parse_settings
from tests.deploy.support import DEPLOY, SHARED_CONFIG, run, tool

UNITS = DEPLOY / "systemd"
#: The units as an operator enables them: the worker template once per queue group.
INSTANCES = [
    "iam-pump-worker@intake.service",
    "iam-pump-worker@pump-csv.service",
    "iam-pump-beat.service",
    "iam-pump-health.service",
]
PROGRAMS = ["/opt/iam-pump/bin/celery", "/opt/iam-pump/bin/iam-pump"]
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def make_root(root: Path, *, with_programs: bool) -> Path:
    """A file system root with the system's own units, ours and (if asked) our programs."""
    units_dir = root / "usr/lib/systemd"
    units_dir.mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, units_dir / "system", symlinks=True)
    ours = root / "etc/systemd/system"
    ours.mkdir(parents=True)
    for unit in UNITS.glob("*.service"):
        shutil.copy(unit, ours)
    if with_programs:
        for program in PROGRAMS:
            path = root / program.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("#!/bin/sh\n")
            path.chmod(0o755)
    return root


def verify(root: Path) -> tuple[int, str]:
    analyze = tool("systemd-analyze", "systemd")
    result = run([analyze, "verify", f"--root={root}", *INSTANCES])
    return result.returncode, result.stdout + result.stderr


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    code, output = verify(make_root(tmp_path / "root", with_programs=True))
    assert code == 0, output
    assert not re.search(r"iam-pump[-\w@]*\.service:", output), output


def test_verify_fails_when_the_programs_are_missing(tmp_path: Path) -> None:
    # The check is real: the same units without the installed programs are refused.
    code, output = verify(make_root(tmp_path / "root", with_programs=False))
    assert code != 0
    assert "/opt/iam-pump/bin/celery" in output


@pytest.mark.parametrize("env_file", sorted(UNITS.glob("worker-*.env")), ids=lambda p: p.name)
def test_every_queue_group_file_names_queues_a_worker_consumes(env_file: Path) -> None:
    values = dict(
        line.split("=", 1)
        for line in env_file.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(values) == {"QUEUES", "CONCURRENCY", "HEALTH_ADDRESS"}
    settings = parse_settings(SHARED_CONFIG.read_text())
    known = {"ingest", "purge"} | {f"pump.{name}" for name in settings.enabled_pumps}
    assert set(values["QUEUES"].split(",")) <= known


def test_worker_stop_timeout_is_the_shutdown_grace_period() -> None:
    settings = parse_settings(SHARED_CONFIG.read_text())
    unit = (UNITS / "iam-pump-worker@.service").read_text()
    assert f"TimeoutStopSec={settings.shutdown_grace_period_s:g}\n" in unit
