"""Whether a Redis server we keep batches on may evict them: its ``maxmemory-policy``.

Held envelopes, clean batches, dead letters, the queues of a Redis broker and iam's list have no
expiry: under an ``allkeys-*`` policy a full Redis evicts them, and the records in them are gone.
A ``volatile-*`` policy evicts only keys with an expiry, which here are the markers that say a
batch is done or which pumps already got it; without them a redelivered task may deliver its
batch again (or report it lost). ``noeviction`` (writes fail while Redis is full, and the
workers and the reporter hold and retry) or no ``maxmemory`` at all is what iam-pump expects.

:func:`check_servers` reads each server's settings with ``CONFIG GET`` and judges them; a server
that refuses ``CONFIG`` (a managed Redis, or an ACL user without it) cannot be checked, which is
reported as such. The worker refuses to start on :attr:`Verdict.REFUSE`
(``delivery.allow-evicting-redis: true`` turns that into a warning), ``iam-pump status`` prints
every finding.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.cluster import RedisCluster

from app.config import Settings

ALLOW_KEY = "delivery.allow-evicting-redis"
NOEVICTION = "noeviction"


class Verdict(enum.Enum):
    """How a server's eviction settings stand."""

    OK = "ok"
    #: Could not be checked, or evicts only keys with an expiry: a warning.
    WARN = "warning"
    #: May evict held batches: the worker does not start.
    REFUSE = "refused"


@dataclass(frozen=True, slots=True)
class Finding:
    """One server's verdict and the sentence that explains it."""

    server: str
    verdict: Verdict
    message: str


def judge(server: str, policy: str, maxmemory: int, *, allow_evicting: bool = False) -> Finding:
    """The verdict on a server with ``maxmemory-policy`` ``policy`` and ``maxmemory`` bytes."""
    said = f"{server} has maxmemory-policy {policy}, maxmemory {maxmemory}"
    if maxmemory == 0 or policy == NOEVICTION:
        return Finding(server, Verdict.OK, f"{said}: nothing is evicted")
    if policy.startswith("allkeys-"):
        advice = (
            f"it may evict held batches, envelopes, queues and dead letters, which have no "
            f"expiry, and lose their records; set maxmemory-policy {NOEVICTION} (CONFIG SET "
            f"maxmemory-policy {NOEVICTION}, and in redis.conf)"
        )
        if allow_evicting:
            return Finding(
                server, Verdict.WARN, f"{said}: {advice}. Starting anyway: {ALLOW_KEY} is true"
            )
        return Finding(
            server, Verdict.REFUSE, f"{said}: {advice}, or set {ALLOW_KEY}: true to run anyway"
        )
    return Finding(
        server,
        Verdict.WARN,
        f"{said}: when full it evicts keys with an expiry, the markers of batches already "
        f"done, so a redelivered batch may be delivered twice or reported lost; "
        f"maxmemory-policy {NOEVICTION} avoids that",
    )


def check_server(server: str, client: redis.Redis, *, allow_evicting: bool = False) -> Finding:
    """Read one server's eviction settings and judge them; a refused or failed ``CONFIG GET``
    gives a warning that the policy could not be checked."""
    if isinstance(client, RedisCluster):
        return _check_cluster(server, client, allow_evicting=allow_evicting)
    try:
        # One round trip, one pattern (Redis before 7 takes only one).
        answer = client.config_get("maxmemory*")
        policy, maxmemory = answer.get("maxmemory-policy"), answer.get("maxmemory")
    except redis.RedisError as exc:
        return Finding(
            server,
            Verdict.WARN,
            f"{server}: could not check its maxmemory-policy ({exc}); make sure it is {NOEVICTION}",
        )
    if policy is None or maxmemory is None:
        return Finding(
            server,
            Verdict.WARN,
            f"{server}: CONFIG GET did not tell its maxmemory-policy; make sure it is {NOEVICTION}",
        )
    return judge(server, str(policy), int(maxmemory), allow_evicting=allow_evicting)


def _check_cluster(server: str, client: RedisCluster, *, allow_evicting: bool) -> Finding:
    # Every master of a Redis Cluster, judged one by one; the worst verdict speaks for all.
    try:
        # Several masters answer {node: {name: value}}; redis-py's hint knows one answer only.
        answers = cast(
            dict[str, Any], client.config_get("maxmemory*", target_nodes=RedisCluster.PRIMARIES)
        )
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        return Finding(
            server,
            Verdict.WARN,
            f"{server}: could not check its maxmemory-policy ({exc}); make sure it is {NOEVICTION}",
        )
    if answers and "maxmemory" in answers:  # one master answered for itself
        answers = {server: answers}
    findings = []
    for node, answer in sorted(answers.items()):
        policy, maxmemory = answer.get("maxmemory-policy"), answer.get("maxmemory")
        name = f"{server}, node {node}"
        if policy is None or maxmemory is None:
            findings.append(
                Finding(name, Verdict.WARN, f"{name}: CONFIG GET did not tell its maxmemory-policy")
            )
        else:
            findings.append(judge(name, str(policy), int(maxmemory), allow_evicting=allow_evicting))
    order = [Verdict.REFUSE, Verdict.WARN, Verdict.OK]
    worst = min(findings, key=lambda finding: order.index(finding.verdict))
    return Finding(server, worst.verdict, worst.message)


def check_servers(settings: Settings, servers: Sequence[tuple[str, redis.Redis]]) -> list[Finding]:
    """Judge each named server (:func:`app.stores.clients.batch_servers`)."""
    allow = settings.delivery.allow_evicting_redis
    return [check_server(name, client, allow_evicting=allow) for name, client in servers]
