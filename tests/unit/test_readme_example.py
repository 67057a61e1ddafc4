"""The README's "Writing a pump" example, run as a newcomer would: its pump in a package of its
own, registered by entry point, checked by the contract kit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

_EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```\w+\n(.*?)```", re.S)


def readme_examples() -> dict[str, str]:
    """The README's example blocks by the name in their marker."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return {name: body for name, body in _EXAMPLE.findall(text)}


def test_the_writing_a_pump_example_passes_the_contract_kit(tmp_path: Path) -> None:
    examples = readme_examples()
    package = tmp_path / "mysink"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "pump.py").write_text(examples["mysink/pump.py"])
    (tmp_path / "test_mysink.py").write_text(examples["test_mysink.py"])
    group, name, target = re.findall(
        r'\[project\.entry-points\."([^"]+)"\]\n(\S+) = "([^"]+)"', examples["entry_points"]
    )[0]
    info = tmp_path / "site" / "iam_pump_mysink-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: iam-pump-mysink\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {target}\n")
    path = os.pathsep.join([str(tmp_path), str(tmp_path / "site"), str(REPO)])
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mysink.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=path),
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "6 passed, 4 skipped" in run.stdout, run.stdout[-1000:]
