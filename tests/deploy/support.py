"""What the deployment-file tests share: where the files are, and the tools that check them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import require
from tests.support import REPO

DEPLOY = REPO / "deploy"
#: The configuration every deployment file uses (kubernetes/configmap.yaml holds the same text).
SHARED_CONFIG = DEPLOY / "iam-pump.yaml"


def tool(name: str, package: str) -> str:
    """The path of a command-line tool; skips locally and fails in CI when it is missing."""
    # The project's virtual environment first (PyPI tools), then PATH (Debian's).
    beside_python = Path(sys.executable).parent / name
    path = str(beside_python) if beside_python.exists() else shutil.which(name)
    require(path is not None, f"{name} (scripts/test-servers.sh install: {package})")
    assert path is not None
    return path


def run(args: Sequence[str | Path], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a checker to completion and return its exit status and output."""
    return subprocess.run(
        [str(arg) for arg in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )
