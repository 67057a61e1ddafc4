"""Run the harnesses one after another: ``python -m fuzz.campaign [--seconds N] [TARGET ...]``.

Each harness runs as its own process under libFuzzer for ``--seconds`` (default
``$FUZZ_SECONDS``, else 120), starting from the seed corpus in ``fuzz/corpus/<target>/`` plus
the inputs earlier runs found in ``<work>/corpus/<target>/`` (where new ones go; the repo's
seeds are only read). A crash, a hang (one input running over ``--input-timeout``) or a
broken contract stops that harness and leaves the input in ``<work>/`` to reproduce with
``python -m fuzz.fuzz_<target> <file>``. Prints one line per harness; exits 1 on any crash.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED_CORPUS = ROOT / "fuzz" / "corpus"
TARGETS = ("go_record", "envelope", "clean_batch", "config", "dead_letter_raw")
#: How long one input may run before libFuzzer calls it a hang.
DEFAULT_INPUT_TIMEOUT_S = 10


@dataclass(frozen=True)
class Outcome:
    """What one harness run did."""

    target: str
    runs: int
    seconds: float
    crashed: bool
    artifact: str | None
    log: Path

    def line(self) -> str:
        """One line for a person."""
        verdict = f"CRASH, input saved as {self.artifact}" if self.crashed else "no crash"
        rate = self.runs / self.seconds if self.seconds else 0.0
        return (
            f"{self.target:15} {self.runs:>10} executions in {self.seconds:6.1f} s "
            f"({rate:,.0f}/s): {verdict}"
        )


def run_target(
    target: str,
    seconds: int,
    work: Path,
    *,
    input_timeout_s: int = DEFAULT_INPUT_TIMEOUT_S,
) -> Outcome:
    """Fuzz one target for ``seconds``; its log and any crashing input go under ``work``."""
    found = work / "corpus" / target
    found.mkdir(parents=True, exist_ok=True)
    log = work / f"{target}.log"
    command = [
        sys.executable,
        "-m",
        f"fuzz.fuzz_{target}",
        str(found),
        str(SEED_CORPUS / target),
        f"-max_total_time={seconds}",
        f"-timeout={input_timeout_s}",
        f"-artifact_prefix={work}{os.sep}",
        "-print_final_stats=1",
    ]
    started = time.monotonic()
    with log.open("wb") as out:
        status = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    elapsed = time.monotonic() - started
    text = log.read_text(encoding="utf-8", errors="replace")
    runs = re.search(r"stat::number_of_executed_units: (\d+)", text)
    if runs is None:
        runs = next(reversed(list(re.finditer(r"^#(\d+)", text, re.MULTILINE))), None)
    artifact = re.search(r"Test unit written to (\S+)", text)
    return Outcome(
        target,
        int(runs[1]) if runs else 0,
        elapsed,
        status != 0,
        artifact[1] if artifact else None,
        log,
    )


def main(argv: list[str] | None = None) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m fuzz.campaign", description=__doc__)
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 120)))
    parser.add_argument("--work", type=Path, default=ROOT / ".fuzz")
    parser.add_argument("--input-timeout", type=int, default=DEFAULT_INPUT_TIMEOUT_S)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    crashed = False
    for target in args.targets or TARGETS:
        outcome = run_target(target, args.seconds, args.work, input_timeout_s=args.input_timeout)
        print(outcome.line(), flush=True)
        crashed |= outcome.crashed
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
