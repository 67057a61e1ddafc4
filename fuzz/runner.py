"""What every harness shares: the libFuzzer entry point and the contract checks' failure type.

Imports nothing from the project, so that a harness imports the code it fuzzes inside
:func:`instrumented` and atheris can trace its branches.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import atheris

#: The project's packages, whose branches guide the fuzzer. PyYAML is left alone: atheris 2.3's
#: bytecode rewriting breaks its scanner on Python 3.11 (an AttributeError that plain PyYAML
#: never raises on the same input).
INSTRUMENTED_PACKAGES = ["app", "pumps"]


class ContractBroken(AssertionError):
    """A decoder returned, but what it returned breaks its documented contract."""


def instrumented() -> AbstractContextManager[Any]:
    """A ``with`` block whose imports of the project's modules are instrumented for coverage."""
    manager: AbstractContextManager[Any] = atheris.instrument_imports(include=INSTRUMENTED_PACKAGES)
    return manager


def check(condition: bool, message: str) -> None:
    """Raise :class:`ContractBroken` (a crash for libFuzzer) unless ``condition`` holds."""
    if not condition:
        raise ContractBroken(message)


def fuzz(test_one_input: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    """Hand ``test_one_input`` to libFuzzer with the command line's options; never returns."""
    atheris.Setup(sys.argv if argv is None else argv, test_one_input)
    atheris.Fuzz()
