from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.errors import ConfigError
from pumps import registry
from pumps.csv import CSVPump
from pumps.deadline import Deadline
from pumps.errors import PumpConfigError, PumpUnavailableError
from pumps.host import PumpHost
from pumps.settings import load_pump_settings, parse_pump_settings
from pumps.testing.records import make_records
from tests.support import read_csv_rows


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


def test_a_pump_without_a_type_takes_its_key_and_runs(tmp_path: Path) -> None:
    """iam reads ``pumps: {csv: {meta: ...}}`` (no type, or an empty one) as a csv pump."""
    config = tmp_path / "c.yaml"
    config.write_text(
        f"pumps:\n  csv: {{meta: {{csv_dir: '{tmp_path / 'csv'}'}}}}\n"
        "  dummy: {type: '', meta: {}}\n  stdout: {type: }\n"
    )
    settings = load_pump_settings(config)
    assert {name: entry.type for name, entry in settings.pumps.items()} == {
        "csv": "csv",
        "dummy": "dummy",
        "stdout": "stdout",
    }
    host = PumpHost(settings)
    try:
        records = make_records("keyed", 3)
        host.pump("csv").write(records, deadline=Deadline.after(5))
    finally:
        host.close()
    rows = read_csv_rows(tmp_path / "csv")
    assert [row["Username"] for row in rows] == [record.username for record in records]


def test_a_key_that_is_no_pump_type_is_named_with_its_path() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_pump_settings("pumps: {cvs: {meta: {}}, ok: {type: csv, meta: {csv_dir: d}}}\n")
    problems = dict(caught.value.problems)
    assert list(problems) == ["pumps.cvs.type"]
    assert "unknown pump type 'cvs'" in problems["pumps.cvs.type"]
    assert "did you mean 'csv'" in problems["pumps.cvs.type"]
    assert "the key is the type" in problems["pumps.cvs.type"]
