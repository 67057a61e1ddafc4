"""TLS to Redis for real: a redis-server of the test's own that speaks only TLS and asks for a
client certificate, certificates made by the test, server verification on. The reporter, a
worker (its broker on the same server), beat and the command line deliver end to end; a wrong
CA stops each of them at start-up with the keys to fix."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection

from app.analytics import Analytics, AnalyticsOptions
from app.codec import encode_go_record
from app.config import load_settings
from app.errors import ConfigError
from app.stores.clients import redis_client
from tests.faults.helpers import await_delivery, make_records, report
from tests.security.certs import Certs, make_certs
from tests.security.own_redis import OwnRedis
from tests.support import (
    REPO,
    Proc,
    base_config,
    celery_env,
    run_cli,
    start_beat,
    start_worker,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_redis(tmp_path: Path, certs: Certs) -> Iterator[OwnRedis]:
    server = OwnRedis(
        tmp_path / "redis",
        [
            f"tls-cert-file {certs.server_cert}",
            f"tls-key-file {certs.server_key}",
            f"tls-ca-cert-file {certs.ca}",
            "tls-auth-clients yes",
        ],
        tls=True,
    )
    yield server
    server.stop()


def tls_config(tmp_path: Path, server: OwnRedis, certs: Certs, ca: Path, **extra: Any) -> Path:
    config = base_config(tmp_path, redis_port=server.port, db=0)
    config["redis"] = {
        "host": "127.0.0.1",
        "port": server.port,
        "use-ssl": True,
        "ssl-ca-file": str(ca),
        "ssl-cert-file": str(certs.client_cert),
        "ssl-key-file": str(certs.client_key),
        **extra,
    }
    config["analytics"] = {"records-buffer-size": 2000, "pool-size": 2}
    return write_config(tmp_path / "tls.yaml", config)


def test_reporter_worker_beat_and_cli_deliver_over_verified_tls(
    tmp_path: Path, tls_redis: OwnRedis, certs: Certs, procs: list[Proc]
) -> None:
    config = tls_config(tmp_path, tls_redis, certs, certs.ca)
    settings = load_settings(config)
    assert settings.broker.startswith("rediss://") and "ssl_cert_reqs=required" in settings.broker
    procs.append(start_worker(config, tmp_path / "worker.log"))
    procs.append(start_beat(config, tmp_path / "beat.log", tmp_path))

    go_records = make_records("go", 3000)
    client = redis_client(settings)
    client.rpush(settings.analytics_key, *(encode_go_record(r) for r in go_records))
    reported = make_records("py", 3000)
    report(reported, config)  # asserts every record was shipped

    expected = {r.request for r in go_records + reported}
    lost, _duplicated, _ = await_delivery(
        tmp_path / "csv", expected, timeout_s=60, label="TLS, verification on"
    )
    status = run_cli("status", "--config", str(config))
    print(status.stdout[-1500:])
    client.close()
    assert lost == 0
    assert status.returncode == 0, status.stdout + status.stderr
    assert "TLS" not in status.stderr


def _clear_refusal(text: str, port: int) -> None:
    assert f"127.0.0.1:{port}" in text, text
    assert "certificate verification failed" in text, text
    assert "redis.ssl-ca-file" in text and "redis.ssl-insecure-skip-verify" in text, text
    assert "Traceback" not in text, text


def test_a_wrong_ca_stops_every_process_at_start_up_with_the_keys_to_fix(
    tmp_path: Path, tls_redis: OwnRedis, certs: Certs
) -> None:
    config = tls_config(tmp_path, tls_redis, certs, certs.other_ca)
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "app", "worker", "-c", "1", "--without-mingle"],
        env=celery_env(config),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    print(f"\nworker, exit {worker.returncode}:\n{worker.stderr.strip()}")
    assert worker.returncode == 2
    _clear_refusal(worker.stderr, tls_redis.port)

    cli = run_cli("status", "--config", str(config), timeout_s=60)
    print(f"iam-pump status, exit {cli.returncode}")
    assert cli.returncode == 2
    _clear_refusal(cli.stderr, tls_redis.port)

    analytics = Analytics(AnalyticsOptions.from_yaml(str(config)))
    with pytest.raises(ConfigError) as refused:
        analytics.start()
    print(f"reporter: {refused.value}")
    _clear_refusal(str(refused.value), tls_redis.port)

    # Past the start-up check, the broker connection verifies too: kombu gets the CA from the
    # URL (a bare rediss:// URL would make kombu skip verification).
    broker = Connection(load_settings(config).broker, connect_timeout=5)  # type: ignore[no-untyped-call]
    with pytest.raises(Exception, match="certificate verify failed"), broker:
        broker.ensure_connection(max_retries=0)  # type: ignore[no-untyped-call]

    # The same wrong CA with verification explicitly off connects: the refusal was the check.
    insecure = tls_config(tmp_path, tls_redis, certs, certs.other_ca)
    text = insecure.read_text(encoding="utf-8").replace(
        "use-ssl: true", "use-ssl: true\n  ssl-insecure-skip-verify: true"
    )
    insecure.write_text(text, encoding="utf-8")
    key = f"iam-pump:probe:{uuid.uuid4().hex}"
    client = redis_client(load_settings(insecure))
    assert client.set(key, "1") and client.delete(key) == 1
    client.close()
