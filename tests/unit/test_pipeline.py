from __future__ import annotations

from app.config import PumpEntryConfig
from app.record import AnalyticsRecord
from pumps.pipeline import build_pipeline, record_size_bytes, run_pipeline


def records(*names: str) -> list[AnalyticsRecord]:
    return [
        AnalyticsRecord(username=name, policies="P", deciders="D", id=f"b-{i}")
        for i, name in enumerate(names)
    ]


def entry(**fields: object) -> PumpEntryConfig:
    return PumpEntryConfig.model_validate({"type": "memory", **fields})


def test_no_filters_keeps_everything_and_the_details() -> None:
    kept, rejects = run_pipeline(
        build_pipeline(entry(), omit_detailed_globally=False), records("a", "b")
    )
    assert [r.username for r in kept] == ["a", "b"] and kept[0].policies == "P"
    assert rejects == []


def test_usernames_keeps_only_those_listed() -> None:
    steps = build_pipeline(entry(filters={"usernames": ["a", "c"]}), omit_detailed_globally=False)
    kept, _ = run_pipeline(steps, records("a", "b", "c"))
    assert [r.username for r in kept] == ["a", "c"]


def test_skip_usernames_wins_over_usernames() -> None:
    steps = build_pipeline(
        entry(filters={"usernames": ["a", "b"], "skip-usernames": ["b"]}),
        omit_detailed_globally=False,
    )
    kept, _ = run_pipeline(steps, records("a", "b", "c"))
    assert [r.username for r in kept] == ["a"]


def test_omit_detailed_per_pump_and_globally_does_not_touch_the_input() -> None:
    original = records("a")
    for steps in (
        build_pipeline(entry(**{"omit-detailed-recording": True}), omit_detailed_globally=False),
        build_pipeline(entry(), omit_detailed_globally=True),
    ):
        kept, _ = run_pipeline(steps, list(original))
        assert (kept[0].policies, kept[0].deciders) == ("", "")
    assert original[0].policies == "P"


def test_oversized_records_are_set_aside_with_the_reason() -> None:
    big = AnalyticsRecord(username="big", request="x" * 5000, id="b-1")
    small = AnalyticsRecord(username="small", id="b-2")
    steps = build_pipeline(entry(**{"max-record-size-bytes": 1000}), omit_detailed_globally=False)
    kept, rejects = run_pipeline(steps, [small, big])
    assert kept == [small]
    assert rejects[0][0] is big and "over the limit of 1000" in rejects[0][1]
    assert record_size_bytes(big) > 5000
