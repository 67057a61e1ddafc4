"""/healthz and /metrics are for this machine unless the configuration says otherwise."""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from pathlib import Path

import pytest
import redis

from app.config import DEFAULT_HEALTH_CHECK_ADDRESS, load_settings, parse_settings
from app.health import HealthServer
from tests.support import REDIS_HOST, REDIS_PORT, TEST_REDIS_DB, free_port

pytestmark = pytest.mark.integration


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.254", 9))
        address = str(probe.getsockname()[0])
        return None if address.startswith("127.") else address
    return None


def connects(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


def test_a_file_without_the_address_and_the_embedded_default_listen_on_loopback() -> None:
    omitted = parse_settings("redis: {host: 127.0.0.1}\n")
    assert omitted.health_check_address == DEFAULT_HEALTH_CHECK_ADDRESS == "127.0.0.1:7070"
    assert omitted.health_host_port == ("127.0.0.1", 7070)
    assert load_settings(None).health_host_port == ("127.0.0.1", 7070)
    # An address given explicitly is the user's choice and is honoured, as in iam's files.
    assert parse_settings("health-check-address: 0.0.0.0:7070\n").health_host_port[0] == "0.0.0.0"


def test_the_default_host_serves_metrics_on_loopback_and_refuses_other_interfaces(
    tmp_path: Path, redis_db: redis.Redis
) -> None:
    text = (
        f"redis: {{host: {REDIS_HOST}, port: {REDIS_PORT}, database: {TEST_REDIS_DB}}}\n"
        f"pumps: {{csv: {{type: csv, meta: {{csv_dir: {tmp_path / 'csv'}}}}}}}\n"
    )
    settings = parse_settings(text)
    default_host, _ = settings.health_host_port
    # Port 7070 may be taken on a shared machine: the default host, on a port of our own.
    port = free_port()
    server = HealthServer(
        settings.model_copy(update={"health_check_address": f"{default_host}:{port}"}), redis_db
    )
    server.start()
    try:
        assert server.address == ("127.0.0.1", port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert b"iam_pump_redis_up 1.0" in response.read()
        outward = outward_address()
        print(f"\nloopback answers on {port}; outward address {outward} tried")
        if outward is not None:
            assert not connects(outward, port), f"/metrics is reachable on {outward}:{port}"
    finally:
        server.stop()
