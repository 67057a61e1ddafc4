"""A real rsyslogd for the syslog pump's tests: UDP, TCP and TLS listeners on private ports,
every message written to a file named after its tag (``<out>/<programname>.log``).

Each line of those files is ``PRI|PROTOCOL-VERSION|TIMESTAMP|HOSTNAME|SYSLOGTAG|MSG``, as
rsyslog parsed the message, so a test sees what the server understood, not what was sent. A test
uses a tag of its own and counts the records in its own file by id.

The fixture is session-scoped; it fails in CI, and skips otherwise, when ``rsyslogd`` or its
gnutls driver is missing (``scripts/test-servers.sh install`` installs both).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, port_open

#: rsyslog's own limit on a message it reads (its default, 8 KiB, would cut large records).
MAX_MESSAGE_SIZE = "256k"
#: Where Debian's rsyslog keeps its loadable modules; the TLS listener needs the gnutls one.
GTLS_DRIVER = "lmnsd_gtls.so"

_CONFIG = """\
global(workDirectory="{work}" maxMessageSize="{max_size}")
module(load="imudp")
module(load="imtcp" maxSessions="1000")
template(name="perTag" type="string" string="{out}/%programname%.log")
template(name="line" type="string"
         string="%pri%|%protocol-version%|%timereported:::date-rfc3339%|%hostname%|%syslogtag%|%msg:2:$%\\n")
ruleset(name="pump") {{
  action(type="omfile" dynaFile="perTag" template="line" dynaFileCacheSize="1000"
         flushOnTXEnd="on" asyncWriting="off")
}}
input(type="imudp" address="127.0.0.1" port="{udp_port}" ruleset="pump")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}" ruleset="pump")
input(type="imtcp" address="127.0.0.1" port="{tls_port}" ruleset="pump"
      streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon"
      streamDriver.CAFile="{ca}" streamDriver.CertFile="{cert}" streamDriver.KeyFile="{key}")
"""


@dataclass(frozen=True)
class SyslogLine:
    """One message as rsyslog parsed it."""

    pri: int
    protocol_version: str
    timestamp: str
    hostname: str
    syslogtag: str
    msg: str

    def record(self) -> dict[str, Any] | None:
        """The message's JSON object, or None when it is not one (a message cut short)."""
        try:
            value = json.loads(self.msg)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


@dataclass
class Rsyslog:
    """A running rsyslogd and where it writes."""

    udp_port: int
    tcp_port: int
    tls_port: int
    out: Path
    ca_file: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def lines(self, tag: str) -> list[SyslogLine]:
        path = self.out / f"{tag}.log"
        if not path.exists():
            return []
        parsed = []
        for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = text.split("|", 5)
            if len(fields) == 6:
                parsed.append(SyslogLine(int(fields[0]), *fields[1:]))
        return parsed

    def ids(self, tag: str) -> Counter[str]:
        """Copies of each record id rsyslog wrote for ``tag`` (cut messages not counted)."""
        found: Counter[str] = Counter()
        for line in self.lines(tag):
            record = line.record()
            if record is not None:
                found[str(record.get("id"))] += 1
        return found

    def settle(self, tag: str, *, quiet_s: float = 0.3, timeout_s: float = 10.0) -> None:
        """Wait until a marker sent after the test's messages is in the file and nothing has
        arrived for ``quiet_s``: rsyslog writes asynchronously."""
        marker = f"marker-{uuid.uuid4().hex}"
        with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=5) as sock:
            sock.sendall(f"<13>2026-01-01T00:00:00Z host {tag}[1]: {marker}\n".encode())
        path = self.out / f"{tag}.log"
        deadline = time.monotonic() + timeout_s
        last_size = -1
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            text = path.read_text(errors="replace") if path.exists() else ""
            if len(text) != last_size:
                last_size, quiet_since = len(text), time.monotonic()
            elif marker in text and time.monotonic() - quiet_since >= quiet_s:
                return
            time.sleep(0.05)
        raise AssertionError(f"rsyslog did not write {marker} for {tag} in {timeout_s}s")


def new_tag() -> str:
    """A tag no other test uses: its messages go to a file of their own."""
    return f"t{uuid.uuid4().hex[:16]}"


def rsyslog_available() -> str | None:
    """Why rsyslog cannot run here, or None when it can."""
    binary = shutil.which("rsyslogd")
    if binary is None:
        return "rsyslogd is not installed (scripts/test-servers.sh install)"
    found = list(Path("/usr/lib").glob(f"**/rsyslog/{GTLS_DRIVER}"))
    if not found:
        return f"rsyslog's gnutls driver ({GTLS_DRIVER}, package rsyslog-gnutls) is not installed"
    return None


def start_rsyslog(directory: Path) -> Rsyslog:
    """rsyslogd on three free ports with its files under ``directory``; waits until it listens."""
    from tests.security.certs import make_certs

    certs = make_certs(directory / "certs")
    work, out = directory / "work", directory / "out"
    work.mkdir(parents=True)
    out.mkdir()
    ports = {"udp_port": free_port(), "tcp_port": free_port(), "tls_port": free_port()}
    config = directory / "rsyslog.conf"
    config.write_text(
        _CONFIG.format(
            work=work,
            out=out,
            max_size=MAX_MESSAGE_SIZE,
            ca=certs.ca,
            cert=certs.server_cert,
            key=certs.server_key,
            **ports,
        ),
        encoding="utf-8",
    )
    log = directory / "rsyslogd.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            ["rsyslogd", "-n", "-f", str(config), "-i", str(directory / "rsyslogd.pid")],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Rsyslog(out=out, ca_file=certs.ca, proc=proc, log=log, **ports)
    deadline = time.monotonic() + 30
    while not (port_open("127.0.0.1", server.tcp_port) and port_open("127.0.0.1", server.tls_port)):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_rsyslog(server)
            raise AssertionError(f"rsyslogd did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    return server


def stop_rsyslog(server: Rsyslog) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture(scope="session")
def rsyslog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rsyslog]:
    """A real rsyslogd for the session (skips locally, fails in CI, when it cannot run)."""
    from tests.conftest import require

    missing = rsyslog_available()
    require(missing is None, missing or "rsyslog")
    server = start_rsyslog(tmp_path_factory.mktemp("rsyslog"))
    try:
        yield server
    finally:
        stop_rsyslog(server)
