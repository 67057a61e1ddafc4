"""``IAM_PUMP_<KEY PATH>`` environment overrides of configuration keys (app.config_env)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from app.config import ConfigError, parse_settings
from app.config_env import apply_env_overrides, env_name
from pumps.registry import meta_problems
from tests.support import REPO

CONFIG = """
purge-delay: 10
redis:
  host: ${REDIS_HOST}
  port: 6379
analytics:
  pool-size: 50
pumps:
  csv:
    type: csv
    filters:
      usernames: [alice]
    meta:
      csv_dir: ./from-file
"""


def test_env_name_follows_viper_key_replacer() -> None:
    assert env_name(("purge-delay",)) == "IAM_PUMP_PURGE_DELAY"
    assert env_name(("redis", "ssl-ca-file")) == "IAM_PUMP_REDIS_SSL_CA_FILE"
    assert env_name(("pumps", "csv", "meta", "csv_dir")) == "IAM_PUMP_PUMPS_CSV_META_CSV_DIR"


def test_variables_override_keys_converted_by_the_field_type() -> None:
    environ = {
        "REDIS_HOST": "redis.example",
        "IAM_PUMP_PURGE_DELAY": "5",
        "IAM_PUMP_REDIS_PORT": "7000",
        "IAM_PUMP_ANALYTICS_POOL_SIZE": "8",
        "IAM_PUMP_ANALYTICS_STORAGE_EXPIRATION_TIME": "1h30m",
        "IAM_PUMP_DELIVERY_ALLOW_EVICTING_REDIS": "true",
        "IAM_PUMP_DELIVERY_VISIBILITY_TIMEOUT_S": "300",
        "IAM_PUMP_REDIS_ADDRS": "10.0.0.1:7001",
    }
    settings = parse_settings(CONFIG, environ=environ)
    assert settings.purge_delay == 5
    assert settings.redis.host == "redis.example"  # ${VAR} expansion still applies
    assert settings.redis.port == 7000
    assert settings.redis.addrs == ("10.0.0.1:7001",)
    assert settings.analytics.pool_size == 8
    assert settings.analytics.storage_expiration_time == 5400.0
    assert settings.delivery.allow_evicting_redis is True
    assert settings.visibility_timeout_s == 300.0
    assert settings.env_overrides == {
        "purge-delay": "IAM_PUMP_PURGE_DELAY",
        "redis.port": "IAM_PUMP_REDIS_PORT",
        "redis.addrs": "IAM_PUMP_REDIS_ADDRS",
        "analytics.pool-size": "IAM_PUMP_ANALYTICS_POOL_SIZE",
        "analytics.storage-expiration-time": "IAM_PUMP_ANALYTICS_STORAGE_EXPIRATION_TIME",
        "delivery.visibility-timeout-s": "IAM_PUMP_DELIVERY_VISIBILITY_TIMEOUT_S",
        "delivery.allow-evicting-redis": "IAM_PUMP_DELIVERY_ALLOW_EVICTING_REDIS",
    }


def test_a_key_given_with_underscores_in_the_file_is_overridden_where_it_is() -> None:
    settings = parse_settings("purge_delay: 10\n", environ={"IAM_PUMP_PURGE_DELAY": "3"})
    assert settings.purge_delay == 3
    assert settings.env_overrides == {"purge_delay": "IAM_PUMP_PURGE_DELAY"}


def test_pump_fields_and_given_meta_keys_are_reachable_but_nothing_new_is_created() -> None:
    environ = {
        "IAM_PUMP_PUMPS_CSV_META_CSV_DIR": "/var/lib/analytics",
        "IAM_PUMP_PUMPS_CSV_TIMEOUT": "12.5",
        "IAM_PUMP_PUMPS_CSV_ENABLED": "false",
        "IAM_PUMP_PUMPS_CSV_FILTERS_USERNAMES": "alice, bob,carol",
        "IAM_PUMP_PUMPS_CSV_FILTERS_SKIP_USERNAMES": "mallory",
        "IAM_PUMP_PUMPS_CSV_DEAD_LETTERS_REQUEST": "drop",
        # Neither a meta key the file lacks nor a pump it does not name can be made.
        "IAM_PUMP_PUMPS_CSV_META_OTHER": "x",
        "IAM_PUMP_PUMPS_EXTRA_TYPE": "stdout",
    }
    settings = parse_settings(CONFIG, environ=environ, meta_problems=meta_problems)
    csv = settings.pumps["csv"]
    assert csv.meta == {"csv_dir": "/var/lib/analytics"}
    assert csv.timeout == 12.5
    assert csv.enabled is False
    assert csv.filters.usernames == ("alice", "bob", "carol")
    assert csv.filters.skip_usernames == ("mallory",)
    assert csv.dead_letters.request == "drop"
    assert list(settings.pumps) == ["csv"]
    assert "IAM_PUMP_PUMPS_CSV_META_OTHER" not in settings.env_overrides.values()


def test_an_empty_variable_counts_as_unset() -> None:
    settings = parse_settings(CONFIG, environ={"IAM_PUMP_PURGE_DELAY": ""})
    assert settings.purge_delay == 10
    assert settings.env_overrides == {}


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("IAM_PUMP_REDIS_PORT", "six", "redis.port"),
        ("IAM_PUMP_PURGE_DELAY", "0", "purge-delay"),
        ("IAM_PUMP_ANALYTICS_TRANSPORT", "pigeon", "analytics.transport"),
        ("IAM_PUMP_PUMPS_CSV_MAX_RETRIES", "many", "pumps.csv.max-retries"),
        ("IAM_PUMP_REDIS_HOST", "h:notaport", "redis"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_key(name: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(CONFIG, environ={name: value})
    text = str(caught.value)
    print(text)
    line = next(line for line in text.splitlines() if line.strip().startswith(f"{key}:"))
    assert name in line


def test_a_meta_value_from_the_environment_is_checked_by_the_pump_class() -> None:
    config = CONFIG + "  store:\n    type: mongo\n    meta:\n      mongo_url: mongodb://m/db\n"
    config += "      mongo_use_ssl: false\n"
    settings = parse_settings(
        config,
        environ={"IAM_PUMP_PUMPS_STORE_META_MONGO_USE_SSL": "true"},
        meta_problems=meta_problems,
    )
    assert settings.pumps["store"].meta["mongo_use_ssl"] == "true"  # the pump class converts it
    with pytest.raises(ConfigError) as caught:
        parse_settings(
            config,
            environ={"IAM_PUMP_PUMPS_STORE_META_MONGO_USE_SSL": "maybe"},
            meta_problems=meta_problems,
        )
    print(caught.value)
    assert "pumps.store.meta.mongo_use_ssl" in str(caught.value)
    assert "IAM_PUMP_PUMPS_STORE_META_MONGO_USE_SSL" in str(caught.value)


def test_a_secret_from_the_environment_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(
            CONFIG, environ={"IAM_PUMP_REDIS_PASSWORD": "s3cret", "IAM_PUMP_REDIS_PORT": "x"}
        )
    assert "s3cret" not in str(caught.value)


class _WithConfigKey(BaseModel):
    config: str = "file"
    level: str = "info"


def test_the_config_file_variable_is_never_taken_for_a_key() -> None:
    environ = {"IAM_PUMP_CONFIG": "/etc/iam-pump.yaml", "IAM_PUMP_LEVEL": "debug"}
    raw, applied = apply_env_overrides({}, _WithConfigKey, environ, frozenset({"IAM_PUMP_CONFIG"}))
    assert raw == {"level": "debug"}
    assert applied == {"level": "IAM_PUMP_LEVEL"}


def test_check_config_says_which_keys_came_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("IAM_PUMP_")}
    env.update(IAM_PUMP_PURGE_DELAY="4", IAM_PUMP_PURGE_DELAI="4", IAM_PUMP_CONFIG=str(path))
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "check-config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    print(done.stdout[:400])
    assert "# purge-delay: from IAM_PUMP_PURGE_DELAY" in done.stdout
    assert "# IAM_PUMP_PURGE_DELAI: sets no key" in done.stdout
    assert "IAM_PUMP_CONFIG" not in done.stdout
    assert "\npurge-delay: 4\n" in done.stdout
