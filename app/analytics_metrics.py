"""The reporter's counters as Prometheus metrics, for the host application's own registry.

Import :class:`ReporterCollector` from :mod:`app.analytics_stats` or :mod:`app.analytics`; it is
kept here so that only a reporter that exports metrics imports prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.analytics_stats import AnalyticsStats

__all__ = ["ReporterCollector"]


class _BufferOptions(Protocol):
    @property
    def records_buffer_size(self) -> int: ...


class _Reporter(Protocol):
    # What ReporterCollector reads of an app.analytics.Analytics.
    @property
    def options(self) -> _BufferOptions: ...

    def stats(self) -> AnalyticsStats: ...


class ReporterCollector(Collector):
    """The reporter's counters as Prometheus metrics, read at each scrape.

    A host application registers it in its own registry, next to its own metrics::

        registry.register(ReporterCollector(analytics))

    ``iam_pump_reporter_records_accepted_total`` (``record_hit`` returned True),
    ``..._shipped_total`` (handed to the broker or the Redis list), ``..._dropped_total``
    (refused: buffer full or stopped) and ``iam_pump_reporter_buffer_fill_ratio`` (records
    buffered or being shipped, over ``records-buffer-size``; at 1 ``record_hit`` refuses). No
    labels; a process with two reporters registers each in a registry of its own.
    """

    def __init__(self, reporter: _Reporter) -> None:
        self.reporter = reporter

    def collect(self) -> Iterator[Metric]:
        stats = self.reporter.stats()
        for name, documentation, value in (
            ("accepted", "Records record_hit accepted.", stats.accepted),
            ("shipped", "Records shipped to the broker or the Redis list.", stats.shipped_records),
            ("dropped", "Records record_hit refused (buffer full, or stopped).", stats.dropped),
        ):
            counter = CounterMetricFamily(f"iam_pump_reporter_records_{name}", documentation)
            counter.add_metric([], value)
            yield counter
        size = self.reporter.options.records_buffer_size
        fill = GaugeMetricFamily(
            "iam_pump_reporter_buffer_fill_ratio",
            "Records buffered or being shipped, over records-buffer-size (1: record_hit refuses).",
        )
        fill.add_metric([], min(1.0, (stats.buffered + stats.pending) / size) if size else 0.0)
        yield fill
