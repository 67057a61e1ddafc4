"""The syslog pump against a real rsyslogd: the pump contract over TCP, TLS and UDP, what rsyslog
makes of the messages, and the ways a connection ends.

rsyslog writes each test's messages to a file named after the test's own tag
(:mod:`tests.servers_syslog`); records are counted there by id.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pumps.base import Pump, WriteResult
from pumps.deadline import Deadline
from pumps.errors import PumpPermanentError, PumpTemporaryError
from pumps.syslog import MAX_UDP_MESSAGE_BYTES, SyslogPump
from pumps.testing import PumpContract, make_records, opened, silent_server
from pumps.testing.contract import DOWN_SLACK_S, DOWN_TIMEOUT_S
from tests.servers_syslog import Rsyslog, new_tag
from tests.support import free_port

pytestmark = pytest.mark.integration


class TestSyslogPump(PumpContract):
    """Over TCP, newline-framed as Go's ``log/syslog`` writes it."""

    pump_class = SyslogPump
    pump_type = "syslog"
    connects = True
    transport = "tcp"

    @pytest.fixture(autouse=True)
    def _server(self, rsyslog: Rsyslog) -> None:
        self.server = rsyslog
        self.tag = new_tag()

    def port(self) -> int:
        return self.server.tcp_port

    def meta_at(self, tmp_path: Path, port: int) -> dict[str, Any] | None:
        return {
            "transport": self.transport,
            "network_addr": f"127.0.0.1:{port}",
            "log_level": 134,
            "tag": self.tag,
        }

    def meta(self, tmp_path: Path) -> dict[str, Any]:
        meta = self.meta_at(tmp_path, self.port())
        assert meta is not None
        return meta

    def stored_ids(self, pump: Pump) -> Counter[str]:
        self.server.settle(self.tag)
        return self.server.ids(self.tag)

    def unreachable_meta(self, tmp_path: Path) -> dict[str, Any] | None:
        return self.meta_at(tmp_path, free_port())

    def server_address(self) -> tuple[str, int] | None:
        return ("127.0.0.1", self.port())

    def test_silent_server_gives_a_temporary_error_within_the_deadline(self) -> None:
        """Plain TCP syslog has no answers: a server that accepts and never reads takes bytes
        until the kernel's buffers are full. From then on the write ends by its deadline."""
        big = [dataclasses.replace(r, request="x" * 60_000) for r in make_records("silent", 20)]
        with silent_server() as port:
            pump = self.create(timeout_s=DOWN_TIMEOUT_S, meta=self.meta_at(self.tmp_path, port))
            with opened(pump):
                for _ in range(200):  # 1.2 MB a write; the buffers hold a few MB at most
                    started = time.monotonic()
                    try:
                        pump.write(big, deadline=Deadline.after(DOWN_TIMEOUT_S))
                    except PumpTemporaryError:
                        assert time.monotonic() - started < DOWN_TIMEOUT_S + DOWN_SLACK_S
                        return
                    assert time.monotonic() - started < DOWN_TIMEOUT_S + DOWN_SLACK_S
        pytest.fail("writes to a server that never reads never failed")

    def test_rsyslog_reads_go_s_format(self) -> None:
        """PRI, RFC 3164 (protocol version 0), hostname, TAG[PID], and the record's JSON."""
        records = make_records("format", 3)
        records[1] = dataclasses.replace(records[1], request='{"q": "a\\nb"}', username="ü ∑")
        with opened(self.create()) as pump:
            pump.write(records, deadline=Deadline.after(10))
        self.server.settle(self.tag)
        lines = [line for line in self.server.lines(self.tag) if line.record() is not None]
        assert [line.record() for line in lines] == [
            {
                "timestamp": r.timestamp,
                "username": r.username,
                "effect": r.effect,
                "conclusion": r.conclusion,
                "request": r.request,
                "policies": r.policies,
                "deciders": r.deciders,
                "expireAt": "2030-06-01T12:00:00+00:00",
                "id": r.id,
            }
            for r in records
        ]
        for line in lines:
            assert (line.pri, line.protocol_version) == (134, "0")
            assert line.hostname == socket.gethostname()
            assert line.syslogtag == f"{self.tag}[{os.getpid()}]:"

    def test_connection_closed_by_the_server_is_opened_again(self) -> None:
        """The server ends the connection between two batches (a restart, an idle timeout):
        the next batch notices before sending and goes over a new connection."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            pump = self.create(meta=self.meta_at(self.tmp_path, port))
            with opened(pump):
                first, _ = listener.accept()
                first.close()  # the server goes away from this connection
                time.sleep(0.2)
                pump.write(make_records("again", 2), deadline=Deadline.after(5))
                second, _ = listener.accept()
                with second:
                    second.settimeout(5)
                    received = b""
                    while received.count(b"\n") < 2:
                        chunk = second.recv(65536)
                        assert chunk, "connection closed early"
                        received += chunk
        assert received.count(b"\n") == 2


class TestSyslogPumpOverTls(TestSyslogPump):
    """Over TLS (rsyslog's gnutls listener), checking the server's certificate."""

    pump_type = None  # registered once, above
    transport = "tls"

    def port(self) -> int:
        return self.server.tls_port

    def meta_at(self, tmp_path: Path, port: int) -> dict[str, Any] | None:
        meta = super().meta_at(tmp_path, port)
        assert meta is not None
        return {**meta, "tls_ca_file": str(self.server.ca_file)}

    # A TLS handshake needs the server's answer, so the contract's own case applies.
    test_silent_server_gives_a_temporary_error_within_the_deadline = (
        PumpContract.test_silent_server_gives_a_temporary_error_within_the_deadline
    )

    def test_connection_closed_by_the_server_is_opened_again(self) -> None:
        pytest.skip("the plain-TCP case covers reconnecting; a raw listener speaks no TLS")

    def test_unknown_certificate_is_a_permanent_error(self, tmp_path: Path) -> None:
        """A CA that did not sign the server's certificate: no retry can help."""
        from tests.security.certs import make_certs

        other = make_certs(tmp_path / "other").other_ca
        meta = {**self.meta(tmp_path), "tls_ca_file": str(other)}
        pump = self.create(meta=meta)
        with pytest.raises(PumpPermanentError, match="certificate"):
            pump.open()
        pump.close()


class TestSyslogPumpOverUdp(TestSyslogPump):
    """Over UDP, one datagram per record (few enough on loopback that none is lost)."""

    pump_type = None
    transport = "udp"

    def port(self) -> int:
        return self.server.udp_port

    def unreachable_meta(self, tmp_path: Path) -> dict[str, Any] | None:
        return None  # UDP cannot tell a server that is down from one that is up

    def server_address(self) -> tuple[str, int] | None:
        return None  # no connection to cut

    def test_silent_server_gives_a_temporary_error_within_the_deadline(self) -> None:
        pytest.skip("UDP has no connection: nothing waits for a server")

    def test_connection_closed_by_the_server_is_opened_again(self) -> None:
        pytest.skip("UDP has no connection")

    def test_record_too_large_for_a_datagram_is_refused_alone(self) -> None:
        records = make_records("dgram", 3)
        records[1] = dataclasses.replace(records[1], request="x" * MAX_UDP_MESSAGE_BYTES)
        with opened(self.create()) as pump:
            result = pump.write(records, deadline=Deadline.after(10))
        assert [(r.id, "UDP datagram" in reason) for r, reason in result.rejected] == [
            (records[1].id, True)
        ]
        assert self.stored_ids(pump) == Counter({records[0].id: 1, records[2].id: 1})

    def test_large_record_fits_one_datagram(self) -> None:
        records = make_records("big", 1)
        records[0] = dataclasses.replace(records[0], request="y" * 60_000)
        with opened(self.create()) as pump:
            assert pump.write(records, deadline=Deadline.after(10)) == WriteResult()
        assert self.stored_ids(pump) == Counter({records[0].id: 1})


def test_nothing_listening_on_tcp_is_a_temporary_error_at_open() -> None:
    pump = SyslogPump.create(
        "s", {"transport": "tcp", "network_addr": f"127.0.0.1:{free_port()}"}, timeout_s=2
    )
    with pytest.raises(PumpTemporaryError, match="cannot connect"):
        pump.open()
    with pytest.raises(PumpTemporaryError, match="not open"):
        pump.check()
