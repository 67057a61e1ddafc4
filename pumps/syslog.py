"""Syslog: one message per record, in the format iam's ``syslog`` pump sends through Go's
``log/syslog`` (iam's ``syslog`` type).

``meta`` takes iam's keys, so an existing ``iam-pump.yaml`` works as it is::

    transport                 udp (the default, as in iam), tcp or tls
    network_addr              host:port of the syslog server; default localhost:5140, as in iam
    log_level                 the message's PRI, as Go's syslog.Priority: facility * 8 + severity,
                              0-191 (134 is local0.info); default 0 (kern.emerg), as in iam
    tag                       the TAG of every message; default ``syslog-pump``, as in iam

and, for ``transport: tls`` only, ours (Go's ``log/syslog`` cannot dial ``tls`` at all, so iam
has none)::

    tls_ca_file               CA bundle (PEM) the server's certificate must chain to; default the
                              system's CAs
    tls_cert_file, tls_key_file   client certificate and key (PEM), for servers that ask for one
    tls_insecure_skip_verify  accept any certificate and host name

The wire format is Go's for network transports, byte for byte but the timestamp's source::

    <PRI>TIMESTAMP HOSTNAME TAG[PID]: MSG\\n

``TIMESTAMP`` is RFC 3339 to the second with the local offset (``2026-12-01T00:07:23Z``),
``HOSTNAME`` the machine's host name, ``PID`` the worker process's. That is the RFC 3164 (BSD
syslog) layout - no version field, no structured data, ``TAG[PID]:`` - with an RFC 3339
timestamp in place of 3164's ``Mmm dd hh:mm:ss``; it is not RFC 5424. rsyslog, syslog-ng and
journald parse it as RFC 3164. Each message ends with a newline, as Go writes it: over TCP and
TLS that newline is the frame (non-transparent framing, RFC 6587 3.4.2), over UDP each message is
one datagram.

``MSG`` is the record as one JSON object with iam's field names (iam formats a Go map with
``%s``, which gives ``map[conclusion:... timestamp:%!s(int64=...)]``, readable by nothing), in the
record's field order, ``expireAt`` in ISO 8601 (null for never) and our record ``id`` last::

    {"timestamp":1795500000,"username":"alice","effect":"allow","conclusion":"...",
     "request":"...","policies":"...","deciders":"...","expireAt":"2126-...","id":"<batch>-0"}

JSON escapes every control character, so a record never breaks the newline framing, and every
character beyond ASCII (``\\u00fc``), so the message is plain ASCII.

Delivery (see the README's table):

* **udp**: best effort. A datagram is handed to the kernel and that is all: one the network or
  the receiver's socket buffer cannot take is dropped with no error on our side, and nothing
  tells the pump. A record whose message is over 65,507 bytes (the largest UDP payload) is
  refused on its own (a dead letter) rather than sent.
* **tcp** and **tls**: at least once. A batch counts as written when all its bytes were handed
  to the socket without an error; a connection the server closed is noticed before the next
  batch (the pump reads the socket, which a syslog server never writes to) and opened again; a
  connection that fails part-way through a batch fails the write (a temporary error) and the
  whole batch is sent again, so the messages that did get through arrive twice. The kernel's
  acceptance is no receipt: bytes still in flight when the server dies are lost (syslog has no
  acknowledgements; RELP would be needed), and a worker killed in the middle of a send can leave
  one message cut short, which the redelivered batch then sends whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.record import JSON_NAMES, AnalyticsRecord, expiry, field_values
from pumps.base import Pump, WriteResult
from pumps.deadline import CHECK_TIMEOUT_S, Deadline
from pumps.errors import PumpPermanentError, PumpTemporaryError

logger = logging.getLogger(__name__)

DEFAULT_NETWORK_ADDR = "localhost:5140"
DEFAULT_TAG = "syslog-pump"
#: Go's largest priority, ``LOG_LOCAL7|LOG_DEBUG``; ``syslog.Dial`` refuses any other above it.
MAX_PRIORITY = 23 << 3 | 7
#: The largest UDP payload over IPv4 (65,535 less the IP and UDP headers).
MAX_UDP_MESSAGE_BYTES = 65_507

_TAG_FORBIDDEN = set(" :[]")


def split_address(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); raises ValueError saying what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"the port of {value!r} is not a number from 1 to 65535")
    return host, int(port_text)


class SyslogMeta(BaseModel):
    """``meta`` of the syslog pump: iam's keys, plus ``tls_*`` for ``transport: tls``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: Literal["udp", "tcp", "tls"] = "udp"
    network_addr: str = DEFAULT_NETWORK_ADDR
    log_level: int = Field(default=0, ge=0, le=MAX_PRIORITY)
    tag: str = DEFAULT_TAG
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_insecure_skip_verify: bool = False

    @field_validator("transport", mode="before")
    @classmethod
    def _empty_transport(cls, value: Any) -> Any:
        return value or "udp"  # iam: "No Transport given, using 'udp'"

    @field_validator("network_addr")
    @classmethod
    def _address(cls, value: str) -> str:
        if not value:
            return DEFAULT_NETWORK_ADDR
        split_address(value)
        return value

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        if not value:
            return DEFAULT_TAG
        bad = sorted({char for char in value if char in _TAG_FORBIDDEN or not char.isprintable()})
        if bad:
            raise ValueError(
                f"a tag may not contain {''.join(bad)!r}: syslog servers would read the "
                "message header wrong"
            )
        return value

    @model_validator(mode="after")
    def _tls_keys(self) -> SyslogMeta:
        given = [
            key
            for key in ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_insecure_skip_verify")
            if getattr(self, key)
        ]
        if given and self.transport != "tls":
            raise ValueError(f"{', '.join(given)} only apply to transport: tls")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self

    @property
    def address(self) -> tuple[str, int]:
        return split_address(self.network_addr)


def rfc3339_now() -> str:
    """Now as Go's ``time.RFC3339`` writes it: seconds, local offset, ``Z`` for UTC."""
    now = datetime.now().astimezone()
    text = now.isoformat(timespec="seconds")
    return text[:-6] + "Z" if now.utcoffset() == timedelta(0) else text


#: One encoder for every message (``json.dumps`` with options builds a new one per call).
#: ASCII only (other characters as ``\\u`` escapes): faster, and no receiver mangles 8-bit bytes.
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


def message_body(record: AnalyticsRecord, *, expire_at: str | None = None) -> str:
    """The record as the JSON object a message carries (iam's names, ``id`` last).

    ``expire_at`` is the ISO 8601 text of the record's expiry when the caller already has it.
    """
    document: dict[str, object] = dict(zip(JSON_NAMES, field_values(record), strict=True))
    if expire_at is None:
        expires = expiry(record)
        expire_at = expires.isoformat() if expires is not None else None
    document["expireAt"] = expire_at
    document["id"] = record.id
    return _ENCODE(document)


class SyslogPump(Pump[SyslogMeta]):
    """Sends each record as one syslog message over UDP, TCP or TLS (see the module docstring)."""

    Meta = SyslogMeta

    def __init__(self, name: str, meta: SyslogMeta, *, timeout_s: float) -> None:
        super().__init__(name, meta, timeout_s=timeout_s)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._opened = False
        self._hostname = socket.gethostname()
        self._tls: ssl.SSLContext | None = None

    # -- the messages -----------------------------------------------------------------------

    def header(self) -> str:
        """``<PRI>TIMESTAMP HOSTNAME TAG[PID]: `` as Go's ``log/syslog`` writes it, now."""
        return (
            f"<{self.meta.log_level}>{rfc3339_now()} {self._hostname} "
            f"{self.meta.tag}[{os.getpid()}]: "
        )

    def messages(self, records: Sequence[AnalyticsRecord]) -> list[bytes]:
        """One newline-terminated message per record, in order."""
        header = self.header()
        # A batch's records mostly share one expiry: format each distinct one once.
        expiries: dict[object, str | None] = {}
        messages = []
        for record in records:
            key = record.expire_at
            if key not in expiries:
                expires = expiry(record)
                expiries[key] = expires.isoformat() if expires is not None else None
            body = message_body(record, expire_at=expiries[key])
            messages.append(f"{header}{body}\n".encode())
        return messages

    # -- the connection ---------------------------------------------------------------------

    def open(self, *, deadline: Deadline | None = None) -> None:
        with self._lock:
            if self._sock is None:
                self._sock = self._connect(self.open_deadline(deadline))
            self._opened = True
        if self.meta.log_level == 0:
            logger.warning("pump %s: log_level 0 sends every record as kern.emerg", self.name)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            meta = self.meta
            context = ssl.create_default_context(cafile=meta.tls_ca_file)
            if meta.tls_cert_file and meta.tls_key_file:
                context.load_cert_chain(meta.tls_cert_file, meta.tls_key_file)
            if meta.tls_insecure_skip_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls = context
        return self._tls

    def _connect(self, deadline: Deadline) -> socket.socket:
        """A connected socket (UDP: connected, so refusals show), by the deadline."""
        host, port = self.meta.address
        where = f"syslog at {self.meta.network_addr} ({self.meta.transport})"
        try:
            if self.meta.transport == "udp":
                return self._udp_socket(host, port)
            sock = socket.create_connection((host, port), timeout=deadline.operation_budget_s())
            if self.meta.transport == "tls":
                try:
                    sock.settimeout(deadline.operation_budget_s())
                    sock = self._tls_context().wrap_socket(sock, server_hostname=host)
                except BaseException:
                    sock.close()
                    raise
            sock.settimeout(None)
            return sock
        except ssl.SSLCertVerificationError as exc:
            raise PumpPermanentError(f"{where}: certificate refused: {exc.verify_message}") from exc
        except (OSError, ssl.SSLError) as exc:
            raise PumpTemporaryError(f"cannot connect to {where}: {exc}") from exc

    @staticmethod
    def _udp_socket(host: str, port: int) -> socket.socket:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        # IPv4 first: "localhost" may resolve to ::1 first, where a server bound to 127.0.0.1
        # would never see a datagram (and UDP would not say so).
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def _still_connected(self, sock: socket.socket) -> bool:
        """False when the server closed or reset the connection (a syslog server never writes,
        so anything readable is the end, or a TLS record such as a session ticket)."""
        if self.meta.transport == "udp":
            return True
        sock.setblocking(False)
        try:
            while True:
                if not sock.recv(4096):
                    return False
        except (BlockingIOError, ssl.SSLWantReadError):
            return True
        except (OSError, ssl.SSLError):
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)

    def _usable_socket(self, deadline: Deadline) -> socket.socket:
        if not self._opened:
            raise PumpTemporaryError(f"pump {self.name!r} is not open")
        sock = self._sock
        if sock is not None and not self._still_connected(sock):
            logger.info("pump %s: the syslog server closed the connection; reconnecting", self.name)
            self._drop()
            sock = None
        if sock is None:
            sock = self._sock = self._connect(deadline)
        return sock

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(OSError, ValueError, ssl.SSLError):
                sock.settimeout(0.2)
                sock.unwrap()  # close_notify, so the server sees a clean end
        with contextlib.suppress(OSError):
            sock.close()

    # -- the pump -----------------------------------------------------------------------------

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Send every record; a temporary error (the whole batch is retried) if the connection
        fails, a refusal for a record too large for one UDP datagram."""
        if not records:
            return WriteResult()
        messages = self.messages(records)
        result = WriteResult()
        with self._lock:
            sock = self._usable_socket(deadline)
            try:
                sock.settimeout(deadline.operation_budget_s())
                if self.meta.transport == "udp":
                    for record, message in zip(records, messages, strict=True):
                        if len(message) > MAX_UDP_MESSAGE_BYTES:
                            result.rejected.append(
                                (
                                    record,
                                    f"a syslog message of {len(message)} bytes is over the "
                                    f"{MAX_UDP_MESSAGE_BYTES} bytes of one UDP datagram",
                                )
                            )
                            continue
                        sock.send(message)
                else:
                    sock.sendall(b"".join(messages))
                sock.settimeout(None)
            except (OSError, ssl.SSLError) as exc:
                self._drop()
                raise PumpTemporaryError(
                    f"sending to syslog at {self.meta.network_addr} ({self.meta.transport}) "
                    f"failed: {exc}"
                ) from exc
        return result

    def check(self) -> None:
        """Not open, or a TCP/TLS connection that is gone and cannot be made again: an error.

        Over UDP nothing can be known without an answer, which syslog never gives.
        """
        with self._lock:
            self._usable_socket(Deadline.after(CHECK_TIMEOUT_S))

    def close(self) -> None:
        with self._lock:
            self._opened = False
            self._drop()
