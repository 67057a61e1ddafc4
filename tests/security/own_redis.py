"""A redis-server of the test's own (free port, temp dir) with extra configuration lines: ACL
users, TLS. The shared Redis on 6379 is never reconfigured."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import require
from tests.support import free_port, port_open


class OwnRedis:
    """``redis-server <dir>/redis.conf``, stopped by :meth:`stop`; logs to ``<dir>/redis.log``."""

    def __init__(self, directory: Path, lines: list[str], *, tls: bool = False) -> None:
        require(shutil.which("redis-server") is not None, "redis-server")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.log = directory / "redis.log"
        listen = ["port 0", f"tls-port {self.port}"] if tls else [f"port {self.port}"]
        conf = [
            *listen,
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            f"dir {directory}",
            f"logfile {self.log}",
            *lines,
        ]
        (directory / "redis.conf").write_text("\n".join(conf) + "\n", encoding="utf-8")
        self.proc = subprocess.Popen(
            ["redis-server", str(directory / "redis.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"redis-server did not start:\n{self.output()[-2000:]}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
