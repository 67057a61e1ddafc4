"""The syslog pump without a syslog server: its ``meta`` (iam's keys and defaults) and the exact
bytes it sends, read from a plain socket. The runs against a real rsyslogd are in
``tests/integration/test_syslog_pump.py``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app.errors import ConfigError
from pumps.deadline import Deadline
from pumps.settings import parse_pump_settings
from pumps.syslog import SyslogMeta, SyslogPump, rfc3339_now
from pumps.testing import make_records, opened

HEADER = re.compile(
    r"<(?P<pri>\d+)>(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:Z|[+-]\d\d:\d\d)) "
    r"(?P<host>\S+) (?P<tag>[^\[ ]+)\[(?P<pid>\d+)\]: (?P<msg>.*)\n"
)


def test_iam_s_keys_and_defaults() -> None:
    settings = parse_pump_settings(
        json.dumps(
            {
                "pumps": {
                    "syslog": {
                        "type": "syslog",
                        "meta": {
                            "transport": "tcp",
                            "network_addr": "logs.internal:601",
                            "log_level": 6,
                            "tag": "iam",
                        },
                    },
                    "bare": {"type": "syslog", "meta": {"transport": "", "tag": ""}},
                }
            }
        )
    )
    meta = SyslogMeta.model_validate(settings.pumps["syslog"].meta)
    assert (meta.transport, meta.address, meta.log_level, meta.tag) == (
        "tcp",
        ("logs.internal", 601),
        6,
        "iam",
    )
    bare = SyslogMeta.model_validate(settings.pumps["bare"].meta)
    assert (bare.transport, bare.network_addr, bare.log_level, bare.tag) == (
        "udp",
        "localhost:5140",
        0,
        "syslog-pump",
    )
    assert SyslogMeta(network_addr="[::1]:514").address == ("::1", 514)


@pytest.mark.parametrize(
    ("meta", "path"),
    [
        ({"transport": "unix"}, "pumps.p.meta.transport"),
        ({"log_level": 192}, "pumps.p.meta.log_level"),
        ({"log_level": -1}, "pumps.p.meta.log_level"),
        ({"network_addr": "localhost"}, "pumps.p.meta.network_addr"),
        ({"network_addr": "localhost:99999"}, "pumps.p.meta.network_addr"),
        ({"tag": "my app"}, "pumps.p.meta.tag"),
        ({"tag": "a:b"}, "pumps.p.meta.tag"),
        ({"tls_ca_file": "/ca.pem"}, "pumps.p.meta"),
        ({"transport": "tls", "tls_cert_file": "/c.pem"}, "pumps.p.meta"),
        ({"network_adr": "x:1"}, "pumps.p.meta.network_adr"),
    ],
)
def test_bad_meta_is_named_at_start_up(meta: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pump_settings(json.dumps({"pumps": {"p": {"type": "syslog", "meta": meta}}}))
    assert path in [problem_path for problem_path, _ in caught.value.problems]


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_rfc3339_timestamps_as_go_writes_them(monkeypatch: pytest.MonkeyPatch, utc: None) -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rfc3339_now())
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    assert rfc3339_now().endswith("+05:30")


def test_one_go_formatted_line_per_record_over_tcp() -> None:
    """``<PRI>RFC3339 HOSTNAME TAG[PID]: {json}\\n``, the JSON on one line whatever it holds."""
    records = make_records("wire", 3)
    records[1] = dataclasses.replace(records[1], request="line one\nline two\r\x00", expire_at=None)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        meta = {"transport": "tcp", "network_addr": f"127.0.0.1:{port}", "log_level": 134}
        with opened(SyslogPump.create("s", meta, timeout_s=5)) as pump:
            server, _ = listener.accept()
            pump.write(records, deadline=Deadline.after(5))
            with server:
                server.settimeout(5)
                data = b""
                while data.count(b"\n") < 3:
                    data += server.recv(65536)
    lines = data.decode().splitlines(keepends=True)
    assert len(lines) == 3
    for line, record in zip(lines, records, strict=True):
        match = HEADER.fullmatch(line)
        assert match, line
        assert match["pri"] == "134"
        assert (match["host"], match["tag"], match["pid"]) == (
            socket.gethostname(),
            "syslog-pump",
            str(os.getpid()),
        )
        body = json.loads(match["msg"])
        assert list(body) == [
            "timestamp",
            "username",
            "effect",
            "conclusion",
            "request",
            "policies",
            "deciders",
            "expireAt",
            "id",
        ]
        assert (body["id"], body["request"]) == (record.id, record.request)
    assert json.loads(HEADER.fullmatch(lines[1])["msg"])["expireAt"] is None  # type: ignore[index]


def test_one_datagram_per_record_over_udp() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        port = receiver.getsockname()[1]
        meta = {"network_addr": f"127.0.0.1:{port}", "tag": "iam", "log_level": 14}
        records = make_records("udp", 4)
        with opened(SyslogPump.create("s", meta, timeout_s=5)) as pump:
            pump.write(records, deadline=Deadline.after(5))
            datagrams = [receiver.recv(65535).decode() for _ in records]
    assert [json.loads(HEADER.fullmatch(d)["msg"])["id"] for d in datagrams] == [  # type: ignore[index]
        r.id for r in records
    ]
    assert all(d.startswith("<14>") and " iam[" in d for d in datagrams)
