"""A real InfluxDB 1.x server (Debian's ``influxdb``, ``influxd``) for the influx pump's tests.

One server per test session, on private free ports (its HTTP API and its RPC bind-address, which
influxd opens on 8088 unless told otherwise), with its meta, data and WAL folders in a temporary
folder; stopped by PID at the end. Each test gets a database of its own, dropped afterwards.
Without ``influxd`` the tests skip locally and fail in CI (``scripts/test-servers.sh install``
installs it). ``INFLUX_URL`` points them at a server of your own instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from influxdb import InfluxDBClient

from tests.support import free_port

#: How long influxd may take to answer /ping after it starts.
START_TIMEOUT_S = 60.0

CONFIG_TEMPLATE = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{folder}/meta"
  logging-enabled = false
[data]
  dir = "{folder}/data"
  wal-dir = "{folder}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
[http]
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
  pprof-enabled = false
  auth-enabled = {auth}
[logging]
  level = "warn"
"""


@dataclass(frozen=True, slots=True)
class InfluxServer:
    """Where the test server's HTTP API is."""

    url: str

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 8086

    def client(self, database: str | None = None) -> InfluxDBClient:
        host, port = self.address
        return InfluxDBClient(host, port, database=database, timeout=30, retries=1)


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/ping", timeout=1).status_code == 204
    except requests.RequestException:
        return False


def start_influxd(folder: Path, *, auth: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """influxd on free loopback ports with its files under ``folder``; returns (process, url).

    With ``auth``, requests need credentials (the first admin user is created without).
    """
    http_port, rpc_port = free_port(), free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "influxdb.conf"
    config.write_text(
        CONFIG_TEMPLATE.format(
            folder=folder,
            http_port=http_port,
            rpc_port=rpc_port,
            auth="true" if auth else "false",
        )
    )
    log = (folder / "influxd.log").open("ab")
    process = subprocess.Popen(
        ["influxd", "run", "-config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_influxd(process)
            tail = (folder / "influxd.log").read_text(errors="replace")[-2000:]
            pytest.fail(f"influxd did not answer on {url}:\n{tail}")
        time.sleep(0.1)
    return process, url


def stop_influxd(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 15 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture(scope="session")
def influx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """The session's InfluxDB server (``INFLUX_URL``, or influxd started here)."""
    from tests.conftest import require

    given = os.environ.get("INFLUX_URL")
    if given:
        require(_answers(given), f"InfluxDB at {given}")
        yield InfluxServer(given.rstrip("/"))
        return
    require(shutil.which("influxd") is not None, "influxd (apt-get install influxdb)")
    process, url = start_influxd(tmp_path_factory.mktemp("influxd"))
    try:
        yield InfluxServer(url)
    finally:
        stop_influxd(process)


@pytest.fixture
def influx_database(influx_server: InfluxServer) -> Iterator[str]:
    """A database name of this test's own (the pump creates it), dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    client = influx_server.client()
    try:
        client.drop_database(name)
    finally:
        client.close()


def stored_ids(server: InfluxServer, database: str) -> Counter[str]:
    """Points per record id in ``analytics``, read back with InfluxQL."""
    client = server.client(database)
    try:
        if database not in {entry["name"] for entry in client.get_list_database()}:
            return Counter()
        points = client.query('SELECT "id" FROM "analytics"', epoch="ns").get_points()
        return Counter(point["id"] for point in points)
    finally:
        client.close()


def point_count(server: InfluxServer, database: str) -> int:
    """``SELECT count("id")`` over the whole measurement: how many points it holds."""
    client = server.client(database)
    try:
        if database not in {entry["name"] for entry in client.get_list_database()}:
            return 0
        rows = list(client.query('SELECT count("id") FROM "analytics"').get_points())
        return int(rows[0]["count"]) if rows else 0
    finally:
        client.close()
