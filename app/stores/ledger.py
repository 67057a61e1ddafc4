"""The ledger: every claim on kept batch bytes, with when it last made progress.

A task message can be lost where no acknowledgement protects it: kombu's Redis transport pops a
message (``BRPOP``) before it records it in ``unacked``, so a worker or a Redis server dying in
between loses it; a broker restarted without persistence or an operator purging a queue loses
them all. The bytes of such a batch are still kept (:mod:`app.stores.batches`) with the claim of
the pump that has not written them. The ledger makes that claim something a sweep can act on.

* ``<prefix>:ledger`` (sorted set): member ``<claim>|<key>`` (``ingest|<envelope key>`` or
  ``pump:<name>|<batch key>``), score the Unix time of the claim's last progress. A member is added
  in the same transaction that keeps the bytes, and removed in the one that releases the claim, so
  the ledger and the stores never disagree, whatever crashes in between.
* Progress is: the claim was made, a task for it started, a running write's heartbeat, a retry
  was scheduled, the sweep found its task waiting in a queue, or the sweep sent it again.
* ``<prefix>:lease:<claim>|<key>`` (string, token, expires): held by the one write running for a
  claim and renewed by its heartbeat, so two copies of a task (a re-sent one, or one kombu restored
  while the first still runs) never write the same batch at the same time.

Scores are the clocks of the processes that write them; the windows they are compared with are
minutes, so clocks need only roughly agree.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis

from app.stores.locks import RedisLock
from app.stores.values import as_text

logger = logging.getLogger(__name__)

LEDGER_KIND = "ledger"
LEASE_KIND = "lease"
_SEPARATOR = "|"


def ledger_member(claim: str, key: str) -> str:
    """The ledger's name for ``claim`` on the bytes at ``key``."""
    return f"{claim}{_SEPARATOR}{key}"


def split_member(member: str) -> tuple[str, str]:
    """``(claim, key)`` of a ledger member."""
    claim, _, key = member.partition(_SEPARATOR)
    return claim, key


class Ledger:
    """The ledger of one key prefix on the Redis server that keeps the batch bytes."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._client = client
        self._prefix = key_prefix
        self.key = f"{key_prefix}:{LEDGER_KIND}"

    def lease_key(self, member: str) -> str:
        """The key of the lease of the write running for ``member``."""
        return f"{self._prefix}:{LEASE_KIND}:{member}"

    def touch(self, members: Iterable[str], *, now: float | None = None) -> None:
        """Record progress on claims still owed (settled ones are not brought back)."""
        scores = {member: time.time() if now is None else now for member in members}
        if scores:
            self._client.zadd(self.key, scores, xx=True)

    def stale(self, older_than_s: float, *, limit: int = 1000) -> list[tuple[str, float]]:
        """Claims with no progress for ``older_than_s`` seconds, oldest first."""
        cutoff = time.time() - older_than_s
        found: list[Any] = self._client.zrangebyscore(
            self.key, "-inf", cutoff, start=0, num=limit, withscores=True
        )
        return [(as_text(member), float(score)) for member, score in found]

    def progress_of(self, member: str) -> float | None:
        """When ``member`` last made progress; None when it is settled."""
        score = self._client.zscore(self.key, member)
        return None if score is None else float(score)

    def owed(self) -> int:
        """How many claims are owed (status, metrics, tests)."""
        return int(self._client.zcard(self.key))

    def oldest(self) -> float | None:
        """The last progress of the claim that has waited longest; None when none is owed."""
        found: list[Any] = self._client.zrange(self.key, 0, 0, withscores=True)
        return float(found[0][1]) if found else None

    def lease(self, member: str, ttl_ms: int) -> RedisLock:
        """A lease on the write of ``member`` (not yet taken)."""
        return RedisLock(self._client, self.lease_key(member), ttl_ms=ttl_ms)


#: How often a running write renews its lease and records progress in the ledger.
HEARTBEAT_INTERVAL_S = 5.0
#: How long a write's lease outlives a holder that stopped renewing it (killed, frozen).
LEASE_TTL_MS = 20_000


class Heartbeat:
    """Renews the leases of the writes running in this process and keeps their claims fresh in
    the ledger, from one daemon thread started on first use (after the worker's fork)."""

    def __init__(self, ledger: Ledger, *, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self._ledger = ledger
        self._interval_s = interval_s
        self._running: dict[str, RedisLock] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, member: str, lease: RedisLock) -> None:
        """Keep ``member``'s lease and ledger entry fresh until :meth:`remove`."""
        with self._guard:
            self._running[member] = lease
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name="iam-pump-heartbeat", daemon=True
                )
                self._thread.start()

    def remove(self, member: str) -> None:
        """The write of ``member`` is over."""
        with self._guard:
            self._running.pop(member, None)

    def beat(self) -> None:
        """One round: extend every lease, record progress for every claim."""
        with self._guard:
            running = dict(self._running)
        if not running:
            return
        try:
            for member, lease in running.items():
                if not lease.extend():
                    logger.warning("lease of %s was lost while its write ran", member)
            self._ledger.touch(running)
        except redis.RedisError as exc:
            logger.warning("heartbeat: Redis unavailable (%s); trying again", exc)

    def stop(self) -> None:
        """Stop the thread (process shutdown)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.beat()
