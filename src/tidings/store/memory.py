"""The in-memory store: dead letters for one process, nothing durable."""

from __future__ import annotations

import logging
from time import time
from typing import TYPE_CHECKING

from .._core.logs import fields
from ..exceptions import ConfigurationError
from .base import DeadLetter, Delivery, UnreadableLetter, delivery_id, matches

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._core.envelope import Event

__all__ = ["MemoryStore"]

logger = logging.getLogger("tidings")


class MemoryStore:
    """Keeps dead letters in this process's memory; the default store.

    Not durable: the bus records no deliveries in it (that is what makes it the fastest), so a crash
    loses the handler work in flight, and dead letters last as long as the process. Use
    :class:`~tidings.store.SQLiteStore` for a log that survives.

    Args:
        max_dead_letters: how many dead letters to keep; past it the oldest is dropped, with an error
            logged that names it (memory must stay bounded under a flood of failures).
    """

    durable = False

    def __init__(self, *, max_dead_letters: int = 10_000) -> None:
        if not isinstance(max_dead_letters, int) or max_dead_letters < 1:
            raise ConfigurationError(f"max_dead_letters must be an int >= 1, got {max_dead_letters!r}")
        self.max_dead_letters = max_dead_letters
        # id -> [delivery, lease until (unix time)]
        self._pending: dict[str, tuple[Delivery, float]] = {}
        self._dead: dict[str, DeadLetter] = {}

    async def open(self) -> None:
        """Nothing to open."""

    async def aclose(self) -> None:
        """Nothing to close: the letters stay, for a bus that starts again."""

    async def record(self, deliveries: Sequence[tuple[Event, str]], *, lease: float) -> dict[str, str]:
        """Keep ``deliveries`` as pending (for as long as the process lives)."""
        until = time() + lease
        for event, handler in deliveries:
            delivery = Delivery(event, handler)
            self._pending[delivery.id] = (delivery, until)
        return {}

    def complete(self, deliveries: Sequence[tuple[str, str]]) -> None:
        """Forget deliveries that succeeded."""
        for event_id, handler in deliveries:
            self._pending.pop(delivery_id(event_id, handler), None)

    def retry_later(self, event_id: str, handler: str, *, attempts: int, due_in: float, lease: float) -> None:
        """Note the failed attempt on the pending delivery, if it is kept."""
        key = delivery_id(event_id, handler)
        entry = self._pending.get(key)
        if entry is not None:
            delivery = Delivery(entry[0].event, handler, attempts)
            self._pending[key] = (delivery, time() + due_in + lease)

    def renew(self, deliveries: Sequence[tuple[str, str]], *, lease: float) -> None:
        """Extend the leases of pending deliveries (never shortening one)."""
        until = time() + lease
        for event_id, handler in deliveries:
            key = delivery_id(event_id, handler)
            entry = self._pending.get(key)
            if entry is not None and entry[1] < until:
                self._pending[key] = (entry[0], until)

    def bury(self, letters: Sequence[DeadLetter]) -> None:
        """Keep ``letters``; drop the oldest past ``max_dead_letters``, logging each one dropped."""
        for letter in letters:
            self._pending.pop(letter.id, None)
            self._dead.pop(letter.id, None)
            self._dead[letter.id] = letter
        while len(self._dead) > self.max_dead_letters:
            oldest = next(iter(self._dead))
            dropped = self._dead.pop(oldest)
            logger.error(
                "dead letter %s (event %r, id %s, handler %s) was dropped: the in-memory store keeps "
                "at most %d; use a durable store to keep them all",
                dropped.id,
                dropped.event.name,
                dropped.event.id,
                dropped.handler,
                self.max_dead_letters,
                extra=fields(dropped.event.name, dropped.event.id, dropped.handler),
            )

    async def claim(self, *, limit: int, lease: float) -> list[Delivery]:
        """Lease pending deliveries whose lease ran out (in one process: ones nobody is running)."""
        now = time()
        claimed: list[Delivery] = []
        for key, (delivery, until) in sorted(self._pending.items(), key=lambda item: item[1][0].event.id):
            if len(claimed) >= limit:
                break
            if until <= now:
                self._pending[key] = (delivery, now + lease)
                claimed.append(delivery)
        return claimed

    async def dead_letters(
        self,
        *,
        ids: Sequence[str] | None = None,
        event: str | None = None,
        handler: str | None = None,
    ) -> list[DeadLetter]:
        """The dead letters that pass the filter, oldest event first."""
        wanted = None if ids is None else set(ids)
        found = [d for d in self._dead.values() if matches(d, ids=wanted, event=event, handler=handler)]
        return sorted(found, key=lambda letter: (letter.event.id, letter.handler))

    async def revive(self, ids: Sequence[str], *, lease: float) -> list[DeadLetter]:
        """Take the dead letters ``ids`` out, for the bus to run (this store is not durable, so it
        does not keep them as pending deliveries)."""
        return [letter for key in ids if (letter := self._dead.pop(key, None)) is not None]

    async def unreadable(
        self,
        *,
        ids: Sequence[str] | None = None,
        event: str | None = None,
        handler: str | None = None,
    ) -> list[UnreadableLetter]:
        """None: this store keeps the events themselves, which always read back."""
        return []

    async def purge(
        self,
        ids: Sequence[str] | None = None,
        *,
        event: str | None = None,
        handler: str | None = None,
    ) -> int:
        """Delete the dead letters that pass the filter (none given: every one)."""
        chosen = [
            key
            for key in (list(self._dead) if ids is None else dict.fromkeys(ids))
            if (found := self._dead.get(key)) is not None
            and matches(found, ids=None, event=event, handler=handler)
        ]
        for key in chosen:
            del self._dead[key]
        return len(chosen)

    async def flush(self) -> None:
        """Nothing is queued."""

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._dead)} dead letter(s)>"
