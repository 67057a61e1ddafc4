from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.record import AnalyticsRecord
from pumps.deadline import MIN_OPERATION_BUDGET_S, TIMEOUT_MARGIN_S, Deadline
from pumps.errors import PumpTemporaryError
from tests.plugins.slow_csv import SlowCSVPump


def test_a_deadline_counts_down_and_expires() -> None:
    deadline = Deadline.after(10)
    assert 9 < deadline.remaining_s() <= 10 and not deadline.expired
    assert deadline.operation_budget_s() == pytest.approx(10 - TIMEOUT_MARGIN_S, abs=0.5)
    past = Deadline.after(-1)
    assert past.expired and past.remaining_s() == 0
    assert past.operation_budget_s() == MIN_OPERATION_BUDGET_S


def test_the_slow_pump_stops_at_its_deadline(tmp_path: Path) -> None:
    pump = SlowCSVPump.create("slow", {"csv_dir": str(tmp_path), "delay_s": 30}, timeout_s=1)
    started = time.monotonic()
    with pytest.raises(PumpTemporaryError, match="longer than the pump timeout"):
        pump.write([AnalyticsRecord(username="a")], deadline=Deadline.after(0.2))
    assert time.monotonic() - started < 2
    assert not list(tmp_path.glob("*.csv"))


def test_the_slow_pump_can_sleep_through_its_deadline(tmp_path: Path) -> None:
    meta = {"csv_dir": str(tmp_path), "delay_s": 0.3, "ignore_soft_limit": True}
    pump = SlowCSVPump.create("slow", meta, timeout_s=1)
    assert pump.meta.ignore_deadline
    started = time.monotonic()
    assert pump.write([AnalyticsRecord(username="a")], deadline=Deadline.after(0)).rejected == []
    assert time.monotonic() - started >= 0.3
