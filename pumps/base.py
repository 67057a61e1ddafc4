"""The pump contract.

A pump writes batches of :class:`~app.record.AnalyticsRecord` to one sink. The write task owns
everything around the write - filters, omit-detailed, size limits, time limits, retries, dead
letters - so a pump only has to:

* declare its ``meta`` schema as a pydantic model in ``Meta`` and subclass ``Pump[ThatModel]``,
  so ``self.meta`` is typed (validated at start-up, so a bad key stops the process with its path
  named);
* open its client in :meth:`Pump.open` (called in the worker process, after the fork) and release
  it in :meth:`Pump.close`;
* write in :meth:`Pump.write` before the :class:`~pumps.deadline.Deadline` it is handed, raising
  :class:`~pumps.errors.PumpTemporaryError` when a retry may help and
  :class:`~pumps.errors.PumpPermanentError` when it cannot, and returning a :class:`WriteResult`
  with the records the sink refused one by one (they become dead letters, the rest of the batch
  is committed);
* tell the truth in :meth:`Pump.check`, used by the health endpoint, within
  :data:`~pumps.deadline.CHECK_TIMEOUT_S`.

Set ``upserts = True`` when writing the same record id twice stores it once; such a pump refuses
a record without an id. :mod:`pumps.testing` checks all of this for any pump.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Self, cast

from pydantic import BaseModel, ConfigDict
from typing_extensions import TypeVar

from app.record import AnalyticsRecord
from pumps.deadline import Deadline

#: Why an upserting pump refuses a record without an id: it could not be written only once.
NO_ID_REASON = "record has no id, so it cannot be upserted once"


class NoMeta(BaseModel):
    """The ``meta`` schema of a pump that takes no settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: The type of a pump's ``meta``; a bare ``Pump`` (any pump, as a host holds them) has BaseModel.
MetaT = TypeVar("MetaT", bound=BaseModel, default=BaseModel)


@dataclass(slots=True)
class WriteResult:
    """What a write did: the records the sink refused, each with the reason."""

    rejected: list[tuple[AnalyticsRecord, str]] = field(default_factory=list)


class Pump(Generic[MetaT]):
    """Base class of every pump; every hook but :meth:`write` defaults to doing nothing."""

    #: The ``meta`` model; set it to the class's type argument (``Pump[CSVMeta]`` -> CSVMeta).
    Meta: ClassVar[type[BaseModel]] = NoMeta
    #: True when the sink stores a record id once however often it is written.
    upserts: ClassVar[bool] = False
    #: True when the pump deals with oversized records itself (e.g. trims them), so the
    #: pipeline's ``max-record-size-bytes`` step is left out for it.
    handles_record_size: ClassVar[bool] = False

    def __init__(self, name: str, meta: MetaT, *, timeout_s: float) -> None:
        self.name = name
        self.meta: MetaT = meta
        self.timeout_s = timeout_s

    @classmethod
    def create(cls, name: str, meta: dict[str, Any], *, timeout_s: float) -> Self:
        """Build a pump from its raw ``meta`` (validated here, already checked at start-up)."""
        return cls(name, cast(MetaT, cls.Meta.model_validate(meta)), timeout_s=timeout_s)

    def open(self, *, deadline: Deadline | None = None) -> None:
        """Connect to the sink. Called once per worker process, before the first write.

        Whatever it waits for ends by ``deadline``; without one, within the pump's own timeout.
        The health check passes a short one, so a sink that is down cannot hang it.
        """

    def write(self, records: Sequence[AnalyticsRecord], *, deadline: Deadline) -> WriteResult:
        """Write the records by ``deadline``; see the module docstring for the error contract."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise a :class:`~pumps.errors.PumpError` saying why the sink is unusable, if it is."""

    def close(self) -> None:
        """Release the client. Called on worker shutdown; must be safe to call twice."""

    def open_deadline(self, deadline: Deadline | None) -> Deadline:
        """The deadline :meth:`open` works to: the one given, or the pump's own timeout."""
        return deadline if deadline is not None else Deadline.after(self.timeout_s)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
