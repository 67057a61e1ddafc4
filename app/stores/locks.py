"""A lock in Redis: ``SET key token NX PX ttl``, released only by its holder (compare-and-delete).

Used wherever two copies of a job must not overlap across processes or machines: the purge of
iam's list, the fan-out of one batch, the write of one claim (a lease, extended while it
runs). A holder that dies leaves the lock to expire after its TTL.
"""

from __future__ import annotations

import uuid

import redis

# KEYS: the lock; ARGV: the token. Deletes the lock only if it is still the caller's.
_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: the lock; ARGV: the token, ttl ms. Extends the lock only if it is still the caller's.
_EXTEND_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""


class RedisLock:
    """One attempt at one lock; ``token`` is what the holder proves itself with."""

    def __init__(self, client: redis.Redis, key: str, *, ttl_ms: int) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = uuid.uuid4().hex

    def acquire(self) -> bool:
        """Take the lock if it is free; True when taken."""
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def acquire_in(self, pipe: redis.client.Pipeline) -> None:
        """Queue :meth:`acquire` on ``pipe`` (same server): its answer is truthy when taken."""
        pipe.set(self.key, self.token, nx=True, px=self.ttl_ms)

    def release(self) -> bool:
        """Give the lock up if it is still ours; True when it was."""
        return bool(self.client.eval(_RELEASE_IF_OWNER, 1, self.key, self.token))

    def release_in(self, pipe: redis.client.Pipeline) -> None:
        """Queue :meth:`release` on ``pipe`` (same server): its answer is 1 when it was ours."""
        pipe.eval(_RELEASE_IF_OWNER, 1, self.key, self.token)

    def extend(self) -> bool:
        """Give a lock still ours its full TTL again; False when it was lost (expired, taken)."""
        return bool(self.client.eval(_EXTEND_IF_OWNER, 1, self.key, self.token, self.ttl_ms))

    def left_ms(self) -> int:
        """How long the lock, whoever holds it, has left; 0 when nobody does."""
        return max(0, int(self.client.pttl(self.key)))
