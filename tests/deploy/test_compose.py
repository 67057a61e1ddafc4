"""The compose file passes ``docker compose config`` (Compose's own schema and interpolation
check; no daemon needed), and the Containerfile builds what the other files expect."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from typing import Any

import pytest
import yaml

from app.config import parse_settings
from tests.conftest import require
from tests.deploy.support import DEPLOY, SHARED_CONFIG
from tests.support import REPO

COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
CONTAINERFILE = DEPLOY / "Containerfile"
SECRETS = {"REDIS_PASSWORD": "s3cret", "FLOWER_BASIC_AUTH": "ops:correct-horse"}


def compose_command() -> list[str]:
    """``docker compose`` (the CLI plugin) where it works, else Debian's ``docker-compose``."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    require(
        legacy is not None,
        "docker compose (no docker CLI with the compose plugin, and no docker-compose: "
        "scripts/test-servers.sh install)",
    )
    assert legacy is not None
    return [legacy]


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    result = compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_compose_config_accepts_the_file_with_its_services(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == {
        "redis",
        "worker-intake",
        "worker-pump-csv",
        "beat",
        "health",
        "flower",
    }
    assert services["worker-intake"]["environment"]["IAM_PUMP_REDIS_PASSWORD"] == "s3cret"
    for name, service in services.items():
        assert "deploy" not in service or service["deploy"].get("replicas", 1) == 1, name


def test_compose_config_refuses_a_start_without_the_secrets() -> None:
    result = compose_config({"FLOWER_BASIC_AUTH": "ops:pw"})
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr


def test_workers_queues_and_grace_period(resolved: dict[str, Any]) -> None:
    settings = parse_settings(SHARED_CONFIG.read_text())
    known = {"ingest", "purge"} | {f"pump.{name}" for name in settings.enabled_pumps}
    consumed: set[str] = set()
    for name in ("worker-intake", "worker-pump-csv"):
        service = resolved["services"][name]
        command = service["command"]
        queues = set(command[command.index("-Q") + 1].split(","))
        assert queues <= known
        consumed |= queues
        assert command[command.index("--health-address") + 1] == "0.0.0.0:7071"
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace is not None
        assert int(grace.group(1)) == settings.shutdown_grace_period_s
    assert consumed == known  # every queue has a worker group


def test_containerfile_copies_what_exists_and_installs_the_package() -> None:
    text = CONTAINERFILE.read_text()
    sources = [
        source
        for line in text.splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    ]
    for source in sources:
        assert (REPO / source).exists(), source
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    modules = project["tool"]["setuptools"]["py-modules"]
    for needed in [name.rstrip("*") for name in packages] + [f"{m}.py" for m in modules]:
        assert needed in sources, f"{needed} is not copied into the image"
    # The paths the systemd units and the manifests use.
    assert "/opt/iam-pump/bin/pip install" in text
    assert "IAM_PUMP_CONFIG=/etc/iam-pump/iam-pump.yaml" in text
