"""Counts a child process's Redis round trips too (bench/roundtrips.py puts this folder first on
``PYTHONPATH`` for the processes it starts, such as the reporter's helper process)."""

import os
import sys
from pathlib import Path

_out = os.environ.get("BENCH_ROUNDTRIPS_OUT")
if _out:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import roundtrips

    roundtrips.install(Path(_out), os.environ.get("BENCH_ROUNDTRIPS_STAGE", "other"))
