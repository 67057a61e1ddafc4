"""The pump contract as test methods: what every pump promises, whatever its sink.

Subclass :class:`PumpContract` in a test module (its name starting with ``Test``) and fill in
its hooks; pytest then runs every ``test_*`` method against your pump. The cases that need
something a pump may not have (a registered type, a sink that can be made unreachable, a
server to put a proxy in front of) are skipped when their hook returns None.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from app.record import AnalyticsRecord
from pumps.base import Pump, WriteResult
from pumps.deadline import Deadline
from pumps.errors import PumpError, PumpTemporaryError
from pumps.pipeline import run_pipeline, size_limit
from pumps.registry import resolve_pump_class
from pumps.testing.records import copies, make_records
from pumps.testing.servers import TcpProxy, silent_server

P = TypeVar("P", bound=Pump)

#: The timeout and deadline of a pump whose test is not about time.
CONTRACT_TIMEOUT_S = 10.0
#: The timeout the "sink down" cases give a pump, and how much later than that it may answer.
DOWN_TIMEOUT_S = 2.0
DOWN_SLACK_S = 2.0
#: A record's request this large is "oversized"; the size limit the pipeline case applies.
OVERSIZED_REQUEST_BYTES = 64 * 1024
SIZE_LIMIT_BYTES = 16 * 1024


@contextlib.contextmanager
def opened(pump: P) -> Iterator[P]:
    """The pump, open for the ``with`` block and closed after it."""
    pump.open()
    try:
        yield pump
    finally:
        pump.close()


def soon() -> Deadline:
    """The deadline of a write whose test is not about time."""
    return Deadline.after(CONTRACT_TIMEOUT_S)


class PumpContract:
    """The contract tests; a subclass names the pump and says how to read its sink back."""

    #: The pump under test.
    pump_class: ClassVar[type[Pump]]
    #: Its type name in the registry (built-in or entry point), or None if it has none.
    pump_type: ClassVar[str | None] = None
    #: True when :meth:`~pumps.base.Pump.open` makes a client: ``check()`` before it says so.
    connects: ClassVar[bool] = False

    @pytest.fixture(autouse=True)
    def _contract_tmp_path(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    # -- hooks ------------------------------------------------------------------------------

    def meta(self, tmp_path: Path) -> dict[str, Any]:
        """The ``meta`` of a pump writing to a sink of this test's own."""
        return {}

    def stored_ids(self, pump: Pump) -> Counter[str]:
        """How many copies of each record the sink holds, keyed by :meth:`record_key`."""
        raise NotImplementedError

    def record_key(self, record: AnalyticsRecord) -> str:
        """How :meth:`stored_ids` names a record: its id, unless the sink keeps no ids."""
        return record.id

    def unreachable_meta(self, tmp_path: Path) -> dict[str, Any] | None:
        """``meta`` pointing at a sink that cannot be used at all (None: skip those cases)."""
        return None

    def meta_at(self, tmp_path: Path, port: int) -> dict[str, Any] | None:
        """``meta`` for a server on 127.0.0.1:``port`` (None: not a network pump)."""
        return None

    def server_address(self) -> tuple[str, int] | None:
        """Where the real server listens, to put a proxy in front of it (None: skip)."""
        return None

    # -- helpers ----------------------------------------------------------------------------

    def create(
        self, *, timeout_s: float = CONTRACT_TIMEOUT_S, meta: dict[str, Any] | None = None
    ) -> Pump:
        """A pump made the way the workers make it, from raw ``meta``."""
        raw = self.meta(self.tmp_path) if meta is None else meta
        return self.pump_class.create(
            f"contract-{self.pump_class.__name__}", raw, timeout_s=timeout_s
        )

    def unreachable_pump(self, *, timeout_s: float) -> Pump:
        """A pump whose sink cannot be used at all; by default from :meth:`unreachable_meta`."""
        meta = self.unreachable_meta(self.tmp_path)
        if meta is None:
            pytest.skip("no unreachable sink given (unreachable_meta)")
        return self.create(timeout_s=timeout_s, meta=meta)

    def expected(self, records: list[AnalyticsRecord], copies_each: int) -> Counter[str]:
        """What :meth:`stored_ids` should say after storing ``records`` that many times."""
        return Counter({self.record_key(record): copies_each for record in records})

    def _network_pump(self, port: int) -> Pump:
        meta = self.meta_at(self.tmp_path, port)
        if meta is None:
            pytest.skip("not a network pump (meta_at)")
        return self.create(timeout_s=DOWN_TIMEOUT_S, meta=meta)

    @staticmethod
    def _assert_temporary_error_in_time(pump: Pump, tag: str) -> None:
        """Opening and writing ``pump`` gives a temporary error within the deadline."""
        started = time.monotonic()
        with pytest.raises(PumpTemporaryError):
            pump.open()
            pump.write(make_records(tag, 3), deadline=Deadline.after(DOWN_TIMEOUT_S))
        assert time.monotonic() - started < DOWN_TIMEOUT_S + DOWN_SLACK_S

    # -- the contract -----------------------------------------------------------------------

    def test_registered_by_type(self) -> None:
        if self.pump_type is None:
            pytest.skip("no registered type (pump_type)")
        assert resolve_pump_class(self.pump_type) is self.pump_class

    def test_created_from_meta(self) -> None:
        pump = self.create()
        assert type(pump) is self.pump_class
        assert isinstance(pump.meta, self.pump_class.Meta)

    def test_write_stores_each_record_once(self) -> None:
        records = make_records("write", 25)
        pump = self.create()
        with opened(pump):
            pump.check()
            assert pump.write(records, deadline=soon()) == WriteResult()
            assert pump.write([], deadline=soon()) == WriteResult()
        pump.close()  # a second close is harmless
        assert self.stored_ids(pump) == self.expected(records, 1)

    def test_redelivered_batch_is_stored_once_if_the_pump_upserts(self) -> None:
        """Upserting pumps store a redelivered batch once; the others at least once (twice)."""
        records = make_records("again", 25)
        with opened(self.create()) as pump:
            pump.write(records, deadline=soon())
            pump.write(copies(records), deadline=soon())
        assert self.stored_ids(pump) == self.expected(records, 1 if pump.upserts else 2)

    def test_oversized_record_never_takes_its_batch_down(self) -> None:
        """A pump that handles record size stores it (trimmed or counted); for the others the
        write task's size limit sets it aside as a dead letter, and the rest is written."""
        records = make_records("big", 5)
        big = records[2] = dataclasses.replace(records[2], request="x" * OVERSIZED_REQUEST_BYTES)
        with opened(self.create()) as pump:
            if self.pump_class.handles_record_size:
                assert pump.write(records, deadline=soon()) == WriteResult()
                expected = records
            else:
                kept, rejects = run_pipeline([size_limit(SIZE_LIMIT_BYTES)], records)
                assert pump.write(kept, deadline=soon()) == WriteResult()
                assert [(r.id, "over the limit" in reason) for r, reason in rejects] == [
                    (big.id, True)
                ]
                expected = kept
        assert self.stored_ids(pump) == self.expected(expected, 1)

    def test_record_without_an_id_is_refused_alone_if_the_pump_upserts(self) -> None:
        """An id is what makes an upserting pump write once; a record without one is refused."""
        if not self.pump_class.upserts:
            pytest.skip("the pump does not upsert")
        records = make_records("noid", 4)
        records[1] = dataclasses.replace(records[1], id="")
        with opened(self.create()) as pump:
            result = pump.write(records, deadline=soon())
        assert [(r.username, "id" in reason) for r, reason in result.rejected] == [
            (records[1].username, True)
        ]
        assert self.stored_ids(pump) == self.expected([r for r in records if r.id], 1)

    def test_unusable_sink_gives_a_temporary_error_within_the_deadline(self) -> None:
        """A server that is down, an unwritable folder, a broken pipe: a retryable error,
        quickly, never a hang or a driver exception."""
        pump = self.unreachable_pump(timeout_s=DOWN_TIMEOUT_S)
        self._assert_temporary_error_in_time(pump, "down")
        pump.close()
        pump.close()

    def test_check_before_open_says_so_if_the_pump_connects(self) -> None:
        if not self.connects:
            pytest.skip("the pump makes no client in open()")
        with pytest.raises(PumpTemporaryError, match="not open"):
            self.create().check()

    def test_silent_server_gives_a_temporary_error_within_the_deadline(self) -> None:
        """A server that accepts connections and never answers: the deadline bounds the wait."""
        with silent_server() as port:
            pump = self._network_pump(port)
            self._assert_temporary_error_in_time(pump, "silent")
            pump.close()

    @contextlib.contextmanager
    def server_going_away(self) -> Iterator[tuple[Pump, Callable[[], None]]]:
        """A pump on the sink and the action that takes the sink away, restored at the end.

        The kit puts a TCP proxy in front of :meth:`server_address` and cuts it; a pump whose
        client goes past a proxy (one that reconnects to an address the server advertises, as a
        Kafka client does) overrides this to stop the server itself.
        """
        address = self.server_address()
        if address is None:
            pytest.skip("no server to go away (server_address)")
        proxy = TcpProxy(address)
        try:
            yield self._network_pump(proxy.port), proxy.stop
        finally:
            proxy.stop()

    def test_server_going_away_gives_temporary_errors_and_a_failing_check(self) -> None:
        with self.server_going_away() as (candidate, take_away), opened(candidate) as pump:
            first = make_records("before", 5)
            assert pump.write(first, deadline=soon()) == WriteResult()
            pump.check()
            take_away()
            started = time.monotonic()
            with pytest.raises(PumpTemporaryError):
                pump.write(make_records("after", 5), deadline=Deadline.after(DOWN_TIMEOUT_S))
            assert time.monotonic() - started < DOWN_TIMEOUT_S + DOWN_SLACK_S
            started = time.monotonic()
            with pytest.raises(PumpError):
                pump.check()
            assert time.monotonic() - started < DOWN_TIMEOUT_S + DOWN_SLACK_S
        assert self.stored_ids(pump) == self.expected(first, 1)
