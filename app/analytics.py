"""The reporter: record one analytics record per request without slowing the request down.

::

    a = Analytics(AnalyticsOptions.from_yaml("iam-pump.yaml"))
    a.start()
    a.record_hit(AnalyticsRecord(username="alice", effect="allow", ...))   # ~1 us, never blocks
    a.stop()                                                               # ships what it holds

``record_hit`` appends to a bounded in-memory buffer and returns; it does no I/O, takes no lock
and allocates nothing. A cutter thread turns the buffer into batches - when ``records-buffer-size
/ pool-size`` records are waiting, when ``flush-interval`` has passed, and at least once a
second - and ``pool-size`` shipping threads hand each batch over as one Celery task (or RPUSH it
to iam's Redis list). With the helper process (the default: app/analytics_helper.py) the cutter
instead packs the waiting records into the open batch every :data:`PACK_EVERY_S` and writes each
due batch to the helper's pipe. A batch that cannot be shipped is retried with backoff; while
the broker is away the buffer fills, and records past its bound are refused, counted and logged
(rate-limited), never silently lost. ``stop()`` ships everything accepted before it, and is
safe to call twice; a record accepted by a ``record_hit`` racing ``stop()`` is shipped or
counted in ``lost_at_stop``.

Memory is bounded: the reporter holds at most ``records-buffer-size`` records in all, buffered,
cut into batches waiting for a shipper, or being shipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgpack

from app.analytics_helper import HelperProcess
from app.analytics_options import AnalyticsOptions
from app.analytics_stats import AnalyticsStats, LockFreeCounter
from app.backoff import backoff_s
from app.errors import ShipError
from app.record import RECORD_FIELDS, AnalyticsRecord, expire_at_after
from app.stores.clients import check_certificate
from app.transports import EncodeError, Transport, transport_for

if TYPE_CHECKING:
    from app.analytics_metrics import ReporterCollector

__all__ = [
    "Analytics",
    "AnalyticsOptions",
    "AnalyticsRecord",
    "AnalyticsStats",
    "ReporterCollector",
]

logger = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT_S = 30.0
#: After stop's timeout, how long shipping threads get to give up their batch.
STOP_GRACE_S = 1.0
#: Batches are cut at least this often, whatever ``flush-interval`` says.
FORCED_FLUSH_INTERVAL_S = 1.0
#: How often the cutter looks at the buffer when nothing wakes it.
CUTTER_POLL_S = 0.01
SHIP_BACKOFF_BASE_S = 0.1
SHIP_BACKOFF_MAX_S = 5.0
#: At most one "buffer full" warning per this many seconds.
DROP_WARNING_INTERVAL_S = 10.0
#: With a helper process, records waiting in the buffer are packed into the open batch at
#: least this often, so that they die young. A record kept until its batch is cut (up to
#: ``flush-interval``) outlives the garbage collector's young generations; enough of them start
#: full collections of the application's whole heap, each a pause for every request thread
#: (12-16 ms in the benchmark's asyncio app: its p99.9 was 5.4-5.8x with analytics on).
PACK_EVERY_S = 0.02
#: With a helper process, rows are built and packed this many at a time, the GIL given up in
#: between: an asyncio application serves every connection from one thread, and a whole batch
#: at once (about 1 ms for 800 records) showed in its p99.9.
PACK_STEP = 100


@dataclass
class _OpenBatch:
    """A batch the cutter is filling: its id, its rows packed so far, the records taken."""

    batch_id: str
    opened: float
    parts: list[bytes] = field(default_factory=list)
    records: int = 0
    rows: int = 0


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Analytics:
    """The reporter; see the module docstring.

    ``record_hit(record) -> bool`` returns True when the record was accepted (it will be shipped)
    and False when it was refused (buffer full, stopped, or analytics disabled).
    """

    def __init__(self, options: AnalyticsOptions, *, transport: Transport | None = None) -> None:
        self.options = options
        self._transport = transport
        # Without a transport given, batches are published by a helper process (see
        # app/analytics_helper.py) unless ``helper_process`` is off; a transport given, or the
        # one made for the options without a helper, is used by shipping threads in this one.
        # A Redis Cluster or Sentinel ``redis:`` block is not handed to the helper: with one, the
        # reporter ships from its own threads.
        use_helper = transport is None and options.helper_process and options.redis is None
        self._helper = HelperProcess(options) if use_helper else None
        # The cutter waits on this pipe (with a helper process): stop() writes to wake it.
        self._wake_r, self._wake_w = -1, -1
        self._buffer: deque[AnalyticsRecord] = deque()
        # How many records the buffer may hold now: the bound less the records in flight (see
        # _bound_buffer); stop() sets it to 0 for good.
        self._limit = options.records_buffer_size if options.enable else 0
        self._batches: queue.Queue[tuple[str, list[AnalyticsRecord]] | None] = queue.Queue(
            maxsize=2 * options.pool_size
        )
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started = False
        # stop() has begun: record_hit refuses, and the cutter cuts what is left then exits.
        self._stopping = threading.Event()
        # stop() is done waiting: shippers stop retrying, the cutter stops cutting, and a record
        # still in the buffer will never be shipped; stats() counts it in lost_at_stop.
        self._closed = threading.Event()
        self._in_flight = 0
        self._shipped_records = 0
        self._shipped_batches = 0
        self._dropped_full = LockFreeCounter()
        self._dropped_after_stop = LockFreeCounter()
        self._rejected = 0
        self._lost_at_stop = 0
        self._ship_failures = 0
        self._last_drop_warning = 0.0
        self._drops_warned = 0
        # Where record_hit counts a refusal; stop() swaps in _dropped_after_stop. Disabled, the
        # reporter refuses every record and reports no refusal: that counter is read by nobody.
        self._refusals = self._dropped_full if options.enable else LockFreeCounter()

    def record_hit(self, record: AnalyticsRecord) -> bool:
        """Accept one record (never blocks, no I/O, no lock); False if refused."""
        if len(self._buffer) < self._limit:
            self._buffer.append(record)
            return True
        # Counting with next(LockFreeCounter) keeps a refusal at ~40 ns; a lock + int cost ~160.
        next(self._refusals)
        return False

    def _bound_buffer(self) -> None:
        # Called under the lock whenever records are cut or shipped: what the buffer may hold is
        # what the bound leaves after the batches in flight. stop() has set it to 0 for good.
        if not self._stopping.is_set():
            self._limit = max(0, self.options.records_buffer_size - self._in_flight)

    def _warn_about_drops(self, now: float) -> None:
        """Log refused records at most once per DROP_WARNING_INTERVAL_S (called by the cutter)."""
        if now - self._last_drop_warning < DROP_WARNING_INTERVAL_S:
            return
        dropped = self._dropped_full.value()
        if dropped == self._drops_warned:
            return
        logger.warning(
            "analytics buffer full (%d records): %d record(s) dropped; is the broker reachable?",
            self.options.records_buffer_size,
            dropped - self._drops_warned,
        )
        self._drops_warned = dropped
        self._last_drop_warning = now

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the cutter and shipping threads (idempotent).

        Raises :class:`~app.errors.ConfigError` when the server's TLS certificate does not
        verify: shipping would fail for good, so it says which keys to fix at once.
        """
        if self._transport is None and self.options.enable and not self._started:
            check_certificate(self._transport_url)
        with self._lock:
            if self._started or self._stopping.is_set() or not self.options.enable:
                return
            self._started = True
        self._start_threads(shippers=self.options.pool_size)

    def _start_threads(self, *, shippers: int) -> None:
        # The helper process's cutter, or a cutter and ``shippers`` shipping threads.
        if self._helper is not None:
            self._start_helper_loop()
            return
        if self._transport is None:
            self._transport = transport_for(self.options)
        threads = [threading.Thread(target=self._cut_loop, name="analytics-cutter", daemon=True)]
        threads += [
            threading.Thread(target=self._ship_loop, name=f"analytics-shipper-{index}", daemon=True)
            for index in range(shippers)
        ]
        self._threads += threads
        for thread in threads:
            thread.start()

    @property
    def _transport_url(self) -> str:
        if self.options.transport == "redis-list":
            return self.options.redis_url
        return self.options.broker_url

    def stop(self, *, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> AnalyticsStats:
        """Refuse new records, ship every accepted one, stop the threads; safe to call twice.

        Records still unshipped when ``timeout_s`` runs out (the broker stayed away) are counted
        in ``lost_at_stop`` and logged as an error. So is, rarely, a record from a ``record_hit``
        that raced this call and appended after the last batch was cut: ``stats()`` counts it.
        """
        if not self._begin_stop():
            self._join_threads(timeout_s)  # a second call: wait for the first one's threads
            return self.stats()
        deadline = time.monotonic() + timeout_s
        if not self._started:
            self._start_for_drain()
        self._join_threads(deadline - time.monotonic())
        # A record_hit that passed the limit check just before _begin_stop lowered the limit may
        # append after the cutter found the buffer empty and left. No sleep can make that land
        # in time, so it is counted instead: from here on whatever the buffer holds is lost.
        self._closed.set()
        self._wake()
        if self._helper is not None and self._threads and self._threads[0].is_alive():
            # The cutter may be blocked writing to a helper that hangs: killing it unblocks.
            self._helper.terminate()
        self._join_threads(STOP_GRACE_S)  # shippers still retrying give up their batch
        if self._transport is not None:
            self._transport.close()
        stats = self.stats()
        if stats.lost_at_stop:
            logger.error(
                "analytics stop: %d record(s) could not be shipped in %.0fs",
                stats.lost_at_stop,
                timeout_s,
            )
        return stats

    def _begin_stop(self) -> bool:
        """Refuse new records from now on; False if stop() had already begun."""
        with self._lock:
            if self._stopping.is_set():
                return False
            self._refusals = self._dropped_after_stop
            self._limit = 0
            self._stopping.set()
        self._wake()
        return True

    def _wake(self) -> None:
        """Wake the cutter if it waits on its pipe (with a helper process)."""
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def _join_threads(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _start_for_drain(self) -> None:
        # stop() without start(): ship what was buffered anyway.
        if self._buffer and self.options.enable:
            with self._lock:
                self._started = True
            self._start_threads(shippers=1)

    def __enter__(self) -> Analytics:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stats(self) -> AnalyticsStats:
        """The counters now."""
        with self._lock:
            buffered = len(self._buffer)
            lost_at_stop = self._lost_at_stop
            if self._closed.is_set():  # nothing will take these any more (see stop)
                lost_at_stop, buffered = lost_at_stop + buffered, 0
            return AnalyticsStats(
                shipped_records=self._shipped_records,
                shipped_batches=self._shipped_batches,
                buffered=buffered,
                pending=self._in_flight,
                dropped_buffer_full=self._dropped_full.value(),
                dropped_after_stop=self._dropped_after_stop.value(),
                rejected=self._rejected,
                lost_at_stop=lost_at_stop,
                ship_failures=self._ship_failures,
            )

    # -- threads ---------------------------------------------------------------------------

    def _cut_loop(self) -> None:
        """Cut the buffer into batches for the shippers; once stopping, until it is empty."""
        batch_size = self.options.batch_size
        interval_s = min(self.options.flush_interval_ms / 1000.0, FORCED_FLUSH_INTERVAL_S)
        poll_s = min(CUTTER_POLL_S, interval_s)
        last_cut = time.monotonic()
        while not self._closed.is_set():
            stopping = self._stopping.is_set()
            waiting = len(self._buffer)
            now = time.monotonic()
            if waiting >= batch_size or (waiting and (stopping or now - last_cut >= interval_s)):
                self._hand_over(self._cut(min(waiting, batch_size)), poll_s)
                last_cut = now
                continue
            if stopping:
                break  # every record accepted before the limit fell is cut
            if not waiting:
                last_cut = now
            self._warn_about_drops(now)
            time.sleep(poll_s)
        for _ in range(self.options.pool_size + 1):
            self._batches.put(None)

    def _cut(self, size: int) -> tuple[str, list[AnalyticsRecord]]:
        return uuid.uuid4().hex, self._take(size)

    def _hand_over(self, item: tuple[str, list[AnalyticsRecord]], poll_s: float) -> None:
        """Queue a batch for the shippers, who may all be waiting for the broker."""
        while True:
            try:
                self._batches.put(item, timeout=poll_s)
                return
            except queue.Full:
                if self._closed.is_set():  # stop() is done waiting: the batch is lost
                    self._settle(len(item[1]), shipped_rows=None)
                    return
                self._warn_about_drops(time.monotonic())

    def _ship_loop(self) -> None:
        while True:
            item = self._batches.get()
            if item is None:
                return
            batch_id, records = item
            rows = self._rows(records)
            try:
                shipped = self._ship(batch_id, rows)
            except EncodeError:
                # Rare: a record with a value msgpack cannot encode. Encoding is tried once per
                # batch; only then is each record tried alone.
                rows = self._encodable(rows)
                shipped = self._ship(batch_id, rows)
            self._settle(len(records), shipped_rows=len(rows) if shipped else None)

    def _settle(self, records: int, *, shipped_rows: int | None) -> None:
        """Count a batch of ``records`` out of flight: shipped (the rest rejected) or lost."""
        with self._lock:
            self._in_flight -= records
            self._bound_buffer()
            if shipped_rows is None:
                self._lost_at_stop += records
            else:
                self._shipped_records += shipped_rows
                self._shipped_batches += 1
                self._rejected += records - shipped_rows

    # -- with a helper process ---------------------------------------------------------------

    def _start_helper_loop(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        cutter = threading.Thread(target=self._helper_loop, name="analytics-cutter", daemon=True)
        self._threads.append(cutter)
        cutter.start()

    def _helper_loop(self) -> None:
        """Pack the buffer into batches and hand each to the helper process; count what it ships.

        The one reporter thread in the application's process. Every :data:`PACK_EVERY_S` it
        moves the records waiting into the open batch as packed rows (so no record object lives
        long); the batch goes to the helper when it holds ``batch_size`` records, when it has
        been open for ``flush-interval``, when the buffer is full, or when stop() begins.
        """
        assert self._helper is not None
        helper = self._helper
        batch_size = self.options.batch_size
        interval_s = min(self.options.flush_interval_ms / 1000.0, FORCED_FLUSH_INTERVAL_S)
        poll_s = min(CUTTER_POLL_S, interval_s)
        pack_every_s = min(PACK_EVERY_S, interval_s)
        # Batches handed to the helper and not yet shipped: id -> (envelope, records, rows).
        pending: dict[str, tuple[bytes, int, int]] = {}
        batch: _OpenBatch | None = None
        input_done = False
        crashes = 0
        try:
            self._start_helper(helper, pending, crashes)
            while not self._closed.is_set():
                self._take_answers(helper, pending)
                if not helper.alive():
                    self._take_answers(helper, pending)  # its last words
                    if pending or not input_done:
                        crashes += 1
                        self._start_helper(helper, pending, crashes)
                        input_done = False
                        continue
                stopping = self._stopping.is_set()
                now = time.monotonic()
                waiting = len(self._buffer)
                # A buffer full to its bound (batches in flight hold the rest) takes no more
                # records until they are taken: send the open batch now.
                full = waiting > 0 and waiting >= self._limit
                if waiting:
                    if batch is None:
                        batch = _OpenBatch(uuid.uuid4().hex, now)
                    self._pack_into(batch, self._take(min(waiting, batch_size - batch.records)))
                if batch is not None and (
                    batch.records >= batch_size
                    or full
                    or stopping
                    or now - batch.opened >= interval_s
                ):
                    self._send_to_helper(helper, pending, batch)
                    batch = None
                    continue
                if stopping and not waiting:
                    if not pending:
                        break
                    if not input_done:
                        helper.finish_input()
                        input_done = True
                self._warn_about_drops(now)
                wait_s = pack_every_s
                if batch is not None:
                    wait_s = min(wait_s, interval_s - (now - batch.opened))
                if stopping:
                    wait_s = poll_s
                self._wait_for(helper, max(poll_s / 10, wait_s))
        finally:
            if not pending and batch is None and self._stopping.is_set():
                helper.finish_input()  # it has shipped everything: it exits by itself
                helper.wait_exit(STOP_GRACE_S)
            helper.kill()
            for _, count, _ in pending.values():
                self._settle(count, shipped_rows=None)
            if batch is not None:
                self._settle(batch.records, shipped_rows=None)
            self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _start_helper(
        self, helper: HelperProcess, pending: dict[str, tuple[bytes, int, int]], crashes: int
    ) -> None:
        """Start the helper (again), and hand it every batch not yet shipped."""
        if crashes:
            logger.warning(
                "analytics: the shipping process ended unexpectedly; restarting it, %d batch(es) "
                "it had not shipped are handed over again",
                len(pending),
            )
            helper.kill()
            if self._closed.wait(backoff_s(crashes, base_s=SHIP_BACKOFF_BASE_S, max_s=1.0)):
                return
        while True:
            try:
                helper.start()
                break
            except OSError as exc:
                crashes += 1
                logger.error("analytics: cannot start the shipping process: %s", exc)
                if self._closed.wait(backoff_s(crashes, base_s=SHIP_BACKOFF_BASE_S, max_s=5.0)):
                    return
        for batch_id, (payload, _, _) in pending.items():
            if not helper.send(batch_id, payload):
                return  # it died again; the loop notices

    def _take(self, size: int) -> list[AnalyticsRecord]:
        # Under the lock, so that stats() sees each record either buffered or pending.
        with self._lock:
            records = [self._buffer.popleft() for _ in range(size)]
            self._in_flight += len(records)
            self._bound_buffer()
        return records

    def _pack_into(self, batch: _OpenBatch, records: list[AnalyticsRecord]) -> None:
        """Add the records to the open batch as packed rows, :data:`PACK_STEP` at a time."""
        packer = msgpack.Packer(datetime=True)
        for start in range(0, len(records), PACK_STEP):
            rows = self._rows(records[start : start + PACK_STEP])
            try:
                packed = b"".join(map(packer.pack, rows))
            except EncodeError:
                # Rare: a value msgpack cannot encode; only then is each record tried alone.
                packer = msgpack.Packer(datetime=True)
                rows = self._encodable(rows)
                packed = b"".join(map(packer.pack, rows))
            batch.parts.append(packed)
            batch.rows += len(rows)
            time.sleep(0)  # let a request thread waiting for the GIL have it
        batch.records += len(records)

    def _send_to_helper(
        self,
        helper: HelperProcess,
        pending: dict[str, tuple[bytes, int, int]],
        batch: _OpenBatch,
    ) -> None:
        if not batch.rows:
            self._settle(batch.records, shipped_rows=0)
            return
        payload = _envelope(batch.batch_id, batch.rows, batch.parts)
        pending[batch.batch_id] = (payload, batch.records, batch.rows)
        helper.send(batch.batch_id, payload)  # a dead helper is noticed and restarted by the loop

    def _take_answers(
        self, helper: HelperProcess, pending: dict[str, tuple[bytes, int, int]]
    ) -> None:
        for kind, batch_id in helper.read_acks():
            if kind == "S":
                item = pending.pop(batch_id, None)
                if item is not None:
                    self._settle(item[1], shipped_rows=item[2])
            elif kind == "F":
                with self._lock:
                    self._ship_failures += 1

    def _wait_for(self, helper: HelperProcess, timeout_s: float) -> None:
        """Sleep until the helper answers, stop() wakes us, or ``timeout_s`` passes."""
        fds = [self._wake_r]
        if helper.alive():
            fds.append(helper.ack_fd)
        with contextlib.suppress(OSError, ValueError):
            ready, _, _ = select.select(fds, [], [], timeout_s)
            if self._wake_r in ready:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)

    def _rows(self, records: list[AnalyticsRecord]) -> list[list[Any]]:
        """Rows ready to pack, with the reporter's expiry and detail settings applied."""
        default_expiry = expire_at_after(self.options.record_expiration_s)
        detailed = self.options.enable_detailed_recording
        rows = [
            [
                record.timestamp,
                record.username,
                record.effect,
                record.conclusion,
                record.request,
                record.policies if detailed else "",
                record.deciders if detailed else "",
                _aware(record.expire_at) if record.expire_at is not None else default_expiry,
            ]
            for record in records
        ]
        return rows

    @staticmethod
    def _encodable(rows: list[list[Any]]) -> list[list[Any]]:
        """The rows that msgpack can encode; each other record is refused and logged."""
        good = []
        for row in rows:
            try:
                msgpack.packb(row, datetime=True)
            except Exception as exc:
                # Which fields, and of what type: never their values, which are record content.
                logger.error(
                    "analytics: record refused, it cannot be encoded (%s): %s",
                    type(exc).__name__,
                    _unencodable_fields(row) or "unknown field",
                )
                continue
            good.append(row)
        return good

    def _ship(self, batch_id: str, rows: list[list[Any]]) -> bool:
        """Ship until it works or stop's deadline passes; True when shipped."""
        if not rows:
            return True
        assert self._transport is not None
        attempt = 0
        while True:
            try:
                self._transport.ship(batch_id, rows)
                return True
            except ShipError as exc:
                attempt += 1
                with self._lock:
                    self._ship_failures += 1
                if attempt == 1 or attempt % 10 == 0:
                    logger.warning(
                        "analytics: shipping failed (attempt %d), will retry: %s", attempt, exc
                    )
            pause_s = backoff_s(attempt, base_s=SHIP_BACKOFF_BASE_S, max_s=SHIP_BACKOFF_MAX_S)
            # Wakes as soon as stop() is done waiting, rather than sleeping out the backoff.
            if self._closed.wait(pause_s):
                return False


def _envelope(batch_id: str, rows: int, parts: list[bytes]) -> bytes:
    """``encode_envelope(batch_id, rows)``, byte for byte, from the rows already packed
    (``parts``: each a run of packed rows, ``rows`` of them in all)."""
    packer = msgpack.Packer(datetime=True)
    header = [
        packer.pack_map_header(2),
        packer.pack("id"),
        packer.pack(batch_id),
        packer.pack("records"),
        packer.pack_array_header(rows),
    ]
    return b"".join(header + parts)


def __getattr__(name: str) -> Any:
    # ReporterCollector on first use: a reporter that exports no metrics does not import
    # prometheus_client.
    if name == "ReporterCollector":
        from app.analytics_metrics import ReporterCollector

        return ReporterCollector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unencodable_fields(row: list[Any]) -> str:
    """The fields of a row msgpack cannot encode, named with their type."""
    bad = []
    for spec, value in zip(RECORD_FIELDS, row, strict=False):
        try:
            msgpack.packb(value, datetime=True)
        except Exception:
            bad.append(f"{spec.attribute} ({type(value).__name__})")
    return ", ".join(bad)
