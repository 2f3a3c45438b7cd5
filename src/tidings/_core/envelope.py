"""The event envelope: what every handler receives."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from time import time_ns
from types import MappingProxyType
from typing import Any, Final

__all__ = ["EMPTY_HEADERS", "Arguments", "Event", "Prebuilt", "TypedDump", "new_sequence"]

EMPTY_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# The 80 low bits of an id: a random start per process plus a counter, so ids from one process are
# strictly increasing and two processes collide only if they draw the same 80 random bits.
_RANDOM_BASE: Final = int.from_bytes(os.urandom(10), "big")
_MASK_80: Final = (1 << 80) - 1
_sequence = itertools.count()

new_sequence = _sequence.__next__
"""Return the next per-process sequence number (thread-safe: ``count.__next__`` is atomic)."""


def _encode_ulid(value: int) -> str:
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class Event:
    """One emitted event, as handlers see it.

    Attributes:
        name: the event name, e.g. ``"user.created"``.
        payload: whatever was emitted with it (``None`` when nothing was).
        headers: read-only metadata (correlation ids, trace context); never part of the payload.

    ``id`` is a ULID: 26 characters, unique, and sortable by emit time (strictly increasing within a
    process). ``time`` is the UTC time of the ``emit()`` call (``timestamp_ns`` defaults to now, for
    events built by hand in tests). ``id`` and ``time`` are computed on first access, so handlers that
    never read them pay nothing for them.
    """

    __slots__ = ("_id", "_seq", "headers", "name", "payload", "timestamp_ns")

    def __init__(
        self,
        name: str,
        payload: Any = None,
        headers: Mapping[str, str] = EMPTY_HEADERS,
        timestamp_ns: int | None = None,
        id: str | None = None,
    ) -> None:
        self.name = name
        self.payload = payload
        self.headers = headers
        self.timestamp_ns = time_ns() if timestamp_ns is None else timestamp_ns
        self._seq = new_sequence()
        self._id = id

    @property
    def id(self) -> str:
        """The event's ULID (unique, sortable by emit time)."""
        if self._id is None:
            millis = self.timestamp_ns // 1_000_000
            self._id = _encode_ulid((millis << 80) | ((_RANDOM_BASE + self._seq) & _MASK_80))
        return self._id

    @property
    def time(self) -> datetime:
        """When the event was emitted, as an aware UTC datetime."""
        return datetime.fromtimestamp(self.timestamp_ns / 1e9, tz=UTC)

    def __repr__(self) -> str:
        return f"Event(name={self.name!r}, payload={self.payload!r}, id={self.id!r})"


class Arguments:
    """The payload of an event emitted with several arguments, e.g. ``emit_now("paid", id, 9.99)``.

    Handlers whose parameters are the arguments are called with them:
    ``async def on_paid(order_id: str, amount: float)``. Handlers that take the
    :class:`Event` find them in ``event.payload.args`` and ``event.payload.kwargs``.

    Example:
        >>> Arguments(("order-1", 9.99), {"currency": "EUR"})
        Arguments('order-1', 9.99, currency='EUR')
    """

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None) -> None:
        self.args = tuple(args)
        self.kwargs: Mapping[str, Any] = MappingProxyType(dict(kwargs or {}))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Arguments):
            return NotImplemented
        return self.args == other.args and self.kwargs == other.kwargs

    def __hash__(self) -> int:
        return hash((self.args, tuple(sorted(self.kwargs.items()))))

    def __repr__(self) -> str:
        parts = [repr(arg) for arg in self.args] + [f"{key}={value!r}" for key, value in self.kwargs.items()]
        return f"Arguments({', '.join(parts)})"


class TypedDump(dict[str, Any]):
    """A typed event's fields as the durable log gives them back, with the class they were.

    A handler that takes the envelope sees a ``dict`` (this is one); a parameter typed with that
    very class gets them validated into an instance again (:mod:`tidings._core.binding`), which a
    plain dict's fields could not tell apart from a payload that only holds such a field.
    """

    __slots__ = ("type_keys",)

    def __init__(self, *args: Any, type_keys: tuple[str, ...] = (), **kwargs: Any) -> None:
        # built like a dict too (``dataclasses.asdict`` and ``copy`` do), then with no class
        super().__init__(*args, **kwargs)
        self.type_keys = type_keys  # schemas.class_key() of the class and of its event-class bases


class Prebuilt(Mapping[str, str]):
    """The headers slot of an emitted record whose :class:`Event` exists already.

    An event released by the transactional outbox was written to the log, id and all, before it was
    emitted; it must keep that id. Records are plain tuples on the hot path, so instead of a fifth
    field the event rides in the headers slot, wrapped in this type (its mapping is the event's
    headers). The runner takes the event out instead of building a new one.
    """

    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event

    def __getitem__(self, key: str) -> str:
        return self.event.headers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.event.headers)

    def __len__(self) -> int:
        return len(self.event.headers)
