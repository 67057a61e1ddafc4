"""Pump types by name: the built-ins plus the ``iam_pump.pumps`` entry-point group.

A type is resolved from a ``module:Class`` string only when a config names it, so an unused
pump's driver is never imported. Another package adds a pump with::

    [project.entry-points."iam_pump.pumps"]
    mysink = "mypackage.pump:MySinkPump"
"""

from __future__ import annotations

import difflib
import importlib
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from app.config import validation_problems
from pumps.base import Pump
from pumps.errors import PumpConfigError, PumpUnavailableError

ENTRY_POINT_GROUP = "iam_pump.pumps"

BUILTIN_PUMPS: dict[str, str] = {
    "csv": "pumps.csv:CSVPump",
    "stdout": "pumps.stdout:StdoutPump",
    "memory": "pumps.memory:MemoryPump",
    "dummy": "pumps.dummy:DummyPump",
    "mongo": "pumps.mongo:MongoPump",
    "mongo-aggregate": "pumps.mongo_aggregate:MongoAggregatePump",
    "elasticsearch": "pumps.elasticsearch:ElasticsearchPump",
    "syslog": "pumps.syslog:SyslogPump",
    "prometheus": "pumps.prometheus:PrometheusPump",
    "influx": "pumps.influx:InfluxPump",
    "kafka": "pumps.kafka:KafkaPump",
}


@cache
def available_pumps() -> dict[str, str]:
    """Every pump type name and the ``module:Class`` that implements it."""
    pumps = dict(BUILTIN_PUMPS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in pumps and pumps[entry.name] != entry.value:
            raise PumpConfigError(
                f"pump type {entry.name!r} from entry point {entry.value!r} clashes with "
                f"{pumps[entry.name]!r}"
            )
        pumps[entry.name] = entry.value
    return pumps


def resolve_pump_class(type_name: str) -> type[Pump[Any]]:
    """The class for a pump type; raises :class:`PumpConfigError` with a suggestion if unknown."""
    pumps = available_pumps()
    target = pumps.get(type_name)
    if target is None:
        close = difflib.get_close_matches(type_name, pumps, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(pumps))
        raise PumpConfigError(f"unknown pump type {type_name!r}{hint} (known: {known})")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PumpUnavailableError(
            f"pump type {type_name!r} needs {exc.name or 'a missing module'}: install its package"
        ) from exc
    pump_class = getattr(module, class_name, None)
    if not (isinstance(pump_class, type) and issubclass(pump_class, Pump)):
        raise PumpConfigError(f"{target!r} is not a Pump subclass")
    return pump_class


def meta_problems(pumps: object) -> list[tuple[str, str]]:
    """Every problem of the pumps' types and ``meta`` in a raw config mapping, as (path, message).

    Runs on the raw mapping, so a bad pump type or meta is reported together with every other
    problem of the file. A pump whose driver is missing is not a problem here: only that pump
    fails, when it is used, naming what to install. An empty or missing ``type`` is the key's.
    """
    if not isinstance(pumps, dict):
        return []
    problems: list[tuple[str, str]] = []
    for name, entry in pumps.items():
        if not isinstance(entry, dict):
            continue
        type_name = entry.get("type") or name
        if not isinstance(type_name, str):
            continue
        try:
            pump_class = resolve_pump_class(type_name)
        except PumpUnavailableError:
            continue
        except PumpConfigError as exc:
            said = "" if entry.get("type") else " (no type given: the key is the type)"
            problems.append((f"pumps.{name}.type", f"{exc}{said}"))
            continue
        try:
            pump_class.Meta.model_validate(entry.get("meta") or {})
        except ValidationError as exc:
            problems += validation_problems(exc, ("pumps", name, "meta"))
    return problems
