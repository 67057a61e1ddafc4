"""A progress bar for command-line work that takes a while, drawn only on a terminal.

On a terminal, a rich progress bar runs below the lines the command prints; when stdout is
a pipe or a file (a script, a log), nothing but those lines is written.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class Steps:
    """Counts finished steps and prints lines without breaking the bar."""

    def __init__(self, progress: Progress | None, task: TaskID | None, out: TextIO) -> None:
        self._progress = progress
        self._task = task
        self._out = out

    def say(self, line: str) -> None:
        """Print one line of the command's output."""
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self._out)

    def advance(self, steps: float = 1) -> None:
        """Count ``steps`` more as done."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)


@contextmanager
def progress(description: str, total: float, *, out: TextIO | None = None) -> Iterator[Steps]:
    """A bar of ``total`` steps while the block runs, if ``out`` (stdout) is a terminal."""
    out = out or sys.stdout
    if not out.isatty():
        yield Steps(None, None, out)
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=out),
        transient=True,
    )
    with bar:
        yield Steps(bar, bar.add_task(description, total=total), out)
