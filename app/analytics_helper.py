"""The reporter's shipping process: publishes the batches the application process packed.

Publishing a batch through Celery (kombu's message building, the envelope's Redis calls) is
pure Python that holds the GIL for a millisecond or more; in the application's process it
delays the request threads behind it. So the reporter's cutter only packs each batch (one
msgpack call) and writes it to this helper's stdin; the helper, a separate process with its own
GIL, ships it with ``pool-size`` threads, retrying with backoff, and answers on stdout when it
is shipped.

The application side keeps every batch until the helper says it shipped it. If the helper dies,
a new one is started and every unanswered batch is written to it again, with the same batch id:
ingest drops a batch it already has, so nothing is lost and nothing is stored twice. At stop,
the helper's stdin is closed; it ships what it holds, then exits.

Wire format. To the helper: ``struct "!I32s"`` (payload length, batch id) then the payload, an
envelope as :func:`app.codec.encode_envelope` packs it. From the helper, one line each:
``S <batch id>`` shipped, ``F <batch id>`` one failed attempt (it will retry).

Run as ``python -m app.analytics_helper '<json options>'`` by :class:`HelperProcess` only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from app.analytics_options import AnalyticsOptions
from app.backoff import backoff_s
from app.errors import ShipError
from app.transports import CeleryTransport, transport_for

logger = logging.getLogger(__name__)

HEADER = struct.Struct("!I32s")
#: Ask for pipes this large (Linux caps it at /proc/sys/fs/pipe-max-size, 1 MiB by default), so
#: that a batch is usually written in one call without waiting for the helper to read.
PIPE_SIZE = 1 << 20
SHIP_BACKOFF_BASE_S = 0.1
SHIP_BACKOFF_MAX_S = 5.0
#: How long a helper whose application died keeps retrying a batch it could not ship.
ORPHAN_GRACE_S = 60.0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class HelperProcess:
    """The application side of one helper process (used by the reporter's cutter thread only)."""

    def __init__(self, options: AnalyticsOptions) -> None:
        self._options = options
        self._proc: subprocess.Popen[bytes] | None = None
        self._acks = b""
        self.starts = 0

    def start(self) -> None:
        """Start a helper process (again, after a crash)."""
        opts = {
            "transport": self._options.transport,
            "broker_url": self._options.broker_url,
            "redis_url": self._options.redis_url,
            "analytics_key": self._options.analytics_key,
            "key_prefix": self._options.key_prefix,
            "pool_size": self._options.pool_size,
            # Compared with the helper's parent, to know when the application is gone (the
            # helper may read it only after the application died).
            "application_pid": os.getpid(),
        }
        env = dict(os.environ)
        # The helper imports this package from where the application did.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "app.analytics_helper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
            # Not in the application's process group: a Ctrl+C meant for the application must
            # not kill the helper before the application's stop() has had it ship.
            start_new_session=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        for pipe in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)
        # The options go down the pipe, not on the command line, where `ps` would show the
        # broker's password to every user of the machine.
        with contextlib.suppress(OSError):
            self._proc.stdin.write(json.dumps(opts).encode("utf-8") + b"\n")
            self._proc.stdin.flush()
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._acks = b""
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ack_fd(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        return self._proc.stdout.fileno()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def send(self, batch_id: str, payload: bytes) -> bool:
        """Write one batch (blocks while the pipe is full); False if the helper is gone."""
        assert self._proc is not None and self._proc.stdin is not None
        data = [HEADER.pack(len(payload), batch_id.encode("ascii")), payload]
        fd = self._proc.stdin.fileno()
        try:
            written = os.writev(fd, data)
            total = len(data[0]) + len(payload)
            if written < total:
                rest = b"".join(data)[written:]
                while rest:
                    rest = rest[os.write(fd, rest) :]
        except (BrokenPipeError, ValueError, OSError):
            return False
        return True

    def read_acks(self) -> list[tuple[str, str]]:
        """The helper's answers available now, as (kind, batch id); never blocks."""
        if self._proc is None or self._proc.stdout is None:
            return []
        with contextlib.suppress(BlockingIOError, ValueError, OSError):
            while chunk := os.read(self.ack_fd, 65536):
                self._acks += chunk
        *lines, self._acks = self._acks.split(b"\n")
        out = []
        for line in lines:
            kind, _, batch_id = line.decode("ascii", "replace").partition(" ")
            out.append((kind, batch_id))
        return out

    def finish_input(self) -> None:
        """No more batches: the helper ships what it holds, then exits."""
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()

    def terminate(self) -> None:
        """SIGKILL the helper, from any thread (its pipes are left to the cutter)."""
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                proc.kill()

    def wait_exit(self, timeout_s: float) -> None:
        """Wait for the helper to end by itself (after :meth:`finish_input`)."""
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout_s)

    def kill(self) -> None:
        """Stop the helper now, whatever it still holds (after a crash, or at stop's deadline)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


# -- the helper process ----------------------------------------------------------------------


def _read_exactly(stream: Any, size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) < size:
        return None
    return bytes(data)


def _serve(opts: dict[str, Any]) -> None:
    parent = opts.pop("application_pid", None) or os.getppid()
    transport = transport_for(AnalyticsOptions(**opts))
    out = sys.stdout.buffer
    out_lock = threading.Lock()
    batches: queue.Queue[tuple[str, bytes] | None] = queue.Queue()

    def answer(kind: str, batch_id: str) -> None:
        # The application may be gone (its end of the pipe closed): shipping goes on.
        with out_lock, contextlib.suppress(OSError, ValueError):
            out.write(f"{kind} {batch_id}\n".encode("ascii"))
            out.flush()

    orphaned_at: list[float] = []  # when this process first saw the application gone

    def given_up() -> bool:
        # While the application lives, its stop() decides when to give up. Once it is gone,
        # nobody will count or resend a batch and nobody will stop this process: keep retrying
        # through a short outage, for ORPHAN_GRACE_S, then say what is lost and end.
        if os.getppid() == parent:
            return False
        if not orphaned_at:
            orphaned_at.append(time.monotonic())
        return time.monotonic() - orphaned_at[0] > ORPHAN_GRACE_S

    def ship(batch_id: str, payload: bytes) -> None:
        attempt = 0
        while True:
            if attempt and given_up():
                logger.error(
                    "analytics: application gone and the broker away for %.0fs, batch %s not "
                    "shipped",
                    ORPHAN_GRACE_S,
                    batch_id,
                )
                return
            try:
                if isinstance(transport, CeleryTransport):
                    transport.ship_envelope(batch_id, payload)
                else:
                    rows = msgpack.unpackb(payload, timestamp=3)["records"]
                    transport.ship(batch_id, rows)
                answer("S", batch_id)
                return
            except ShipError as exc:
                attempt += 1
                answer("F", batch_id)
                if attempt == 1 or attempt % 10 == 0:
                    logger.warning(
                        "analytics: shipping failed (attempt %d), will retry: %s", attempt, exc
                    )
            threading.Event().wait(
                backoff_s(attempt, base_s=SHIP_BACKOFF_BASE_S, max_s=SHIP_BACKOFF_MAX_S)
            )

    def shipper() -> None:
        while (item := batches.get()) is not None:
            ship(*item)

    threads = [threading.Thread(target=shipper, daemon=True) for _ in range(opts["pool_size"])]
    for thread in threads:
        thread.start()
    source = sys.stdin.buffer
    while (header := _read_exactly(source, HEADER.size)) is not None:
        length, raw_id = HEADER.unpack(header)
        payload = _read_exactly(source, length)
        if payload is None:
            break
        batches.put((raw_id.decode("ascii"), payload))
    for _ in threads:
        batches.put(None)
    for thread in threads:
        thread.join()
    transport.close()


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s analytics-helper %(levelname)s %(message)s"
    )
    # The application's stop() decides when the helper ends (it closes stdin, or kills it at
    # its deadline); a Ctrl+C sent to the terminal's process group is not for the helper.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The first line of the pipe holds the options (see HelperProcess.start).
    _serve(json.loads(sys.stdin.buffer.readline()))


if __name__ == "__main__":
    main()
