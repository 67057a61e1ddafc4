"""A userspace wire between two interfaces: each frame is delayed and, with some probability, lost.

The kernel here has no ``netem`` qdisc, so this process stands in for it: run inside a "wire"
namespace holding two veth ends (no bridge), it reads every frame arriving on one end with an
``AF_PACKET`` socket and sends it out of the other after ``--delay-ms``, dropping a share
``--loss`` of them at random. The hosts at both ends see real delay and real loss, which their
TCP stacks retransmit. Frames keep their virtio-net header (``PACKET_VNET_HDR``), so checksum
offload and segmentation offload pass through untouched.

    python -m tests.network.wire IFACE_A IFACE_B --delay-ms 5 --loss 0.01
"""

from __future__ import annotations

import argparse
import random
import socket
import threading
import time
from collections import deque

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
MAX_FRAME = 65536 + 64


def _socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((interface, 0))
    return sock


class Direction:
    """Frames from one socket to the other: a reader queues them, a sender sends them when due."""

    def __init__(
        self, source: socket.socket, target: socket.socket, *, delay_s: float, loss: float
    ) -> None:
        self.source, self.target = source, target
        self.delay_s, self.loss = delay_s, loss
        self.queue: deque[tuple[float, bytes]] = deque()
        self.ready = threading.Condition()
        self.forwarded = self.dropped = 0

    def read(self) -> None:
        while True:
            frame, address = self.source.recvfrom(MAX_FRAME)
            if address[2] == PACKET_OUTGOING:
                continue  # a frame this process sent out of the source interface
            if self.loss and random.random() < self.loss:
                self.dropped += 1
                continue
            with self.ready:
                self.queue.append((time.monotonic() + self.delay_s, frame))
                self.ready.notify()

    def send(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                due, frame = self.queue.popleft()
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                self.target.send(frame)
                self.forwarded += 1
            except OSError:
                self.dropped += 1


def main() -> None:
    """Forward frames both ways between two interfaces until killed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    args = parser.parse_args()
    a, b = _socket(args.a), _socket(args.b)
    threads = []
    for source, target in ((a, b), (b, a)):
        direction = Direction(source, target, delay_s=args.delay_ms / 1000, loss=args.loss)
        threads += [
            threading.Thread(target=direction.read),
            threading.Thread(target=direction.send),
        ]
    for thread in threads:
        thread.daemon = True
        thread.start()
    print("wire: forwarding", flush=True)
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
