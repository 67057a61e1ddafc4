from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pumps import registry
from pumps.csv import CSVPump
from pumps.errors import PumpConfigError, PumpUnavailableError


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on sys.path where a test can install a fake distribution with entry points."""
    sys.path.insert(0, str(tmp_path))
    registry.available_pumps.cache_clear()
    yield tmp_path
    sys.path.remove(str(tmp_path))
    registry.available_pumps.cache_clear()
    for name in [name for name in sys.modules if name.startswith("thirdparty_pump")]:
        del sys.modules[name]


def install_plugin(where: Path, entry_points: str, module: str = "") -> None:
    info = where / "thirdparty_pump-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-pump\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[iam_pump.pumps]\n{entry_points}\n")
    if module:
        (where / "thirdparty_pump.py").write_text(module)


def test_builtins_resolve() -> None:
    assert registry.resolve_pump_class("csv") is CSVPump


def test_unknown_type_suggests_the_closest() -> None:
    with pytest.raises(PumpConfigError, match="did you mean 'stdout'"):
        registry.resolve_pump_class("stdot")


def test_a_third_party_pump_comes_from_the_entry_point_group(plugin_dir: Path) -> None:
    install_plugin(
        plugin_dir,
        "mysink = thirdparty_pump:MySink",
        "from pumps.base import Pump, WriteResult\n"
        "class MySink(Pump):\n"
        "    def write(self, records, *, deadline): return WriteResult()\n",
    )
    assert registry.resolve_pump_class("mysink").__name__ == "MySink"


def test_a_name_clash_with_a_builtin_is_an_error(plugin_dir: Path) -> None:
    install_plugin(plugin_dir, "csv = thirdparty_pump:Other")
    with pytest.raises(PumpConfigError, match="clashes"):
        registry.resolve_pump_class("csv")


def test_a_missing_driver_names_what_to_install(plugin_dir: Path) -> None:
    install_plugin(plugin_dir, "needsdriver = thirdparty_pump:X", "import not_installed_driver\n")
    with pytest.raises(PumpUnavailableError, match="not_installed_driver"):
        registry.resolve_pump_class("needsdriver")


def test_meta_problems_name_the_bad_type_and_meta_keys() -> None:
    problems = registry.meta_problems(
        {
            "a": {"type": "stdot"},
            "b": {"type": "csv", "meta": {"csv_dir": "/tmp/x", "extra": 1}},
            "c": {"type": "memory"},
        }
    )
    assert [path for path, _ in problems] == ["pumps.a.type", "pumps.b.meta.extra"]
    assert problems[1][1] == "unknown key"
    assert registry.meta_problems(None) == []
