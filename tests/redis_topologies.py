"""A Redis Cluster and a Sentinel-watched master of the test's own, from the real binaries.

Each server runs on a free port with its files under the test's folder and is stopped by its
PID; ``redis-server --sentinel`` runs the sentinels (the same program as Debian's
``redis-sentinel``).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from pathlib import Path

import redis

from tests.support import free_port, wait_until

#: A cluster node's bus port is its port plus this.
CLUSTER_BUS_OFFSET = 10_000


def binaries_present() -> bool:
    """Whether ``redis-server`` and ``redis-cli`` are on the PATH."""
    return all(shutil.which(name) for name in ("redis-server", "redis-cli"))


class _Servers:
    # Processes started from config files in one folder, stopped by PID.
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, port: int, lines: list[str], *, sentinel: bool = False) -> None:
        conf = self.directory / f"{port}.conf"
        base = [f"port {port}", "bind 127.0.0.1", f"dir {self.directory}", 'save ""']
        base += [] if sentinel else ["appendonly no"]
        conf.write_text("\n".join(base + lines) + "\n", encoding="utf-8")
        self._run(port, sentinel=sentinel)

    def restart(self, port: int) -> None:
        """Start a killed server again from its config file (empty: nothing is persisted)."""
        self._run(port, sentinel=False)

    def _run(self, port: int, *, sentinel: bool) -> None:
        conf = self.directory / f"{port}.conf"
        args = ["redis-server", str(conf)] + (["--sentinel"] if sentinel else [])
        log = (self.directory / f"{port}.log").open("ab")
        self.procs[port] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if not wait_until(lambda: _answers(port), 10, interval_s=0.05):
            raise AssertionError(f"redis-server on {port} did not start: {self.log(port)}")

    def log(self, port: int) -> str:
        return (self.directory / f"{port}.log").read_text(encoding="utf-8", errors="replace")

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


def _cluster_port() -> int:
    # A cluster node also listens on its port + 10000 (the cluster bus): both must be free.
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET <= 65535 and port_free(port + CLUSTER_BUS_OFFSET):
            return port


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _answers(port: int) -> bool:
    with contextlib.closing(redis.Redis(port=port, socket_timeout=1)) as client:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False


class OwnCluster(_Servers):
    """Three masters, no replicas, all 16384 slots assigned (``redis-cli --cluster create``)."""

    def __init__(self, directory: Path, *, masters: int = 3) -> None:
        super().__init__(directory)
        self.ports: list[int] = []
        while len(self.ports) < masters:
            port = _cluster_port()
            if port not in self.ports:
                self.ports.append(port)
        try:
            for port in self.ports:
                self.start(
                    port,
                    [
                        "cluster-enabled yes",
                        f"cluster-config-file nodes-{port}.conf",
                        "cluster-node-timeout 5000",
                    ],
                )
            created = subprocess.run(
                ["redis-cli", "--cluster", "create"]
                + [f"127.0.0.1:{port}" for port in self.ports]
                + ["--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if created.returncode != 0:
                raise AssertionError(f"cluster create failed: {created.stdout}{created.stderr}")
            if not wait_until(self._ok, 30, interval_s=0.1):
                raise AssertionError("the cluster did not reach cluster_state:ok")
        except BaseException:
            self.stop()
            raise

    @property
    def addrs(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    def _ok(self) -> bool:
        for port in self.ports:
            with contextlib.closing(redis.Redis(port=port)) as client:
                if client.cluster("info").get("cluster_state") != "ok":
                    return False
        return True

    def node_of(self, key: str) -> int:
        """The port of the master that serves ``key``."""
        with contextlib.closing(redis.Redis(port=self.ports[0])) as client:
            slot = int(client.cluster("keyslot", key))
            for start, end, master, *_ in client.cluster("slots"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"no master serves slot {slot}")


class OwnSentinels(_Servers):
    """A master, one replica and three sentinels (quorum 2) watching it as ``mymaster``."""

    MASTER_NAME = "mymaster"

    def __init__(self, directory: Path, *, sentinels: int = 3) -> None:
        super().__init__(directory)
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        try:
            self.start(self.master_port, [])
            self.start(self.replica_port, [f"replicaof 127.0.0.1 {self.master_port}"])
            for port in self.sentinel_ports:
                self.start(
                    port,
                    [
                        f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.master_port} 2",
                        f"sentinel down-after-milliseconds {self.MASTER_NAME} 1000",
                        f"sentinel failover-timeout {self.MASTER_NAME} 10000",
                    ],
                    sentinel=True,
                )
            if not wait_until(self._watching, 30, interval_s=0.2):
                raise AssertionError("the sentinels did not find the replica and each other")
        except BaseException:
            self.stop()
            raise

    @property
    def addrs(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[index], decode_responses=True)

    def _watching(self) -> bool:
        with contextlib.closing(self.sentinel()) as client:
            replicas = client.sentinel_slaves(self.MASTER_NAME)
            others = client.sentinel_sentinels(self.MASTER_NAME)
        return bool(replicas) and len(others) == len(self.sentinel_ports) - 1

    def master(self) -> int:
        """The port the sentinels name as master now."""
        with contextlib.closing(self.sentinel()) as client:
            _host, port = client.sentinel_get_master_addr_by_name(self.MASTER_NAME)
        return int(port)
