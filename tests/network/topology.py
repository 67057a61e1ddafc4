"""Hosts on a network of their own: network namespaces joined by veth pairs, links we can cut.

Each host (Redis, worker, sink, reporter) is a network namespace. Two hosts are joined by a
*link*: a namespace of its own (the wire) holding one veth end towards each host. The wire either
bridges the two ends in the kernel, or leaves them to a userspace forwarder
(:mod:`tests.network.wire`) that delays and loses frames. Cutting a link attaches a ``pfifo``
queue of length 0 to both of the wire's ends, so every frame is dropped in the middle of the
link: the hosts get no error and no reset, only silence, as in a real partition.

The test process reaches a host's services over a *control* veth pair from the root namespace
(health endpoint, the sink's database). The hosts have no default route, so nothing they send
leaves their own links.

Needs root, ``ip`` and ``tc`` (iproute2); :func:`netns_unavailable` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import REPO, Proc

_counter = itertools.count()
#: Blocks of subnets handed out by this process (topologies are built from several threads).
_taken: set[int] = set()
_taking = threading.Lock()
#: Third octets 10.77.X.0/24 start here; each topology takes BLOCK consecutive ones.
FIRST_OCTET = 100
BLOCK = 8


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raises with its stderr on failure when ``check``."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def tc(*args: str) -> None:
    """Run ``tc ARGS``; raises with its stderr on failure."""
    done = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")


def netns_unavailable() -> str | None:
    """Why these tests cannot build namespaces here, or None when they can."""
    for tool in ("ip", "tc", "redis-server"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"iamp-probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        tc("-n", probe, "qdisc", "add", "dev", "p0", "root", "pfifo", "limit", "0")
    except (RuntimeError, OSError) as exc:
        return f"cannot build a network namespace with a pfifo qdisc: {exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def remove_stale() -> list[str]:
    """Delete the namespaces a test process that no longer runs left behind (it was killed)."""
    removed = []
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(r"iamp(\d+)x\d+-.+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class Link:
    """Two hosts joined through a wire namespace; ``a`` gets ``.1`` and ``b`` gets ``.2``."""

    wire: str
    a: str
    b: str
    subnet: str
    ends: tuple[str, str] = ("wa", "wb")
    forwarder: Proc | None = None

    @property
    def a_address(self) -> str:
        return f"{self.subnet}.1"

    @property
    def b_address(self) -> str:
        return f"{self.subnet}.2"

    def cut(self) -> None:
        """Drop every frame in both directions from now on (silently, in the wire)."""
        for end in self.ends:
            tc("-n", self.wire, "qdisc", "replace", "dev", end, "root", "pfifo", "limit", "0")

    def mend(self) -> None:
        """Let frames through again."""
        for end in self.ends:
            tc("-n", self.wire, "qdisc", "del", "dev", end, "root")


@dataclass
class Topology:
    """Namespaces ``iamp<pid>x<n>-<host>`` and their links; :meth:`destroy` removes every one."""

    workdir: Path
    tag: str = field(default_factory=lambda: f"{os.getpid()}x{next(_counter)}")
    namespaces: list[str] = field(default_factory=list)
    links: dict[str, Link] = field(default_factory=dict)
    control: dict[str, tuple[str, str]] = field(default_factory=dict)
    _block: int = field(init=False)
    _octets: itertools.count[int] = field(init=False)
    _root_ifaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._block = self._free_block()
        self._octets = itertools.count(self._block)

    def _free_block(self) -> int:
        # A block of 10.77.X.0/24 subnets that no address in the root namespace uses yet, and
        # that no other topology of this process has taken.
        with _taking:
            used = ip("-4", "-o", "addr", "show").stdout
            for start in range(FIRST_OCTET, 250 - BLOCK, BLOCK):
                octets = range(start, start + BLOCK)
                if start not in _taken and not any(f"10.77.{o}." in used for o in octets):
                    _taken.add(start)
                    return start
        raise RuntimeError("no free 10.77.X.0/24 block")

    def ns(self, host: str) -> str:
        """The namespace of ``host``, created on first use with its loopback up."""
        name = f"iamp{self.tag}-{host}"
        if name not in self.namespaces:
            ip("netns", "add", name)
            self.namespaces.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, name: str, a: str, b: str) -> Link:
        """Join hosts ``a`` and ``b`` through a wire that bridges them (see :meth:`shape`)."""
        wire = self.ns(f"w-{name}")
        subnet = f"10.77.{next(self._octets)}"
        link = Link(wire=wire, a=self.ns(a), b=self.ns(b), subnet=subnet)
        ends = ((link.a, "wa", link.a_address), (link.b, "wb", link.b_address))
        for host_ns, end, address in ends:
            iface = f"{name}0"
            ip(
                "link",
                "add",
                "name",
                iface,
                "netns",
                host_ns,
                "type",
                "veth",
                "peer",
                "name",
                end,
                "netns",
                wire,
            )
            ip("-n", host_ns, "addr", "add", f"{address}/24", "dev", iface)
            ip("-n", host_ns, "link", "set", iface, "up")
            ip("-n", wire, "link", "set", end, "up")
        ip("-n", wire, "link", "add", "br0", "type", "bridge")
        ip("-n", wire, "link", "set", "br0", "up")
        self.links[name] = link
        self.bridge(name)
        return link

    def bridge(self, name: str) -> None:
        """Let the kernel carry link ``name`` (a bridge in its wire), stopping any forwarder."""
        link = self.links[name]
        self._stop_forwarder(link)
        for end in link.ends:
            ip("-n", link.wire, "link", "set", end, "master", "br0")

    def shape(self, name: str, *, delay_ms: float, loss: float, log: Path) -> None:
        """Carry link ``name`` by the userspace wire instead: each frame delayed, some lost."""
        link = self.links[name]
        self._stop_forwarder(link)
        for end in link.ends:
            ip("-n", link.wire, "link", "set", end, "nomaster")
        args = [sys.executable, "-m", "tests.network.wire", *link.ends]
        args += ["--delay-ms", str(delay_ms), "--loss", str(loss)]
        link.forwarder = self.run(f"w-{name}", args, log=log)
        link.forwarder.wait_for_output("wire: forwarding", timeout_s=20)

    @staticmethod
    def _stop_forwarder(link: Link) -> None:
        if link.forwarder is not None:
            link.forwarder.stop(timeout_s=5)
            link.forwarder = None

    def reach(self, host: str) -> str:
        """An address of ``host`` that the test process (root namespace) can connect to."""
        if host not in self.control:
            subnet = f"10.77.{next(self._octets)}"
            root_end = f"ip{self.tag}c{len(self.control)}"
            ip(
                "link",
                "add",
                "name",
                root_end,
                "type",
                "veth",
                "peer",
                "name",
                "ctl0",
                "netns",
                self.ns(host),
            )
            self._root_ifaces.append(root_end)
            ip("addr", "add", f"{subnet}.1/24", "dev", root_end)
            ip("link", "set", root_end, "up")
            ip("-n", self.ns(host), "addr", "add", f"{subnet}.2/24", "dev", "ctl0")
            ip("-n", self.ns(host), "link", "set", "ctl0", "up")
            self.control[host] = (root_end, f"{subnet}.2")
        return self.control[host][1]

    def run(
        self, host: str, args: list[str], *, log: Path, env: dict[str, str] | None = None
    ) -> Proc:
        """Start ``args`` inside ``host``'s namespace (cwd: the repository)."""
        command = ["ip", "netns", "exec", self.ns(host), *args]
        return Proc(command, env=env or dict(os.environ), log=log, cwd=REPO)

    def destroy(self) -> None:
        """Remove every namespace (their veth ends go with them) and the control ends."""
        for link in self.links.values():
            self._stop_forwarder(link)
        for name in self._root_ifaces:
            with contextlib.suppress(RuntimeError):
                ip("link", "del", name, check=False)
        for name in reversed(self.namespaces):
            ip("netns", "del", name, check=False)
        self.namespaces.clear()
        with _taking:
            _taken.discard(self._block)
