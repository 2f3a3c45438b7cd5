"""The dead letters of a bus: list, inspect, replay, purge (the Python side of ``tidings dead-letters``)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..exceptions import BusStateError, ConfigurationError, StoreError
from ..store._rows import naming_unreadable
from .logs import fields
from .runner import call_for

if TYPE_CHECKING:
    import builtins
    from collections.abc import Sequence

    from ..store.base import DeadLetter, UnreadableLetter
    from .bus import EventBus
    from .runner import Runner

__all__ = ["DeadLetters", "ReplayResult"]

logger = logging.getLogger("tidings")


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a replay did.

    Attributes:
        succeeded: dead letters whose handler ran and returned: they are gone.
        failed: dead letters whose handler failed again: by the handler's retry policy they are
            retried later, or dead letters again.
        skipped: dead letters no registered handler has the name of: left as they were.
        unreadable: selected dead letters whose event the store cannot read back (their rows were
            altered, or written by an older version), with why: they cannot be replayed, and stay
            until they are purged.
    """

    succeeded: tuple[DeadLetter, ...] = ()
    failed: tuple[DeadLetter, ...] = ()
    skipped: tuple[DeadLetter, ...] = ()
    unreadable: tuple[UnreadableLetter, ...] = ()


class DeadLetters:
    """The dead letters of one bus, from its store: ``bus.dead_letters``.

    Every method takes a filter: dead letter ids (``"<event id>/<handler>"``), and shell-style
    patterns for the event name and the handler name. :meth:`replay` and :meth:`purge` act on
    nothing unless given a filter or ``all=True``, so that a forgotten argument cannot replay or
    delete everything.

    Example:
        >>> import asyncio
        >>> from tidings import Event, EventBus
        >>> bus = EventBus()
        >>> broken = True
        >>> @bus.on("invoice.due", name="billing.send")
        ... def send(event: Event) -> None:
        ...     if broken:
        ...         raise ConnectionError("mail server down")
        >>> async def main() -> None:
        ...     async with bus:
        ...         bus.emit("invoice.due", {"invoice": 7})
        ...         await bus.drain()
        ...         [letter] = await bus.dead_letters.list()
        ...         print(letter.handler, letter.error)
        ...         global broken
        ...         broken = False
        ...         result = await bus.dead_letters.replay(all=True)
        ...         print(len(result.succeeded), await bus.dead_letters.list())
        >>> asyncio.run(main())
        billing.send ConnectionError: mail server down
        1 []
    """

    def __init__(self, bus: EventBus, runner: Runner) -> None:
        self._bus = bus
        self._runner = runner

    async def list(
        self, *, event: str | None = None, handler: str | None = None
    ) -> builtins.list[DeadLetter]:
        """The dead letters, oldest event first, optionally only those matching the patterns.

        Raises:
            StoreError: the store could not be read.
        """
        return await self._bus.store.dead_letters(event=event, handler=handler)

    async def get(self, letter_id: str) -> DeadLetter | None:
        """One dead letter by id, or ``None``.

        Raises:
            StoreError: the store could not be read, or that dead letter's event cannot be read
                back from it (purge it by its id).
        """
        store = self._bus.store
        with naming_unreadable():  # the error names it, the log need not
            found = await store.dead_letters(ids=[letter_id])
        if found:
            return found[0]
        unreadable = await store.unreadable(ids=[letter_id])
        if unreadable:
            raise StoreError(
                f"dead letter {letter_id} cannot be shown: {unreadable[0].error}; purge it by its id"
            )
        return None

    async def replay(
        self,
        ids: Sequence[str] | None = None,
        *,
        event: str | None = None,
        handler: str | None = None,
        all: bool = False,
    ) -> ReplayResult:
        """Run the selected dead letters' handlers again now, and wait for their first attempt.

        Each runs as a fresh delivery under its handler's retry policy (attempts start again at
        one; a policy's ``deadline`` still counts from when the event was emitted, so a letter
        older than that gets this one attempt). With a durable store it is a pending delivery
        again before it runs, so a crash during the replay loses nothing. It takes no concurrency
        slot, so a handler may replay. A call that does not succeed in this attempt (it fails,
        runs past its timeout, or is cut off by a drain) counts as failed.

        Raises:
            ConfigurationError: no filter and not ``all``.
            BusStateError: the bus is not running (start it, or use ``async with bus``).
            StoreError: the store could not be read or written.
        """
        letters = await self._select(ids, event, handler, all)
        bus = self._bus
        if bus.state.value not in ("running", "draining") or not bus.loop_is_open():
            raise BusStateError(f"bus {bus.name!r} is not running: start it to replay dead letters")
        unreadable = await self._unreadable(ids, letters, event, handler)
        registry = bus.registry
        known = [(letter, spec) for letter in letters if (spec := registry.named(letter.handler)) is not None]
        skipped = tuple(letter for letter in letters if registry.named(letter.handler) is None)
        for letter in skipped:
            logger.warning(
                "dead letter %s (event %r, id %s) not replayed: no handler is named %r",
                letter.id,
                letter.event.name,
                letter.event.id,
                letter.handler,
                extra=fields(letter.event.name, letter.event.id, letter.handler),
            )
        if not known:
            return ReplayResult(skipped=skipped, unreadable=unreadable)
        wanted = [letter.id for letter, _ in known]
        revived = {letter.id for letter in await bus.store.revive(wanted, lease=bus.resubmit_after)}
        chosen = [(letter, spec) for letter, spec in known if letter.id in revived]
        revive = bus.schemas.revive
        for letter, _ in chosen:
            letter.event.payload = revive(letter.event.name, letter.event.payload)
        calls = [call_for(spec, letter.event) for letter, spec in chosen]
        job = self._runner.run_calls(calls, attempt=1, recorded=self._runner.durable)
        job.failed = []
        # no concurrency slot (its task has not started): a replay from a handler, which holds
        # one, must not wait for another
        job.unbounded = True
        task = job.task  # the job lets go of it when it ends
        assert task is not None
        await asyncio.wait([task])  # a cancelled replay leaves the job running
        # by argument: the job may run the calls with other handler objects (traced ones)
        failed_calls = {id(arg) for _, arg in job.failed}
        unfinished: set[tuple[str, str]] = set()
        if task.cancelled() or job.cut_off:  # drain or shutdown cut it off
            reported = job.taken_over if job.taken_over is not None else job.unfinished(registry.resolve)
            unfinished = {(p.event.id, p.handler) for p in reported}
        outcomes = [
            (letter, id(call[1]) in failed_calls or (letter.event.id, letter.handler) in unfinished)
            for (letter, _), call in zip(chosen, calls, strict=True)
        ]
        return ReplayResult(
            succeeded=tuple(letter for letter, failed in outcomes if not failed),
            failed=tuple(letter for letter, failed in outcomes if failed),
            skipped=skipped,
            unreadable=unreadable,
        )

    async def purge(
        self,
        ids: Sequence[str] | None = None,
        *,
        event: str | None = None,
        handler: str | None = None,
        all: bool = False,
    ) -> int:
        """Delete the selected dead letters for good; return how many were deleted.

        The selection reads their ids, event names and handler names, never their events, so it
        also deletes dead letters whose event a durable log cannot read back (listings leave them
        out, logging their ids; :meth:`replay` names them as ``unreadable``).

        Raises:
            ConfigurationError: no filter and not ``all``.
            StoreError: the store could not be read or written.
        """
        _check_selection(ids, event, handler, all)
        if ids is not None and not ids:
            return 0
        return await self._bus.store.purge(None if ids is None else [*ids], event=event, handler=handler)

    async def _select(
        self, ids: Sequence[str] | None, event: str | None, handler: str | None, everything: bool
    ) -> builtins.list[DeadLetter]:
        _check_selection(ids, event, handler, everything)
        with naming_unreadable():  # _unreadable() names them, once each
            return await self._bus.store.dead_letters(ids=ids, event=event, handler=handler)

    async def _unreadable(
        self,
        ids: Sequence[str] | None,
        letters: builtins.list[DeadLetter],
        event: str | None,
        handler: str | None,
    ) -> tuple[UnreadableLetter, ...]:
        """The selected dead letters that cannot be replayed because their events cannot be read
        back (the listing left them out), each logged with why."""
        if ids is not None:  # only ids the listing did not return can be such
            listed = {letter.id for letter in letters}
            ids = [letter_id for letter_id in ids if letter_id not in listed]
            if not ids:
                return ()
        unreadable = await self._bus.store.unreadable(ids=ids, event=event, handler=handler)
        for letter in unreadable:
            logger.error(
                "dead letter %s cannot be replayed: %s; purge it by its id",
                letter.id,
                letter.error,
                extra=fields(letter.event_name, letter.event_id, letter.handler),
            )
        return tuple(unreadable)


def _check_selection(
    ids: Sequence[str] | None, event: str | None, handler: str | None, everything: bool
) -> None:
    if isinstance(ids, str):
        raise ConfigurationError("ids must be a sequence of dead letter ids, not one str")
    if ids is None and event is None and handler is None and not everything:
        raise ConfigurationError("select dead letters by ids, event or handler, or pass all=True")
