"""The dead-letter store: batches and records that could not be delivered, kept with the reason.

Entries live in Redis (the ``redis:`` server), one hash per group,
``<prefix>:dead-letters:<group>``, where the group is a pump name, or ``ingest`` for records that
could not even be decoded. Entry ids
are deterministic (batch id, stage), so a batch dead-lettered twice after a redelivery is kept once.

An entry holds either a clean batch (``payload``, replayable into its pump's queue) or, for input
that could not be decoded, the raw bytes of each bad record (``raw``), kept for inspection only.
Every entry adds its records to the ``dead_lettered_records:<group>`` counter in the same
transaction.

Before an entry is kept, ``request`` and ``policies`` are treated as the group's
``dead-letters`` settings say (:mod:`app.redaction`); the entry's ``redacted`` tells which were
hidden and how, so ``show`` and ``replay`` can say so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import redis

from app.codec import Rejected, encode_clean_batch, records_to_clean_rows
from app.config import Settings
from app.record import AnalyticsRecord
from app.redaction import hidden, scrub, treat_clean_batch, treat_raw
from app.stores.stats import Counter, PumpCounter, Stats, per_pump
from app.stores.values import as_bytes, as_text

logger = logging.getLogger(__name__)

INGEST_GROUP = "ingest"
#: The stage of an entry that records bytes gone from Redis (nothing to replay).
LOST_STAGE = "lost"


@dataclass(slots=True)
class DeadLetter:
    """One dead-letter entry."""

    id: str
    group: str
    stage: str
    batch_id: str
    error: str
    failed_at: float
    record_count: int
    attempts: int = 0
    payload: bytes | None = None
    raw: list[bytes] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    #: Fields hidden before the entry was kept: {"request": "redact", "policies": "drop"}.
    redacted: dict[str, str] = field(default_factory=dict)

    @classmethod
    def new(
        cls, group: str, batch_id: str, *, stage: str, error: str, record_count: int, **rest: Any
    ) -> DeadLetter:
        """An entry failing now; its id, ``<batch id>:<stage>``, is the same on a redelivery."""
        return cls(
            id=f"{batch_id}:{stage}",
            group=group,
            stage=stage,
            batch_id=batch_id,
            error=error,
            failed_at=time.time(),
            record_count=record_count,
            **rest,
        )

    @property
    def replayable(self) -> bool:
        """True when the entry holds a batch that its pump can be asked to write again."""
        return self.payload is not None and self.group != INGEST_GROUP

    def pack(self) -> bytes:
        """The entry as stored."""
        return bytes(
            msgpack.packb(
                {
                    "id": self.id,
                    "group": self.group,
                    "stage": self.stage,
                    "batch_id": self.batch_id,
                    "error": self.error,
                    "failed_at": self.failed_at,
                    "record_count": self.record_count,
                    "attempts": self.attempts,
                    "payload": self.payload,
                    "raw": self.raw,
                    "reasons": self.reasons,
                    "redacted": self.redacted,
                }
            )
        )

    @classmethod
    def unpack(cls, data: bytes) -> DeadLetter:
        """An entry from its stored bytes."""
        fields: dict[str, Any] = msgpack.unpackb(data, raw=False)
        return cls(**fields)


class DeadLetterStore:
    """Reads and writes dead letters; every write is one Redis round trip."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._redis = client
        self._settings = settings
        self._stats = Stats(client, settings)

    def _key(self, group: str) -> str:
        return self._settings.key("dead-letters", group)

    @property
    def _groups_key(self) -> str:
        return self._settings.key("dead-letters")

    def put(self, entry: DeadLetter) -> None:
        """Keep an entry (replacing one with the same id), its fields treated as configured."""
        entry = self._treated(entry)
        pipe = self._redis.pipeline(transaction=True)
        pipe.sadd(self._groups_key, entry.group)
        pipe.hset(self._key(entry.group), entry.id, entry.pack())
        counts = {per_pump(PumpCounter.DEAD_LETTERED_RECORDS, entry.group): entry.record_count}
        if entry.stage == LOST_STAGE:
            counts[Counter.LOST_BATCHES] = 1
        self._stats.add(counts, pipe=pipe)
        pipe.execute()

    def _treated(self, entry: DeadLetter) -> DeadLetter:
        # Hide what the group's settings say in the records, the raw bytes and the error texts.
        treatments = hidden(self._settings.dead_letter_fields(entry.group))
        if not treatments or entry.redacted:
            return entry
        removed: list[str] = []
        payload = entry.payload
        if payload is not None:
            payload, removed = treat_clean_batch(payload, treatments)
        raw = []
        for item in entry.raw:
            kept, values = treat_raw(item, treatments)
            raw.append(kept)
            removed += values
        return replace(
            entry,
            payload=payload,
            raw=raw,
            error=scrub(entry.error, removed),
            reasons=[scrub(reason, removed) for reason in entry.reasons],
            redacted=dict(treatments),
        )

    def put_batch(
        self,
        group: str,
        batch_id: str,
        payload: bytes,
        *,
        stage: str,
        error: str,
        record_count: int,
        attempts: int = 0,
    ) -> DeadLetter:
        """Keep a whole clean batch that pump ``group`` failed to write."""
        entry = DeadLetter.new(
            group,
            batch_id,
            stage=stage,
            error=error,
            record_count=record_count,
            attempts=attempts,
            payload=payload,
        )
        self.put(entry)
        return entry

    def put_records(
        self,
        group: str,
        batch_id: str,
        rejects: Sequence[tuple[AnalyticsRecord, str]],
        *,
        stage: str,
    ) -> DeadLetter:
        """Keep records a pump's pipeline or sink refused one by one, as a replayable batch."""
        reasons = [reason for _, reason in rejects]
        entry = DeadLetter.new(
            group,
            batch_id,
            stage=stage,
            error=reasons[0],
            record_count=len(rejects),
            payload=encode_clean_batch(batch_id, records_to_clean_rows(r for r, _ in rejects)),
            reasons=reasons,
        )
        self.put(entry)
        return entry

    def put_malformed(
        self, batch_id: str, rejected: Sequence[Rejected], *, error: str | None = None
    ) -> DeadLetter:
        """Keep input that could not be decoded, byte for byte, with each reason."""
        reasons = [item.reason for item in rejected]
        entry = DeadLetter.new(
            INGEST_GROUP,
            batch_id,
            stage="ingest",
            error=error or reasons[0],
            record_count=len(rejected),
            raw=[item.raw for item in rejected],
            reasons=reasons,
        )
        self.put(entry)
        return entry

    def put_lost(self, group: str, batch_id: str, error: str) -> DeadLetter:
        """Record that a task found its batch's bytes gone from Redis (nothing to replay)."""
        logger.error("%s: %s; its records cannot be delivered", group, error)
        entry = DeadLetter.new(group, batch_id, stage=LOST_STAGE, error=error, record_count=0)
        self.put(entry)
        return entry

    def groups(self) -> list[str]:
        """Every group that has ever held an entry (sorted)."""
        return sorted(as_text(name) for name in self._redis.smembers(self._groups_key))

    def entries(self, group: str) -> list[DeadLetter]:
        """A group's entries, oldest first."""
        values = self._redis.hvals(self._key(group))
        return sorted((DeadLetter.unpack(as_bytes(v)) for v in values), key=lambda e: e.failed_at)

    def get(self, group: str, entry_id: str) -> DeadLetter | None:
        """One entry, or None."""
        value = self._redis.hget(self._key(group), entry_id)
        return DeadLetter.unpack(as_bytes(value)) if value is not None else None

    def delete(self, group: str, entry_ids: Iterable[str]) -> int:
        """Remove entries; returns how many existed."""
        ids = list(entry_ids)
        return int(self._redis.hdel(self._key(group), *ids)) if ids else 0

    def count(self, group: str) -> int:
        """How many entries a group holds."""
        return int(self._redis.hlen(self._key(group)))
