"""The Kubernetes manifests pass kubernetes-validate (PyPI; it ships the Kubernetes OpenAPI
schemas and validates offline, strict: unknown fields are errors), and say what the project's
settings say: probes, the grace period, one beat."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import parse_settings
from pumps.settings import parse_pump_settings
from tests.deploy.support import DEPLOY, SHARED_CONFIG, run, tool

MANIFESTS = DEPLOY / "kubernetes"


def documents() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def named(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents() if doc["kind"] == kind}


def workers() -> dict[str, dict[str, Any]]:
    return {name: doc for name, doc in named("Deployment").items() if "-worker-" in name}


def validate(*paths: Path) -> tuple[int, str]:
    validator = tool("kubernetes-validate", "PyPI kubernetes-validate, in the dev extra")
    result = run([validator, "--strict", *paths])
    return result.returncode, result.stdout + result.stderr


def test_manifests_pass_the_kubernetes_schema() -> None:
    paths = sorted(MANIFESTS.glob("*.yaml"))
    code, output = validate(*paths)
    assert code == 0, output
    assert output.count("passed for resource") == len(documents()), output


def test_the_validator_refuses_a_misspelt_field(tmp_path: Path) -> None:
    broken = tmp_path / "beat.yaml"
    text = (MANIFESTS / "beat.yaml").read_text()
    broken.write_text(text.replace("terminationGracePeriodSeconds", "terminationGracePeriod"))
    code, output = validate(broken)
    assert code != 0, output


def test_the_configmap_holds_the_shared_config_which_is_valid() -> None:
    config = named("ConfigMap")["iam-pump-config"]["data"]["iam-pump.yaml"]
    assert config == SHARED_CONFIG.read_text()
    settings = parse_pump_settings(config)
    assert settings.enabled_pumps


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


def test_one_worker_deployment_per_queue_group_covering_every_queue() -> None:
    settings = parse_settings(named("ConfigMap")["iam-pump-config"]["data"]["iam-pump.yaml"])
    known = {"ingest", "purge"} | {f"pump.{name}" for name in settings.enabled_pumps}
    consumed: list[str] = []
    for deployment in workers().values():
        args = container(deployment)["args"]
        consumed += args[args.index("-Q") + 1].split(",")
    assert sorted(consumed) == sorted(known)  # each queue in exactly one group


@pytest.mark.parametrize("name", sorted(workers()))
def test_worker_probes_and_grace_period(name: str) -> None:
    deployment = workers()[name]
    settings = parse_settings(named("ConfigMap")["iam-pump-config"]["data"]["iam-pump.yaml"])
    spec = deployment["spec"]["template"]["spec"]
    # The formula, written once in Settings.shutdown_grace_period_s: the soft shutdown capped by
    # the slowest task's hard time limit, plus the time to requeue the rest and exit.
    expected = min(settings.delivery.soft_shutdown_timeout_s, settings.longest_task_s) + 20
    assert spec["terminationGracePeriodSeconds"] == expected == settings.shutdown_grace_period_s
    worker = container(deployment)
    args = worker["args"]
    address = args[args.index("--health-address") + 1]
    port = int(address.rpartition(":")[2])
    ports = {entry["name"]: entry["containerPort"] for entry in worker["ports"]}
    assert worker["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert ports[worker[probe]["httpGet"]["port"]] == port, probe
    # /readyz may take its whole check deadline (5 s) before answering.
    assert worker["readinessProbe"]["timeoutSeconds"] > 5


def test_exactly_one_beat_replaced_by_recreate() -> None:
    beats = [doc for doc in named("Deployment").values() if "beat" in container(doc)["args"]]
    assert len(beats) == 1
    assert beats[0]["spec"]["replicas"] == 1
    assert beats[0]["spec"]["strategy"] == {"type": "Recreate"}


def test_secrets_come_from_the_secret_and_every_config_loads_with_that_environment() -> None:
    secret = named("Secret")["iam-pump-secrets"]["stringData"]
    config_text = named("ConfigMap")["iam-pump-config"]["data"]["iam-pump.yaml"]
    assert "password" not in config_text.split("delivery:")[0].split("redis:")[1]
    for name, deployment in named("Deployment").items():
        env: dict[str, str] = {}
        for entry in container(deployment)["env"]:
            if "value" in entry:
                env[entry["name"]] = entry["value"]
            elif "secretKeyRef" in entry["valueFrom"]:
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "iam-pump-secrets", name
                env[entry["name"]] = secret[ref["key"]]
        assert env["IAM_PUMP_CONFIG"] == "/etc/iam-pump/iam-pump.yaml", name
        assert "IAM_PUMP_REDIS_PASSWORD" in env, name
        saved = dict(os.environ)
        try:
            os.environ.update({k: v for k, v in env.items() if k.startswith("IAM_PUMP_")})
            del os.environ["IAM_PUMP_CONFIG"]
            settings = parse_pump_settings(config_text)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert settings.redis.password == secret["redis-password"], name
        assert settings.redis.host == "redis", name
