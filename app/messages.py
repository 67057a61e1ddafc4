"""What travels through Celery: task and queue names, the batch reference, and the two senders.

A batch goes through two tasks: ``ingest`` (validate an envelope, fan out) on queue ``ingest``,
then one ``write`` per pump on queue ``pump.<name>``. Each task names its batch with a
:class:`BatchRef`: the bytes themselves, or the Redis key where they are kept once (a Redis
broker: see :mod:`app.stores.batches`). :class:`Sender` is the only code that publishes these
tasks, so queue, routing and time limits are decided here and nowhere else; the reporter, the
purge, the fan-out and dead-letter replay all go through it.

Message form (msgpack): ``ingest(ref={"inline": <bytes>} | {"key": <str>})`` and
``write(<pump name>, ref=...)``. Tasks published by earlier versions are still accepted:
``ingest(<bytes>)``, ``ingest(stored=<envelope key>)``, ``write(<pump>, <bytes>)`` and
``write(<pump>, stored=<batch id>)`` (see :func:`legacy_ref`).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgpack
from celery import Celery

from app.config import PumpEntryConfig
from app.stores.batches import INGEST_CLAIM, PUMP_CLAIM_PREFIX, ByteStore, EnvelopeStore, pump_claim
from app.stores.ledger import ledger_member

INGEST_TASK = "iam_pump.ingest"
PURGE_TASK = "iam_pump.purge"
SWEEP_TASK = "iam_pump.sweep"
WRITE_TASK = "iam_pump.write"
INGEST_QUEUE = "ingest"
PURGE_QUEUE = "purge"

#: A header every task we publish carries: when it was sent (Unix seconds). ``/metrics`` reads it
#: from the oldest message of each queue to tell how long that message has waited.
SENT_AT_HEADER = "iam_pump_sent_at"

_INLINE = "inline"
_KEY = "key"


def pump_queue(pump_name: str) -> str:
    """The queue of one pump's write tasks."""
    return f"pump.{pump_name}"


@dataclass(frozen=True, slots=True)
class BatchRef:
    """A batch on its way through Celery: its bytes inline, or the key of bytes kept in Redis."""

    inline: bytes | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.inline is None) == (self.key is None):
            raise ValueError("a batch reference holds either bytes or a key")

    @classmethod
    def from_message(cls, value: Any) -> BatchRef:
        """The reference a task received (``{"inline": bytes}`` or ``{"key": str}``)."""
        if isinstance(value, dict):
            if isinstance(value.get(_INLINE), bytes):
                return cls(inline=value[_INLINE])
            if isinstance(value.get(_KEY), str):
                return cls(key=value[_KEY])
        if isinstance(value, bytes):  # an earlier version's positional payload
            return cls(inline=value)
        raise ValueError(f"not a batch reference: {value!r:.80}")

    def to_message(self) -> dict[str, bytes | str]:
        """The form a task carries."""
        if self.inline is not None:
            return {_INLINE: self.inline}
        assert self.key is not None
        return {_KEY: self.key}

    @property
    def name(self) -> str:
        """How logs and dead letters name the batch before its bytes are read."""
        return self.key if self.key is not None else f"<{len(self.inline or b'')} bytes inline>"

    def load(self, store: ByteStore | None, claim: str) -> bytes | None:
        """The bytes; None when a copy of this task already finished with them (``claim``).

        Raises :class:`~app.stores.batches.BatchLostError` when kept bytes are gone.
        """
        if self.inline is not None:
            return self.inline
        assert self.key is not None
        if store is None:
            raise ValueError(f"batch {self.key} is kept in Redis, but no store was given")
        return store.load(self.key, claim)

    def release(self, store: ByteStore | None, claim: str) -> None:
        """Give up ``claim`` on kept bytes (the last claim frees them); nothing for inline."""
        if self.key is not None and store is not None:
            store.release(self.key, claim)


def legacy_ref(
    ref: Any,
    payload: bytes | None,
    stored: str | None,
    *,
    stored_key: Callable[[str], str] | None = None,
) -> BatchRef:
    """The reference of a task in either form: ``ref``, or an earlier version's arguments.

    ``stored_key`` turns an earlier write task's ``stored`` batch id into its key (earlier
    ingest tasks named the envelope key itself).
    """
    if ref is not None:
        return BatchRef.from_message(ref)
    if payload is not None:
        return BatchRef(inline=payload)
    if stored is not None:
        return BatchRef(key=stored_key(stored) if stored_key is not None else stored)
    raise ValueError("the task names no batch")


class Sender:
    """Publishes ingest and write tasks through one Celery app.

    ``envelopes`` is where envelopes are kept when the broker is Redis (None: they travel
    inline); ``pumps`` gives each pump's time limits; ``retry`` is Celery's publish retry (the
    reporter turns it off and retries whole batches itself).
    """

    def __init__(
        self,
        celery: Celery,
        *,
        envelopes: EnvelopeStore | None = None,
        pumps: Mapping[str, PumpEntryConfig] | None = None,
        retry: bool | None = None,
    ) -> None:
        self._celery = celery
        self._envelopes = envelopes
        self._pumps = pumps or {}
        self._options: dict[str, Any] = {} if retry is None else {"retry": retry}

    def envelope_ref(self, batch_id: str, envelope: bytes) -> BatchRef:
        """Keep the envelope on the broker's Redis if that is where batches live; its reference."""
        if self._envelopes is None:
            return BatchRef(inline=envelope)
        return BatchRef(key=self._envelopes.put(batch_id, envelope))

    def send_ingest(self, ref: BatchRef) -> None:
        """Publish one ingest task on queue ``ingest``."""
        self._celery.send_task(
            INGEST_TASK,
            kwargs={"ref": ref.to_message()},
            headers=_sent_now(),
            **route(INGEST_TASK),
            **self._options,
        )

    def send_again(self, claim: str, key: str) -> None:
        """Publish the task that settles ``claim`` on the bytes kept at ``key`` (the sweep)."""
        if claim == INGEST_CLAIM:
            self.send_ingest(BatchRef(key=key))
        elif claim.startswith(PUMP_CLAIM_PREFIX):
            self.send_write(claim[len(PUMP_CLAIM_PREFIX) :], BatchRef(key=key))
        else:
            raise ValueError(f"not a claim: {claim!r}")

    def send_write(self, pump: str, ref: BatchRef) -> None:
        """Publish one write task for ``pump`` on its queue, with its time limits."""
        entry = self._pumps.get(pump)
        limits = (
            {"soft_time_limit": entry.timeout_s, "time_limit": entry.hard_time_limit_s}
            if entry is not None
            else {}
        )
        self._celery.send_task(
            WRITE_TASK,
            args=(pump,),
            kwargs={"ref": ref.to_message()},
            headers=_sent_now(),
            **route(WRITE_TASK, (pump,)),
            **limits,
            **self._options,
        )


def _sent_now() -> dict[str, float]:
    return {SENT_AT_HEADER: round(time.time(), 3)}


def waiting_since(raw: bytes | str) -> float | None:
    """Since when (Unix seconds) a task message kombu's Redis transport keeps in a queue list
    has been due: its ETA if it has one (a retry's countdown), else when it was sent
    (:data:`SENT_AT_HEADER`); None for a message that says neither."""
    try:
        message = json.loads(raw)
        headers = message["headers"]
        eta = headers.get("eta")
        if isinstance(eta, str):
            return datetime.fromisoformat(eta).timestamp()
        sent_at = headers.get(SENT_AT_HEADER)
        if isinstance(sent_at, int | float) and not isinstance(sent_at, bool):
            return float(sent_at)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def route(task_name: str, args: Any = (), kwargs: Any = None, *_: Any, **__: Any) -> dict[str, str]:
    """The queue of a task: a Celery router (``task_routes``) and what the senders use."""
    if task_name == WRITE_TASK and args:
        return {"queue": pump_queue(str(args[0]))}
    if task_name in (PURGE_TASK, SWEEP_TASK):
        return {"queue": PURGE_QUEUE}
    if task_name == INGEST_TASK:
        return {"queue": INGEST_QUEUE}
    return {}


def claim_in_message(raw: bytes | str, *, stored_key: Callable[[str], str]) -> str | None:
    """The ledger member (:mod:`app.stores.ledger`) a task message settles, or None.

    ``raw`` is a message as kombu's Redis transport keeps it: the JSON of the message in a queue
    list, or of ``[message, exchange, routing key]`` in its ``unacked`` hash. Anything that is not
    one of our ingest or write tasks naming kept bytes answers None.
    """
    try:
        message = json.loads(raw)
        if isinstance(message, list):
            message = message[0]
        task = message["headers"]["task"]
        if task not in (INGEST_TASK, WRITE_TASK):
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = msgpack.unpackb(body if isinstance(body, bytes) else body.encode())
        kwargs = kwargs or {}
        if task == INGEST_TASK:
            positional = args[0] if args else None
            ref = legacy_ref(
                kwargs.get("ref", positional), kwargs.get("payload"), kwargs.get("stored")
            )
            claim = INGEST_CLAIM
        else:
            positional = args[1] if len(args) > 1 else None
            ref = legacy_ref(
                kwargs.get("ref", positional),
                kwargs.get("payload"),
                kwargs.get("stored"),
                stored_key=stored_key,
            )
            claim = pump_claim(str(args[0]))
    except (ValueError, KeyError, IndexError, TypeError, msgpack.UnpackException):
        return None
    return ledger_member(claim, ref.key) if ref.key is not None else None
