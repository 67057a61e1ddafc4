"""Run one purge and die (os._exit, no clean-up) at a chosen point; used by the purge tests.

python -m tests.faults.purge_crasher before-enqueue|after-enqueue
"""

from __future__ import annotations

import os
import sys

from app.celery_app import app
from tasks.purge import drain

CRASH_EXIT_STATUS = 86


def main(point: str) -> None:
    original = app.send_task

    def send_then_maybe_die(*args: object, **kwargs: object) -> object:
        if point == "before-enqueue":
            os._exit(CRASH_EXIT_STATUS)
        result = original(*args, **kwargs)
        os._exit(CRASH_EXIT_STATUS)
        return result

    app.send_task = send_then_maybe_die  # type: ignore[method-assign]
    drain()
    sys.exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
