"""Every fuzz harness (fuzz/) runs briefly under libFuzzer and finds no crash.

``make fuzz`` runs them for minutes; here each gets a few seconds from its seed corpus, which
replays every seed and the inputs once found, and mutates a little further.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.campaign import TARGETS, run_target

#: Per harness; all of them together stay under ~30 s including start-up.
SECONDS = 3


@pytest.mark.parametrize("target", TARGETS)
def test_harness_finds_no_crash(target: str, tmp_path: Path) -> None:
    outcome = run_target(target, SECONDS, tmp_path, input_timeout_s=10)
    print(outcome.line())
    log = outcome.log.read_text(encoding="utf-8", errors="replace")
    assert not outcome.crashed, f"{outcome.line()}\n{log[-4000:]}"
    assert outcome.runs > 100, f"the harness barely ran:\n{log[-4000:]}"
