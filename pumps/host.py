"""PROVISIONAL: replaced by the pump contract branch."""

from __future__ import annotations

import logging
import threading

from app.config import Settings
from pumps.base import Pump
from pumps.errors import PumpError
from pumps.pipeline import Step, build_pipeline
from pumps.registry import resolve_pump_class

logger = logging.getLogger(__name__)


class PumpHost:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pumps: dict[str, Pump] = {}
        self._pipelines: dict[str, list[Step]] = {}

    def pump(self, name: str) -> Pump:
        with self._lock:
            existing = self._pumps.get(name)
            if existing is not None:
                return existing
            entry = self.settings.pumps[name]
            instance = resolve_pump_class(entry.type).create(
                name, entry.meta, timeout_s=entry.timeout_s
            )
            instance.open()
            self._pumps[name] = instance
            return instance

    def pipeline(self, name: str) -> list[Step]:
        with self._lock:
            steps = self._pipelines.get(name)
            if steps is None:
                entry = self.settings.pumps[name]
                try:
                    handles = resolve_pump_class(entry.type).handles_record_size
                except PumpError:
                    handles = False
                steps = build_pipeline(
                    entry,
                    omit_detailed_globally=self.settings.omit_detailed_recording,
                    size_limit_step=not handles,
                )
                self._pipelines[name] = steps
            return steps

    def check(self, name: str) -> str:
        try:
            self.pump(name).check()
            return "ok"
        except PumpError as exc:
            return str(exc)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def check_all(self) -> dict[str, str]:
        return {name: self.check(name) for name in self.settings.enabled_pumps}

    def close(self) -> None:
        with self._lock:
            opened = list(self._pumps.items())
            self._pumps.clear()
        for name, instance in opened:
            try:
                instance.close()
            except Exception:
                logger.exception("closing pump %s failed", name)
