"""Every exception tidings raises, in one place.

The tree::

    TidingsError                 base of everything below
    ├── ConfigurationError       bad options, bad handler, bad pattern (raised where you make the mistake)
    ├── EventValidationError     a payload does not fit its event's schema (raised by emit, in the caller)
    ├── BusStateError            an operation the bus cannot do in its current state
    ├── HandlerError             one handler call failed (given to failure hooks, never raised by emit)
    │   ├── HandlerTimeoutError  the call ran past its timeout (also a ``TimeoutError``)
    │   └── HandlerCancelledError the call was cancelled before it finished
    ├── DrainTimeoutError        shutdown's drain bound ran out with work left (also a ``TimeoutError``)
    ├── SerializationError       an event's payload or headers cannot be written to the event log
    └── StoreError               the event log failed (disk full, database gone); nothing is retried silently

``emit()`` never raises for anything its caller did not cause: no handler, a failing handler, a bus
that is shutting down or no bus at all are logged and reported, not raised into the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._core.envelope import Event
    from .store.base import DeadLetter

__all__ = [
    "BusStateError",
    "ConfigurationError",
    "DrainTimeoutError",
    "EventValidationError",
    "HandlerCancelledError",
    "HandlerError",
    "HandlerTimeoutError",
    "PendingDelivery",
    "SerializationError",
    "StoreError",
    "TidingsError",
]


class TidingsError(Exception):
    """Base class of every error tidings raises."""


class ConfigurationError(TidingsError):
    """Raised at set-up time for invalid options, handlers or patterns."""


class EventValidationError(TidingsError, ValueError):
    """An event's payload does not fit the schema registered for its name.

    Raised by ``emit()`` in the code that emitted it: a payload that breaks its schema is the
    caller's bug, and the caller is the one that can fix it.

    Attributes:
        event_name: the event's name.
        schema: the class its payload must fit.
        errors: one ``(field, message)`` pair per problem; ``field`` is a dotted path, or ``""``
            when the payload as a whole is wrong.
    """

    def __init__(self, event_name: str, schema: type, errors: Sequence[tuple[str, str]]) -> None:
        self.event_name = event_name
        self.schema = schema
        self.errors = tuple(errors)
        details = "; ".join(f"field {field!r}: {message}" if field else message for field, message in errors)
        super().__init__(f"event {event_name!r} does not fit {schema.__qualname__}: {details}")


class BusStateError(TidingsError):
    """Raised when the bus is asked to do something its lifecycle state does not allow.

    For example ``start()`` on a bus that is already running on another event loop: one bus serves
    one loop. (``emit()`` never raises it: an event with nowhere to go is logged and dropped.)
    """


class HandlerError(TidingsError):
    """One handler call failed.

    Never raised into the code that emitted the event: it is logged and passed to the bus's
    ``on_failure`` hook. The original exception is ``__cause__``.

    Attributes:
        event: the event (or, for batch handlers, the first event of the batch) being handled.
        handler: the handler's name.
        events: every event the failed call was given (one, or the whole batch).
        attempt: which attempt of this call failed (1 for the first; see :class:`~tidings.RetryPolicy`).
        retry_in: seconds until the next attempt, or ``None`` when there is none.
        dead_letters: the dead letters this failure made (one per event), when it was the last
            attempt; empty otherwise. A hook that alerts on dead letters checks this.
    """

    def __init__(
        self,
        message: str,
        *,
        events: Sequence[Event],
        handler: str,
        attempt: int = 1,
    ) -> None:
        super().__init__(message)
        self.events: tuple[Event, ...] = tuple(events)
        self.event: Event = self.events[0]
        self.handler = handler
        self.attempt = attempt
        self.retry_in: float | None = None
        self.dead_letters: tuple[DeadLetter, ...] = ()


class HandlerTimeoutError(HandlerError, TimeoutError):
    """A handler call ran longer than its timeout.

    An ``async def`` handler is cancelled at that point. A plain ``def`` handler cannot be interrupted
    (Python threads cannot be stopped from outside): it is reported when it passes its timeout and
    keeps its worker thread until it returns.
    """


class HandlerCancelledError(HandlerError):
    """A handler call was cancelled before it finished (by itself, or by shutdown's drain bound)."""


class PendingDelivery:
    """One (event, handler) call that had not finished when the drain bound ran out."""

    __slots__ = ("event", "handler")

    def __init__(self, event: Event, handler: str) -> None:
        self.event = event
        self.handler = handler

    def __repr__(self) -> str:
        return f"PendingDelivery(event={self.event.name!r}, id={self.event.id}, handler={self.handler!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PendingDelivery):
            return NotImplemented
        return self.event is other.event and self.handler == other.handler

    def __hash__(self) -> int:
        return hash((id(self.event), self.handler))


class DrainTimeoutError(TidingsError, TimeoutError):
    """The drain bound ran out before every pending handler call had finished.

    Attributes:
        pending: every (event, handler) call that was not finished, in the order it was due.
    """

    def __init__(self, message: str, *, pending: Sequence[PendingDelivery]) -> None:
        super().__init__(message)
        self.pending: tuple[PendingDelivery, ...] = tuple(pending)


class SerializationError(TidingsError):
    """An event could not be written to the durable event log (its payload is not JSON-serialisable).

    Given to the failure hook and logged; the event is still handled in this process, but it is not
    durable: a crash before its handlers finish loses it.

    Attributes:
        event: the event that could not be written.
    """

    def __init__(self, message: str, *, event: Event) -> None:
        super().__init__(message)
        self.event = event


class StoreError(TidingsError):
    """The durable event log failed: a write, a read, or opening it.

    Raised by the administrative calls (listing or replaying dead letters, opening the log); a
    failed write behind handler work is logged with what it was about to write, never dropped quietly.
    """
