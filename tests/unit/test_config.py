from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.config import (
    ConfigError,
    masked,
    parse_duration_s,
    parse_settings,
    warn_ignored_keys,
)
from pumps.settings import load_pump_settings, parse_pump_settings
from tests.support import REPO, run_cli

IAM_PUMP_YAML = """
purge-delay: 10
health-check-path: healthz
health-check-address: 0.0.0.0:7070
omit-detailed-recording: true
redis:
  host: ${REDIS_HOST}
  port: ${REDIS_PORT}
  password: ${REDIS_PASSWORD}
  database: 0
  optimisation-max-idle: 100
  optimisation-max-active: 0
  enable-cluster: false
pumps:
  csv:
    type: csv
    filters:
      usernames: [alice]
      skip-usernames: [bob]
    timeout: 5
    omit-detailed-recording: false
    meta:
      csv_dir: ./analytics-data
log:
    name: pump
    development: true
    level: debug
    format: console
    enable-color: true
    disable-caller: false
    disable-stacktrace: false
    output-paths: ${IAM_LOG_DIR}/iam-pump.log,stdout
    error-output-paths: ${IAM_LOG_DIR}/iam-pump.error.log
analytics:
    enable: true
    pool-size: 50
    records-buffer-size: 1000
    flush-interval: 200
    enable-detailed-recording: true
    storage-expiration-time: 24h0m0s
"""


def problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_pump_settings(text)
    return dict(caught.value.problems)


def test_iams_own_file_loads_with_unset_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "IAM_LOG_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = parse_pump_settings(IAM_PUMP_YAML)
    assert settings.redis.address == ("127.0.0.1", 6379)
    assert settings.purge_delay == 10
    assert settings.omit_detailed_recording is True
    csv = settings.pumps["csv"]
    assert csv.filters.usernames == ("alice",) and csv.filters.skip_usernames == ("bob",)
    assert csv.timeout_s == 5 and csv.hard_time_limit_s > 5
    assert settings.analytics.pool_size == 50
    assert settings.analytics.storage_expiration_time == 86400
    assert settings.analytics.record_expiration_time == 0
    assert "analytics.storage-expiration-time" in settings.ignored_keys()
    assert settings.broker == "redis://127.0.0.1:6379/0"


def test_variables_expand_with_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "redis.internal")
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    monkeypatch.delenv("REDIS_PORT", raising=False)
    settings = parse_pump_settings(
        "redis: {host: '${REDIS_HOST}', port: '${REDIS_PORT:-6380}',"
        " password: '${REDIS_PASSWORD}'}\n"
        "pumps: {c: {type: csv, meta: {csv_dir: '${DATA:-/data}/csv'}}}\n"
    )
    assert settings.redis.address == ("redis.internal", 6380)
    assert settings.redis.url == "redis://:s3cret@redis.internal:6380/0"
    assert settings.pumps["c"].meta == {"csv_dir": "/data/csv"}
    shown = masked(settings)
    assert shown["redis"]["password"] == "***"
    assert "s3cret" not in str(shown)


def test_host_with_port_and_broker_url_override() -> None:
    settings = parse_pump_settings(
        "redis: {host: '10.0.0.5:6390'}\nbroker-url: amqp://guest:pw@127.0.0.1:5672//\n"
    )
    assert settings.redis.address == ("10.0.0.5", 6390)
    assert settings.broker == "amqp://guest:pw@127.0.0.1:5672//"
    assert masked(settings)["broker-url"] == "amqp://guest:***@127.0.0.1:5672//"


def test_every_problem_is_reported_with_its_key_path() -> None:
    found = problems(
        "purge-delay: soon\n"
        "redis: {prot: 1}\n"
        "analytics: {flush-interval: -5, storage-expiration-time: forever,"
        " record-expiration-time: -1}\n"
        "pumps:\n"
        "  a: {type: cvs}\n"
        "  b: {type: csv, meta: {}}\n"
        "  c: {type: csv, timeout: x, meta: {csv_dir: d, extra: 1}}\n"
        "  d: {meta: {}}\n"
    )
    assert "purge-delay" in found and "'soon'" in found["purge-delay"]
    assert found["redis.prot"] == "unknown key"
    assert "analytics.flush-interval" in found
    assert "analytics.storage-expiration-time" in found
    assert "analytics.record-expiration-time" in found
    assert "did you mean 'csv'" in found["pumps.a.type"]
    assert "pumps.b.meta.csv_dir" in found
    assert "pumps.c.timeout" in found
    assert found["pumps.c.meta.extra"] == "unknown key"
    assert "pumps.d.type" in found


def test_a_cluster_without_a_broker_url_is_refused() -> None:
    assert "broker-url: required" in problems("redis: {enable-cluster: true}\n")[""]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_pump_settings(tmp_path / "nope.yaml")


def test_embedded_default_has_a_csv_pump() -> None:
    settings = load_pump_settings()
    assert settings.pumps["csv"].type == "csv"


@pytest.mark.parametrize(
    ("text", "seconds"), [("24h0m0s", 86400), ("1m30s", 90), ("250ms", 0.25), (60, 60)]
)
def test_go_durations(text: object, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


def test_visibility_timeout_exceeds_the_longest_task_and_countdown() -> None:
    settings = parse_pump_settings(
        "delivery: {retry-backoff-max-s: 20}\n"
        "pumps: {slow: {type: csv, timeout: 50, meta: {csv_dir: x}}}\n"
    )
    assert settings.visibility_timeout_s > 50 + 20


def test_shutdown_grace_period_covers_the_soft_shutdown_capped_by_the_slowest_task() -> None:
    # Defaults: soft shutdown 10 s (shorter than a write's 35 s hard limit), + 20 s to requeue.
    assert parse_settings("{}").shutdown_grace_period_s == 30
    slow_shutdown = parse_settings("delivery: {soft-shutdown-timeout-s: 300}")
    assert slow_shutdown.shutdown_grace_period_s == 35 + 20  # no task outlives its hard limit
    slow_pump = parse_pump_settings(
        "delivery: {soft-shutdown-timeout-s: 60}\n"
        "pumps: {slow: {type: csv, timeout: 50, meta: {csv_dir: x}}}\n"
    )
    assert slow_pump.shutdown_grace_period_s == 55 + 20


def test_check_config_command_exits_2_and_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pumps:\n  csv:\n    type: csv\n    meta: {}\n")
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 2
    assert "pumps.csv.meta.csv_dir" in result.stderr


def test_celery_worker_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("purge-delay: -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "app", "worker", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "REMAP_SIGTERM": "SIGTERM"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "purge-delay" in result.stderr


def test_iam_options_without_effect_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    settings = parse_pump_settings(
        "log: {level: warn, name: pump, output-paths: x}\nredis: {optimisation-max-idle: 5}\n"
        "analytics: {storage-expiration-time: 1h}\n"
    )
    with caplog.at_level("WARNING"):
        warn_ignored_keys(settings)
    assert settings.ignored_keys() == [
        "analytics.storage-expiration-time",
        "log.name",
        "log.output-paths",
        "redis.optimisation-max-idle",
    ]
    assert "log.output-paths" in caplog.text
    assert settings.log.python_level == "WARNING"


def test_json_log_format_is_one_object_per_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("log: {format: json, level: info, name: pump}\nredis: {port: 1}\n")
    result = run_cli("status", "--config", str(config))
    import json

    lines = [line for line in result.stderr.splitlines() if line.startswith("{")]
    assert result.returncode == 1
    assert any("log.name" in json.loads(line)["message"] for line in lines), result.stderr


def test_errors_never_echo_secrets() -> None:
    found = problems(
        "redis: {password: [not, a, string]}\n"
        "broker-url: 42\n"
        "pumps: {m: {type: mongo, meta: {mongo_url: 'mongodb://u:hunter2@h:port/db', nope: 1,"
        " collection_name: [x]}}}\n"
    )
    text = repr(found)
    assert "redis.password" in found and "not" not in found["redis.password"]
    assert "pumps.m.meta.mongo_url" in found and "hunter2" not in text


def test_the_reporters_loader_leaves_pump_meta_to_the_pumps() -> None:
    """The reporter reads the same file without importing any pump, so meta goes unchecked."""
    text = "pumps: {m: {type: mongo, meta: {mongo_url: not-a-url}}}\n"
    assert parse_settings(text).pumps["m"].meta == {"mongo_url": "not-a-url"}
    with pytest.raises(ConfigError, match=r"pumps\.m\.meta\.mongo_url"):
        parse_pump_settings(text)
