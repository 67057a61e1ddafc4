"""The reporter's counters, as a snapshot (:class:`AnalyticsStats`).

Re-exported by :mod:`app.analytics`; import it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AnalyticsStats"]


@dataclass(frozen=True, slots=True)
class AnalyticsStats:
    """A snapshot of the reporter's counters."""

    shipped_records: int
    shipped_batches: int
    buffered: int
    pending: int
    dropped_buffer_full: int
    dropped_after_stop: int
    rejected: int
    lost_at_stop: int
    ship_failures: int

    @property
    def accepted(self) -> int:
        """Records ``record_hit`` accepted (returned True for)."""
        return (
            self.shipped_records + self.buffered + self.pending + self.rejected + self.lost_at_stop
        )

    @property
    def dropped(self) -> int:
        """Records ``record_hit`` refused."""
        return self.dropped_buffer_full + self.dropped_after_stop
