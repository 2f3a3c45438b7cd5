"""The store protocol, and the records it keeps."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .._core.envelope import Event

__all__ = ["DeadLetter", "Delivery", "Store", "UnreadableLetter", "delivery_id", "matches", "names_match"]


def delivery_id(event_id: str, handler: str) -> str:
    """The id of one (event, handler) delivery, and of the dead letter it may become."""
    return f"{event_id}/{handler}"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One (event, handler) delivery that the log holds as not yet done.

    Attributes:
        event: the event, as it was recorded (its payload round-tripped through JSON).
        handler: the name of the handler it is for.
        attempts: how many attempts have failed so far.
    """

    event: Event
    handler: str
    attempts: int = 0

    @property
    def id(self) -> str:
        """``"<event id>/<handler>"``."""
        return delivery_id(self.event.id, self.handler)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery whose last attempt failed: kept until it is replayed or purged.

    Attributes:
        event: the event (with a durable store, its payload has round-tripped through JSON).
        handler: the name of the handler that failed.
        attempts: how many attempts were made.
        error: the last error, as ``"ExceptionType: message"``.
        traceback: the last error's formatted traceback (empty if there was none, as for a timeout).
        failed_at: when the last attempt failed (UTC).
    """

    event: Event
    handler: str
    attempts: int
    error: str
    traceback: str
    failed_at: datetime

    @property
    def id(self) -> str:
        """``"<event id>/<handler>"``: what ``show``, ``replay`` and ``purge`` take."""
        return delivery_id(self.event.id, self.handler)

    @staticmethod
    def now() -> datetime:
        """The current UTC time, as dead letters record it."""
        return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class UnreadableLetter:
    """A dead letter whose event a durable log cannot read back: its row was altered by hand, or
    written by an older version (:mod:`tidings.store.codec`). It cannot be listed or replayed, only
    purged (by its id, or by a filter on its event name and handler).

    Attributes:
        event_id: the id of its event.
        event_name: the name of its event.
        handler: the name of the handler that failed.
        error: why it cannot be read back (the event, and what is wrong with its row).
    """

    event_id: str
    event_name: str
    handler: str
    error: str

    @property
    def id(self) -> str:
        """``"<event id>/<handler>"``."""
        return delivery_id(self.event_id, self.handler)


def names_match(event_name: str, handler_name: str, *, event: str | None, handler: str | None) -> bool:
    """Whether an event name and a handler name pass shell-style patterns (``None``: any)."""
    if event is not None and not fnmatch.fnmatchcase(event_name, event):
        return False
    return handler is None or fnmatch.fnmatchcase(handler_name, handler)


def matches(letter: DeadLetter, *, ids: Iterable[str] | None, event: str | None, handler: str | None) -> bool:
    """Whether ``letter`` passes a filter: ids exactly, event and handler as shell-style patterns."""
    if ids is not None and letter.id not in ids:
        return False
    return names_match(letter.event.name, letter.handler, event=event, handler=handler)


class Store(Protocol):
    """Where the bus keeps deliveries (when ``durable``) and dead letters.

    The bus calls the write methods without awaiting them, from its event loop: they must not block
    (a durable store queues the write and commits it soon, in order). :meth:`record` is awaited: when
    it returns, the deliveries survive a crash. A failed write is logged with what it was writing;
    a write after :meth:`aclose` raises :class:`~tidings.StoreError` at once (the bus logs it with the
    deliveries it names), and so do the administrative methods.

    A delivery is *leased* by the process that recorded or claimed it until its lease runs out; only
    then may :meth:`claim` hand it to another process (or to the same one after a restart). That is
    how work of a process that died is resubmitted, and how two processes sharing a log never run
    the same delivery at once.
    """

    @property
    def durable(self) -> bool:
        """Whether deliveries survive the process: if not, the bus records none, only dead letters."""
        ...

    async def open(self) -> None:
        """Connect, and create the tables if they are missing. Called by the bus's start."""
        ...

    async def aclose(self) -> None:
        """Commit what is queued, then disconnect. Called by the bus after its drain."""
        ...

    async def record(self, deliveries: Sequence[tuple[Event, str]], *, lease: float) -> dict[str, str]:
        """Write pending (event, handler) deliveries, leased to this process for ``lease`` seconds.

        Returns:
            The events that could not be written (a payload that is not JSON-serialisable, or too
            large), by id, with the reason; their deliveries are not durable.
        """
        ...

    def complete(self, deliveries: Sequence[tuple[str, str]]) -> None:
        """Forget (event id, handler) deliveries that succeeded."""
        ...

    def retry_later(self, event_id: str, handler: str, *, attempts: int, due_in: float, lease: float) -> None:
        """Note a failed attempt of a delivery that will be tried again in ``due_in`` seconds."""
        ...

    def renew(self, deliveries: Sequence[tuple[str, str]], *, lease: float) -> None:
        """Extend the leases of deliveries this process still works on to ``lease`` seconds from now.

        A lease is never shortened (a retry waiting for its timer holds a longer one).
        """
        ...

    def bury(self, letters: Sequence[DeadLetter]) -> None:
        """Turn deliveries into dead letters (creating them if they were never recorded)."""
        ...

    async def claim(self, *, limit: int, lease: float) -> list[Delivery]:
        """Lease up to ``limit`` pending deliveries whose lease has run out, oldest event first."""
        ...

    async def dead_letters(
        self,
        *,
        ids: Sequence[str] | None = None,
        event: str | None = None,
        handler: str | None = None,
    ) -> list[DeadLetter]:
        """The dead letters that pass the filter (ids, or shell-style patterns), oldest event first.

        Selected by ids, a durable store reads the rows of those ids alone (by key), not the whole
        log: ``tidings dead-letters show ID`` must not cost a scan of every dead letter.
        """
        ...

    async def revive(self, ids: Sequence[str], *, lease: float) -> list[DeadLetter]:
        """Take the dead letters ``ids`` out, for the bus to run them again.

        A durable store turns them back into pending deliveries leased to this process (so a crash
        during the replay loses nothing); a store that is not durable just removes them.

        Returns:
            The dead letters revived (ids that were not dead letters are left out).
        """
        ...

    async def unreadable(
        self,
        *,
        ids: Sequence[str] | None = None,
        event: str | None = None,
        handler: str | None = None,
    ) -> list[UnreadableLetter]:
        """The dead letters that pass the filter but whose event cannot be read back, oldest first.

        They are what :meth:`dead_letters` leaves out. A store that keeps events as objects has none.
        Selected by ids, only the rows of those ids are read.
        """
        ...

    async def purge(
        self,
        ids: Sequence[str] | None = None,
        *,
        event: str | None = None,
        handler: str | None = None,
    ) -> int:
        """Delete the dead letters that pass the filter (none given: every one); return how many.

        The filter reads ids, event names and handler names alone, never an event's payload, so
        dead letters whose event cannot be read back are deleted like the others.
        """
        ...

    async def flush(self) -> None:
        """Wait until every write queued so far is committed."""
        ...
