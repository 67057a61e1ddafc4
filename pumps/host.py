"""The one object that hosts pumps in a process: opens them on first use, checks, closes.

A worker process and the health server each hold one :class:`PumpHost`. Pumps are opened in the
process that uses them (after a prefork child is forked) and only once; a pump whose ``open``
failed is not kept, so the next use tries again. A health check opens a pump it has not opened
yet, with a deadline of :data:`~pumps.deadline.CHECK_TIMEOUT_S`, so it reports whether the sink
can be used rather than "not open", and a store that is down cannot hang it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from app.config import Settings
from pumps.base import Pump
from pumps.deadline import CHECK_TIMEOUT_S, Deadline
from pumps.errors import PumpConfigError, PumpError
from pumps.pipeline import Step, build_pipeline
from pumps.registry import resolve_pump_class

logger = logging.getLogger(__name__)

#: What :meth:`PumpHost.check` returns for a usable sink.
CHECK_OK = "ok"


class PumpHost:
    """The pumps of one process, by name, made from ``settings``; safe to share between threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}
        self._pumps: dict[str, Pump] = {}
        self._pipelines: dict[str, list[Step]] = {}

    def pump(self, name: str) -> Pump:
        """The open pump called ``name``, opened within its own timeout on first use."""
        return self._open(name, deadline=None)

    def pipeline(self, name: str) -> list[Step]:
        """The record transforms for pump ``name``, built once."""
        with self._lock:
            steps = self._pipelines.get(name)
            if steps is None:
                steps = self._pipelines[name] = self._build_pipeline(name)
            return steps

    def check(self, name: str) -> str:
        """``"ok"`` when pump ``name`` can be used, else why not; opens it if need be."""
        try:
            self._open(name, deadline=Deadline.after(CHECK_TIMEOUT_S)).check()
        except PumpError as exc:
            return str(exc)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return CHECK_OK

    def check_all(self) -> dict[str, str]:
        """:meth:`check` for every enabled pump, at once, keyed by pump name."""
        names = list(self.settings.enabled_pumps)
        if not names:
            return {}
        with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="pump-check") as pool:
            return dict(zip(names, pool.map(self.check, names), strict=True))

    def close(self) -> None:
        """Close every open pump; errors are logged, not raised. Safe to call twice."""
        with self._lock:
            opened = list(self._pumps.items())
            self._pumps.clear()
        for name, instance in opened:
            try:
                instance.close()
            except Exception:
                logger.exception("closing pump %s failed", name)

    def _open(self, name: str, *, deadline: Deadline | None) -> Pump:
        with self._lock:
            existing = self._pumps.get(name)
            if existing is not None:
                return existing
            opening = self._opening.setdefault(name, threading.Lock())
        # One pump opening does not hold up the others.
        with opening:
            with self._lock:
                existing = self._pumps.get(name)
            if existing is not None:
                return existing
            entry = self.settings.pumps.get(name)
            if entry is None:
                raise PumpConfigError(f"pump {name!r} is not in the configuration")
            instance = resolve_pump_class(entry.type).create(
                name, entry.meta, timeout_s=entry.timeout_s
            )
            instance.open(deadline=deadline)
            with self._lock:
                self._pumps[name] = instance
            return instance

    def _build_pipeline(self, name: str) -> list[Step]:
        entry = self.settings.pumps[name]
        try:
            handles_size = resolve_pump_class(entry.type).handles_record_size
        except PumpError:
            handles_size = False  # the write itself will report the pump as unusable
        return build_pipeline(
            entry,
            omit_detailed_globally=self.settings.omit_detailed_recording,
            size_limit_step=not handles_size,
        )
