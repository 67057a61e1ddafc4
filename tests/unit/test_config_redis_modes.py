"""The ``redis:`` block's Cluster and Sentinel modes: what is accepted, what is refused and why."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from app.analytics import AnalyticsOptions
from app.config import ConfigError, Settings, parse_settings
from app.config_redis import cluster_key_prefix, hash_tag
from app.redis_acl import key_patterns

CLUSTER = """
broker-url: redis://127.0.0.1:6379/0
redis:
  enable-cluster: true
  addrs: [10.0.0.1:7000, 10.0.0.2:7000, "10.0.0.3"]
  password: secret
"""

SENTINEL = """
broker-url: amqp://guest:guest@127.0.0.1:5672//
redis:
  master-name: mymaster
  addrs: [10.0.0.1:26379, 10.0.0.2:26379]
  database: 3
  password: secret
"""


def problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, environ={})
    return dict(caught.value.problems)


def test_cluster_block_is_accepted_with_every_start_up_node() -> None:
    settings = parse_settings(CLUSTER, environ={})
    assert settings.redis.mode == "cluster"
    assert settings.redis.addresses == (
        ("10.0.0.1", 7000),
        ("10.0.0.2", 7000),
        ("10.0.0.3", 6379),
    )
    assert settings.redis.describe() == (
        "Redis Cluster via 10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:6379"
    )


def test_sentinel_block_is_accepted_with_the_sentinels_and_the_masters_database() -> None:
    settings = parse_settings(SENTINEL, environ={})
    assert settings.redis.mode == "sentinel"
    assert settings.redis.addresses == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert settings.redis.database == 3
    assert "'mymaster'" in settings.redis.describe()


def test_sentinels_default_to_host_and_port_as_in_iam() -> None:
    text = "broker-url: amqp://h//\nredis: {master-name: m, host: 10.0.0.9, port: 26379}\n"
    assert parse_settings(text, environ={}).redis.addresses == (("10.0.0.9", 26379),)


def test_cluster_and_sentinel_together_are_refused() -> None:
    found = problems("broker-url: amqp://h//\nredis: {enable-cluster: true, master-name: m}\n")
    assert "choose one" in found["redis"]
    assert "enable-cluster and master-name" in found["redis"]


def test_a_cluster_database_other_than_zero_is_refused_naming_the_key() -> None:
    found = problems(CLUSTER.replace("password: secret", "database: 2"))
    assert found["redis"].startswith("Value error, database:")
    assert "only database 0" in found["redis"]


def test_cluster_and_sentinel_need_a_broker_url() -> None:
    for text in (CLUSTER, SENTINEL):
        without = "\n".join(line for line in text.splitlines() if "broker-url" not in line)
        found = problems(without)
        assert "broker-url: required with redis." in found[""], found


def test_tls_with_cluster_or_sentinel_is_refused_naming_the_key() -> None:
    found = problems(CLUSTER.replace("password: secret", "use-ssl: true"))
    assert (
        "use-ssl: TLS is supported with one server only, not with enable-cluster"
        in (found["redis"])
    )
    found = problems(SENTINEL.replace("password: secret", "use-ssl: true"))
    assert "not with master-name" in found["redis"]


def test_several_addresses_without_a_mode_are_refused() -> None:
    found = problems("redis: {addrs: [a:1, b:2]}\n")
    assert "addrs: several addresses need enable-cluster: true" in found["redis"]


def test_a_bad_port_among_the_addresses_is_named() -> None:
    found = problems(CLUSTER.replace("10.0.0.2:7000", "10.0.0.2:99999"))
    assert "addrs: bad port in '10.0.0.2:99999'" in found["redis"]


def test_on_a_cluster_our_keys_share_the_slot_of_iams_list() -> None:
    settings = parse_settings(CLUSTER, environ={})
    assert settings.redis_key_prefix == "{analytics-iam-system-analytics}iam-pump"
    assert (
        settings.key("purge", "offset") == "{analytics-iam-system-analytics}iam-pump:purge:offset"
    )
    slot = key_slot(settings.analytics_key.encode())
    for key in (
        settings.key("purge", "lock"),
        settings.key("purge", "offset"),
        settings.key("stats"),
        settings.key("dead-letters", "csv"),
        settings.key("ingest", "abc-1"),
    ):
        assert key_slot(key.encode()) == slot, key
    # The file's key-prefix and the broker's keys stay as written.
    assert settings.key_prefix == "iam-pump"
    assert AnalyticsOptions.from_settings(settings).key_prefix == "iam-pump"
    assert "~{analytics-iam-system-analytics}iam-pump:*" in (
        f"~{pattern}" for pattern in key_patterns(settings)
    )


def test_one_server_and_sentinel_keep_the_prefix_as_written() -> None:
    assert Settings().redis_key_prefix == "iam-pump"
    assert parse_settings(SENTINEL, environ={}).key("stats") == "iam-pump:stats"


def test_a_tagged_analytics_key_gives_its_tag_to_our_keys() -> None:
    text = CLUSTER + "analytics-key: '{iam}analytics'\n"
    settings = parse_settings(text, environ={})
    assert settings.redis_key_prefix == "{iam}iam-pump"
    assert key_slot(settings.key("stats").encode()) == key_slot(b"{iam}analytics")


def test_a_prefix_with_its_own_tag_must_land_in_the_lists_slot() -> None:
    found = problems(CLUSTER + "key-prefix: '{other}iam-pump'\n")
    assert "key-prefix: on a Redis Cluster our keys must share the hash slot" in found[""]
    same = CLUSTER + "key-prefix: '{analytics-iam-system-analytics}mine'\n"
    assert parse_settings(same, environ={}).redis_key_prefix == (
        "{analytics-iam-system-analytics}mine"
    )


def test_an_analytics_key_no_tag_can_match_is_refused() -> None:
    found = problems(CLUSTER + "analytics-key: 'a}b'\n")
    assert "analytics-key: 'a}b' cannot be matched by a hash tag" in found[""]


@pytest.mark.parametrize(
    ("key", "tag"),
    [("plain", "plain"), ("{iam}x", "iam"), ("a{b}c{d}", "b"), ("{}x", "{}x"), ("x{y", "x{y")],
)
def test_hash_tag_follows_redis_rules(key: str, tag: str) -> None:
    assert hash_tag(key) == tag
    if "{" not in key:
        assert cluster_key_prefix("p", key) == "{" + key + "}p"
