"""The dead-letters blocks: validated with their key paths, inherited, applied to batches."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.codec import decode_clean_batch, encode_clean_batch, records_to_clean_rows
from app.config import ConfigError, parse_settings
from app.record import AnalyticsRecord
from app.redaction import placeholder, scrub, treat_clean_batch, treat_raw
from tests.support import run_cli, write_config


def test_a_bad_value_stops_start_up_naming_the_key_path(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        {
            "dead-letters": {"request": "hide"},
            "pumps": {
                "csv": {
                    "type": "csv",
                    "dead-letters": {"policies": "redacted", "body": "drop"},
                    "meta": {"csv_dir": str(tmp_path)},
                }
            },
        },
    )
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 2, result
    assert "dead-letters.request: Input should be 'keep', 'redact' or 'drop'" in result.stderr
    assert "pumps.csv.dead-letters.policies: Input should be" in result.stderr
    assert "pumps.csv.dead-letters.body: unknown key" in result.stderr


def test_a_pumps_block_overrides_the_top_level_one_field_by_field() -> None:
    settings = parse_settings(
        "dead-letters: {request: redact}\n"
        "pumps:\n"
        "  a: {type: csv, dead-letters: {policies: drop}}\n"
        "  b: {type: csv, dead-letters: {request: keep}}\n"
        "  c: {type: csv}\n"
    )
    assert settings.dead_letter_fields("a") == {"request": "redact", "policies": "drop"}
    assert settings.dead_letter_fields("b") == {"request": "keep", "policies": "keep"}
    assert settings.dead_letter_fields("c") == {"request": "redact", "policies": "keep"}
    assert settings.dead_letter_fields("ingest") == {"request": "redact", "policies": "keep"}
    assert parse_settings("").dead_letter_fields("x") == {"request": "keep", "policies": "keep"}
    with pytest.raises(ConfigError):
        parse_settings("dead-letters: {deciders: drop}\n")


def test_a_treated_batch_keeps_everything_but_the_hidden_fields() -> None:
    expires = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    records = [
        AnalyticsRecord(
            1, f"u{i}", "allow", "ok", f"body-{i}", f"policy-{i}", "d", expires, f"b-{i}"
        )
        for i in range(3)
    ]
    payload = encode_clean_batch("b", records_to_clean_rows(records))
    treated, removed = treat_clean_batch(payload, {"request": "redact", "policies": "drop"})
    batch_id, back = decode_clean_batch(treated)
    assert batch_id == "b" and [r.id for r in back] == ["b-0", "b-1", "b-2"]
    assert [r.request for r in back] == ["[redacted: 6 bytes]"] * 3
    assert [r.policies for r in back] == ["", "", ""]
    assert [(r.username, r.deciders, r.expire_at) for r in back] == [
        (f"u{i}", "d", expires) for i in range(3)
    ]
    assert b"body-" not in treated and b"policy-" not in treated
    assert sorted(removed) == sorted(
        [f"body-{i}" for i in range(3)] + [f"policy-{i}" for i in range(3)]
    )
    assert placeholder("") == "" and placeholder("é") == "[redacted: 2 bytes]"


def test_raw_bytes_of_unknown_layout_are_not_kept_and_kept_bytes_are_untouched() -> None:
    assert treat_raw(b"\x00garbage SECRET", {"request": "drop"}) == (b"", [])
    assert treat_raw(b"\x00garbage SECRET", {"request": "keep", "policies": "keep"}) == (
        b"\x00garbage SECRET",
        [],
    )


def test_scrub_cuts_hidden_values_out_of_error_texts() -> None:
    text = "refused {'request': 'top-secret-body', 'n': 'ab'}"
    assert scrub(text, ["top-secret-body", "ab"]) == "refused {'request': '[redacted]', 'n': 'ab'}"


def test_the_reporter_logs_which_fields_cannot_be_encoded_not_the_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from app.analytics import Analytics

    record = AnalyticsRecord(username="u", request=object(), policies="SECRET-POLICY")  # type: ignore[arg-type]
    row = [1, "u", "", "", record.request, record.policies, "", None]
    assert Analytics._encodable([row]) == []
    assert "request (object)" in caplog.text
    assert "SECRET-POLICY" not in caplog.text
