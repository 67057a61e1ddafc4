"""Record transforms that run before a pump writes: filters, omit-detailed, size limit.

Each step takes the records and returns those to keep; a step may set records aside with a reason
(they become dead letters). Steps are plain callables built once per pump from its config, and run
once per batch per pump, outside the pumps, on the write task's own copy of the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from app.config import PumpEntryConfig
from app.record import AnalyticsRecord

Rejects = list[tuple[AnalyticsRecord, str]]
Step = Callable[[list[AnalyticsRecord], Rejects], list[AnalyticsRecord]]

#: Bytes a record costs beyond its strings (timestamp, expiry, id, framing).
_RECORD_OVERHEAD_BYTES = 64


def username_filter(usernames: Sequence[str], skip_usernames: Sequence[str]) -> Step | None:
    """Keep records whose username is listed (if any are) and not skipped; skip wins."""
    keep = frozenset(usernames)
    skip = frozenset(skip_usernames)
    if not keep and not skip:
        return None

    def step(records: list[AnalyticsRecord], rejects: Rejects) -> list[AnalyticsRecord]:
        return [
            record
            for record in records
            if record.username not in skip and (not keep or record.username in keep)
        ]

    return step


def omit_detailed(records: list[AnalyticsRecord], rejects: Rejects) -> list[AnalyticsRecord]:
    """Clear ``policies`` and ``deciders`` (iam's omit-detailed-recording)."""
    return [dataclasses.replace(record, policies="", deciders="") for record in records]


def record_size_bytes(record: AnalyticsRecord) -> int:
    """An estimate of a record's stored size: its UTF-8 strings plus a fixed overhead."""
    return _RECORD_OVERHEAD_BYTES + sum(
        len(text.encode("utf-8"))
        for text in (
            record.username,
            record.effect,
            record.conclusion,
            record.request,
            record.policies,
            record.deciders,
        )
    )


def size_limit(max_bytes: int) -> Step:
    """Set aside records larger than ``max_bytes``."""

    def step(records: list[AnalyticsRecord], rejects: Rejects) -> list[AnalyticsRecord]:
        kept = []
        for record in records:
            size = record_size_bytes(record)
            if size > max_bytes:
                rejects.append((record, f"record is {size} bytes, over the limit of {max_bytes}"))
            else:
                kept.append(record)
        return kept

    return step


def build_pipeline(
    entry: PumpEntryConfig, *, omit_detailed_globally: bool, size_limit_step: bool = True
) -> list[Step]:
    """The steps for one pump, in order: filter first, so dropped records cost nothing more.

    ``size_limit_step=False`` leaves out ``max-record-size-bytes`` for a pump that handles record
    size itself.
    """
    steps: list[Step] = []
    filter_step = username_filter(entry.filters.usernames, entry.filters.skip_usernames)
    if filter_step is not None:
        steps.append(filter_step)
    if entry.omit_detailed_recording or omit_detailed_globally:
        steps.append(omit_detailed)
    if size_limit_step:
        steps.append(size_limit(entry.max_record_size_bytes))
    return steps


def run_pipeline(
    steps: Sequence[Step], records: list[AnalyticsRecord]
) -> tuple[list[AnalyticsRecord], Rejects]:
    """Apply the steps; return the records to write and those set aside with their reasons."""
    rejects: Rejects = []
    for step in steps:
        records = step(records, rejects)
    return records, rejects
