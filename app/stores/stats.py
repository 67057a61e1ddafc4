"""The counters every worker adds to, in one Redis hash (``<prefix>:stats``).

The counter names are defined here once; the tasks add to them and ``/metrics`` and
``iam-pump status`` read them back. A per-pump (or per dead-letter group) counter is stored as
``<name>:<pump>``.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from enum import StrEnum

import redis

from app.config import Settings
from app.stores.values import as_text

logger = logging.getLogger(__name__)


class Counter(StrEnum):
    """Counters of the whole pipeline."""

    INGESTED_BATCHES = "ingested_batches"
    INGESTED_RECORDS = "ingested_records"
    MALFORMED_RECORDS = "malformed_records"
    PURGED_RECORDS = "purged_records"
    LOST_BATCHES = "lost_batches"
    RESENT_TASKS = "resent_tasks"


class PumpCounter(StrEnum):
    """Counters kept per pump (dead letters: per group, a pump name or ``ingest``)."""

    WRITTEN_RECORDS = "written_records"
    WRITTEN_BATCHES = "written_batches"
    RETRIES = "retries"
    DEAD_LETTERED_RECORDS = "dead_lettered_records"


def per_pump(counter: PumpCounter, pump: str) -> str:
    """The stored name of a per-pump counter."""
    return f"{counter}:{pump}"


#: Upper bounds (seconds) of the buckets of the write-duration histogram; the last bucket,
#: above the largest bound, is ``+Inf``. A pump's default timeout is 30 s (hard limit 35 s).
WRITE_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Stored names of the histogram: one counter per bucket (not cumulative), index ``len(bounds)``
#: for ``+Inf``, and the sum in whole microseconds (the hash holds integers only).
_DURATION_BUCKET_PREFIX = "write_duration_bucket_"
_DURATION_SUM_US = "write_duration_sum_us"


def is_write_duration(name: str) -> bool:
    """Whether counter ``name`` is part of the write-duration histogram (a bucket or the sum)."""
    return name.startswith((_DURATION_BUCKET_PREFIX, _DURATION_SUM_US))


def write_duration(pump: str, seconds: float) -> dict[str, int]:
    """The counter additions that observe one write of ``pump`` lasting ``seconds``; give them
    to :meth:`Stats.add` (alone or with other counts)."""
    index = bisect.bisect_left(WRITE_DURATION_BUCKETS_S, seconds)
    return {
        f"{_DURATION_BUCKET_PREFIX}{index}:{pump}": 1,
        f"{_DURATION_SUM_US}:{pump}": max(0, round(seconds * 1_000_000)),
    }


@dataclass(frozen=True, slots=True)
class DurationHistogram:
    """One pump's write durations: cumulative ``(upper bound, count)`` pairs ending with
    ``+Inf``, and the sum in seconds, in the form Prometheus histograms take."""

    buckets: list[tuple[float, int]]
    sum_s: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1]


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """The counters as read at one moment."""

    values: dict[str, int]

    def total(self, counter: Counter) -> int:
        """A pipeline counter's value (0 when never added to)."""
        return self.values.get(counter, 0)

    def by_pump(self, counter: PumpCounter) -> dict[str, int]:
        """A per-pump counter's value for every pump that has one."""
        prefix = f"{counter}:"
        return {
            name[len(prefix) :]: value
            for name, value in self.values.items()
            if name.startswith(prefix) and len(name) > len(prefix)
        }

    def write_durations(self) -> dict[str, DurationHistogram]:
        """The write-duration histogram of every pump that has one."""
        bounds = [*WRITE_DURATION_BUCKETS_S, math.inf]
        per_bucket: dict[str, list[int]] = {}
        sums: dict[str, int] = {}
        for name, value in self.values.items():
            field, _, pump = name.partition(":")
            if not pump:
                continue
            if field == _DURATION_SUM_US:
                sums[pump] = value
            elif field.startswith(_DURATION_BUCKET_PREFIX):
                index = field.removeprefix(_DURATION_BUCKET_PREFIX)
                if index.isdigit() and int(index) < len(bounds):
                    counts = per_bucket.setdefault(pump, [0] * len(bounds))
                    counts[int(index)] += value
        histograms = {}
        for pump, counts in per_bucket.items():
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                cumulative.append((bound, running))
            histograms[pump] = DurationHistogram(cumulative, sums.get(pump, 0) / 1_000_000)
        return histograms


class Stats:
    """Adds to and reads the counters; each call is one Redis round trip."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._client = client
        self.key = settings.key("stats")

    def add(self, counts: dict[str, int], *, pipe: redis.client.Pipeline | None = None) -> None:
        """Add to several counters at once (names from :class:`Counter` / :func:`per_pump`).

        With ``pipe`` the additions join that pipeline (and its transaction) instead.
        A full Redis (OOM) costs the additions, not the work they count: they are logged and
        dropped, so a batch already written is not put back and written again for a counter.
        """
        target = pipe if pipe is not None else self._client.pipeline(transaction=False)
        for name, amount in counts.items():
            target.hincrby(self.key, name, amount)
        if pipe is None:
            try:
                target.execute()
            except redis.exceptions.OutOfMemoryError as exc:
                logger.warning("counters %s not added, Redis is full: %s", counts, exc)

    def check(self, counts: dict[str, int], results: list[object]) -> None:
        """The answers of additions queued with ``pipe`` and executed with
        ``raise_on_error=False``: a full Redis (OOM) is logged, as in :meth:`add`; any other
        error raises."""
        for result in results:
            if isinstance(result, redis.exceptions.OutOfMemoryError):
                logger.warning("counters %s not added, Redis is full: %s", counts, result)
                return
            if isinstance(result, Exception):
                raise result

    def read(self) -> StatsSnapshot:
        """Every counter now."""
        raw = self._client.hgetall(self.key)
        return StatsSnapshot({as_text(name): int(value) for name, value in raw.items()})
