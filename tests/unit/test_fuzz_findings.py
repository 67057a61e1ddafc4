"""Inputs the decoders once failed on with an undocumented error (found by fuzzing, fuzz/).

Each decoder may raise only its documented error: MalformedRecordError, MalformedBatchError or
ConfigError; a bad record inside a good batch comes back as a Rejected with its reason.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest

from app.codec import (
    MalformedBatchError,
    decode_clean_batch,
    decode_envelope,
    encode_clean_batch,
    encode_envelope,
    record_to_row,
)
from app.config import parse_settings
from app.errors import ConfigError
from app.record import AnalyticsRecord
from pumps.settings import load_pump_settings

GOOD_ROW = record_to_row(AnalyticsRecord(1_700_000_000, "alice", "allow", "ok", "{}", "[]", "[]"))


def test_an_envelope_id_that_is_not_utf8_is_a_malformed_batch() -> None:
    # It used to come back as an id with surrogates, which ingest then failed to re-encode.
    payload = encode_envelope("batch-\u00e9", [GOOD_ROW]).replace(b"\xc3\xa9", b"\xff\xfe")
    with pytest.raises(MalformedBatchError, match="not valid UTF-8"):
        decode_envelope(payload)


def test_a_go_item_that_is_not_bytes_and_not_utf8_is_rejected() -> None:
    # The reject's raw form was packed strictly and raised UnicodeEncodeError.
    payload = msgpack.packb({"id": "b", "go": [["\udcff"]]}, unicode_errors="surrogatepass")
    batch_id, good, rejected = decode_envelope(payload)
    assert (batch_id, good) == ("b", [])
    assert [(reject.position, reject.reason) for reject in rejected] == [
        (0, "Go record is not bytes")
    ]


def test_a_row_nested_deeper_than_repr_can_go_is_rejected() -> None:
    # The reason quoted repr(row), which raised RecursionError.
    nested = b"\x91" * 1000 + b"\xc0"
    payload = msgpack.packb({"id": "b", "records": []})[:-1] + b"\x91" + nested
    batch_id, good, rejected = decode_envelope(payload)
    assert (batch_id, good, len(rejected)) == ("b", [], 1)
    assert rejected[0].reason == "expected a row of 8 values, got a list of 1"


def test_a_time_out_of_datetimes_range_sets_aside_its_record_only() -> None:
    # Decoding the envelope raised OverflowError, and the whole batch was set aside.
    far = list(GOOD_ROW)
    far[7] = msgpack.Timestamp(2**40, 0)
    payload = msgpack.packb({"id": "b", "records": [GOOD_ROW, far]})
    _, good, rejected = decode_envelope(payload)
    assert [row[0] for row in good] == [0]
    assert [(reject.position, reject.reason) for reject in rejected] == [
        (1, "ExpireAt is outside a datetime's range")
    ]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"id": "b"}),
        msgpack.packb({"id": 7, "records": []}),
        msgpack.packb({"id": "b", "records": [[0, 1]]}),
        msgpack.packb({"id": "b", "records": 5}),
        encode_clean_batch("b", [[0, *GOOD_ROW[:1], 42, *GOOD_ROW[2:]]]),
        encode_clean_batch("b", [[-1, *GOOD_ROW]]),
        encode_clean_batch("b", [["0", *GOOD_ROW]]),
        msgpack.packb({"id": "b", "records": ["abcdefghi"]}),
    ],
    ids=[
        "empty",
        "not-msgpack",
        "a-list",
        "no-records",
        "id-not-a-string",
        "short-row",
        "records-not-a-list",
        "username-an-int",
        "negative-position",
        "position-a-string",
        "row-a-string",
    ],
)
def test_a_payload_that_is_not_a_clean_batch_raises_malformed_batch(payload: bytes) -> None:
    # It raised KeyError, TypeError or ValueError, or returned records of the wrong types.
    with pytest.raises(MalformedBatchError):
        decode_clean_batch(payload)


def problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text)
    return dict(caught.value.problems)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "iam-pump.yaml"
    path.write_bytes(b"purge-delay: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_pump_settings(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("when: 2001-02-30\n", "day is out of range"),
        ("big: " + "1" * 5000 + "\n", "digits"),
        ("deep: " + "[" * 300 + "]" * 300 + "\n", "nested"),
        ("loop: &a [*a]\n", "refers to itself"),
    ],
    ids=["date-that-does-not-exist", "5000-digit-integer", "deep-nesting", "alias-loop"],
)
def test_yaml_that_pyyaml_fails_on_outside_yamlerror_is_a_config_error(
    text: str, message: str
) -> None:
    assert message in problems(text)[""]


def test_aliases_that_expand_exponentially_are_refused_at_once() -> None:
    # Expanding ${VAR} walked every alias: 10**7 strings, a hang.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 7)]
    started = time.monotonic()
    assert "once its aliases are followed" in problems("\n".join(lines))[""]
    assert time.monotonic() - started < 1


def test_a_variable_that_is_a_date_that_does_not_exist_stays_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ${VAR} is typed as YAML would type it, and the ValueError escaped.
    monkeypatch.setenv("FUZZ_FINDING_PORT", "2001-02-30")
    assert "redis.port" in problems("redis:\n  port: ${FUZZ_FINDING_PORT}\n")


def test_an_alias_loop_from_a_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUZZ_FINDING_PUMPS", "&a [*a]")
    assert "refers to itself" in problems("pumps: ${FUZZ_FINDING_PUMPS}\n")[""]


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("redis:\n  host: 127.0.0.1:port\n", "redis"),
        ("redis:\n  host: 127.0.0.1:99999\n", "redis"),
        ("redis:\n  addrs: ['h:\u00b2']\n", "redis"),
        ("redis:\n  host: 'bad]host'\n", "redis"),
    ],
    ids=["port-not-a-number", "port-out-of-range", "port-superscript-digit", "no-url"],
)
def test_a_redis_address_that_makes_no_url_is_a_config_error(text: str, path: str) -> None:
    # It validated, then Settings.broker raised ValueError when the worker started.
    assert path in problems(text)


def test_a_broker_url_that_does_not_parse_is_refused_without_its_password() -> None:
    # Echoing the bad value masked its password with urlsplit, which raised ValueError.
    found = problems("broker-url: 'redis://user:hunter2@[::1/0'\n")
    assert "broker-url" in found
    assert "hunter2" not in found["broker-url"]
