"""The Redis TLS keys, how they reach the URLs redis-py and kombu read, and the ACL line."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from app.config import parse_settings
from app.errors import ConfigError
from app.redis_acl import acl_rules, acl_setuser
from tests.support import REPO


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def test_verification_is_named_in_the_url_with_the_ca_and_client_pair(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("x")
    settings = parse_settings(
        f"redis: {{use-ssl: true, ssl-ca-file: {tmp_path}/ca.pem,"
        f" ssl-cert-file: {tmp_path}/client.pem, ssl-key-file: {tmp_path}/client.key}}"
    )
    assert settings.broker == settings.redis.url
    assert settings.broker.startswith("rediss://127.0.0.1:6379/0?")
    assert _query(settings.broker) == {
        "ssl_cert_reqs": ["required"],
        "ssl_ca_certs": [f"{tmp_path}/ca.pem"],
        "ssl_certfile": [f"{tmp_path}/client.pem"],
        "ssl_keyfile": [f"{tmp_path}/client.key"],
    }


def test_plain_tls_verifies_against_the_system_cas_and_skip_verify_turns_it_off() -> None:
    verified = parse_settings("redis: {use-ssl: true}")
    assert _query(verified.redis.url) == {"ssl_cert_reqs": ["required"]}
    skipped = parse_settings("redis: {use-ssl: true, ssl-insecure-skip-verify: true}")
    assert _query(skipped.redis.url) == {"ssl_cert_reqs": ["none"]}
    assert parse_settings("{}").redis.url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("redis_block", "expected"),
    [
        ("{ssl-ca-file: /etc/hosts}", "ssl-ca-file: only used with use-ssl: true"),
        ("{use-ssl: true, ssl-cert-file: /etc/hosts}", "ssl-cert-file and ssl-key-file go"),
        ("{use-ssl: true, ssl-ca-file: /no/such/ca.pem}", "ssl-ca-file: cannot read"),
    ],
)
def test_tls_files_are_checked_with_the_rest_of_the_file(redis_block: str, expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings(f"redis: {redis_block}")
    assert refused.value.problems[0][0] == "redis"
    assert expected in str(refused.value)


def test_the_readme_shows_the_acl_line_for_the_defaults() -> None:
    line = acl_setuser(parse_settings("{}"))
    assert line in (REPO / "README.md").read_text(encoding="utf-8")


def test_acl_follows_the_key_names_and_the_broker() -> None:
    custom = acl_rules(
        parse_settings("{key-prefix: pump-a, analytics-key: list-a, redis: {database: 3}}")
    )
    assert "~pump-a:*" in custom and "~list-a" in custom and "&/3.celery.pidbox" in custom
    assert "~iam-pump:*" not in custom and "+config" not in " ".join(custom)
    rabbit = acl_rules(parse_settings("{broker-url: 'amqp://guest:guest@rabbit//'}"))
    assert [rule for rule in rabbit if rule.startswith(("~", "&"))] == [
        "~iam-pump:*",
        "~analytics-iam-system-analytics",
        "~iam-pump",
    ]
