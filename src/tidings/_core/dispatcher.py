"""``emit()``: find where the current code's events go, with no object passed around.

A context variable holds the current :class:`Scope`. The ASGI middleware sets one per HTTP request
(its ``buffer`` collects the request's events until the response is sent), per websocket and for the
lifespan (no buffer: events go straight to the bus). Handler runs set one too, so events emitted by
handlers chain. Code with no scope at all (a thread started by hand, a script) reaches the bus when
exactly one is running in the process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from enum import Enum
from threading import get_ident
from time import time_ns
from typing import TYPE_CHECKING, Any, Final

from .logs import fields

if TYPE_CHECKING:
    from .bus import EventBus

__all__ = [
    "DISABLE_ENV_VAR",
    "Record",
    "Scope",
    "current_scope",
    "emit",
    "emit_disabled_by_env",
    "normalize_name",
]

logger = logging.getLogger("tidings")

DISABLE_ENV_VAR: Final = "TIDINGS_DISABLE_EMIT"
_TRUTHY: Final = frozenset({"1", "true", "yes", "on"})

Record = tuple[str, Any, int, Mapping[str, str] | None]
"""An emitted event before it becomes an :class:`Event`: name, payload, time in ns, headers."""


class Scope:
    """Where events emitted in one context go.

    ``buffer`` is a list while the scope collects events (a request that has not finished, or a
    handler job whose chained events are handled in the same job); ``None`` means "hand each event
    to the bus at once". Only the bus's event-loop thread touches ``buffer``: other threads hand
    their events to the loop, so no event lands in a list the loop has already let go of.
    """

    __slots__ = ("buffer", "bus")

    def __init__(self, bus: EventBus, buffer: list[Record] | None) -> None:
        self.bus = bus
        self.buffer = buffer


_current: ContextVar[Scope | None] = ContextVar("tidings.scope", default=None)
current_scope = _current.get
set_scope = _current.set
reset_scope = _current.reset

_running_buses: list[EventBus] = []


def register_running(bus: EventBus) -> None:
    if bus not in _running_buses:
        _running_buses.append(bus)


def unregister_running(bus: EventBus) -> None:
    if bus in _running_buses:
        _running_buses.remove(bus)


def emit_disabled_by_env() -> bool:
    """Whether ``TIDINGS_DISABLE_EMIT`` is set to a truthy value (1, true, yes, on)."""
    return os.environ.get(DISABLE_ENV_VAR, "").strip().lower() in _TRUTHY


def normalize_name(name: object) -> str:
    """Turn an event name given as ``str``, ``str`` subclass or ``Enum`` into a plain ``str``.

    Raises:
        TypeError: ``name`` is neither.
    """
    if isinstance(name, Enum):
        name = name.value
    if isinstance(name, str):
        return str(name)
    raise TypeError(f"an event name must be a str or a str-valued Enum, got {type(name).__name__}")


def running_buses() -> tuple[EventBus, ...]:
    """The buses started and not closed, whether or not their event loops are still open."""
    return tuple(_running_buses)


def live_buses() -> list[EventBus]:
    """The buses running on an open event loop (one whose loop was closed under it cannot run).

    Process-wide on purpose: it only serves ``emit()`` calls made with no context at all (a plain
    thread), and it never picks a bus when more than one could be meant.
    """
    return [bus for bus in tuple(_running_buses) if bus.loop_is_open()]


def emit(event: object, payload: object = None) -> None:
    """Emit an event from anywhere: endpoint code, dependencies, helpers, handlers, tasks, threads.

    Inside an HTTP request the event is buffered and handled after the response has been sent. In a
    handler it joins the handler's job and is handled right after the current handlers. In a
    websocket, the app's lifespan or a task started from one of them, it goes to that bus's runner
    at once. Outside all of those it goes to the process's running bus, if exactly one is running.

    This is a plain, synchronous call that costs a fraction of a microsecond. It does not raise for
    anything its caller did not cause: an event with no handler is a no-op, a handler's failure
    never reaches the caller, and an event that has no bus to go to (none running, or several and
    no way to tell which) is logged as an error and dropped.

    Args:
        event: the event name, e.g. ``"user.created"`` (a ``str``, or an ``Enum`` with ``str``
            values), or a typed event: an instance of a Pydantic model or dataclass, named by its
            ``__event_name__`` or else its class name.
        payload: anything; handlers receive it as ``event.payload``.

    Raises:
        TypeError: ``event`` is neither a name nor a typed event.
        EventValidationError: the payload does not fit the schema the bus has for the name (the
            caller's bug, so it is raised here, in the caller).

    Example:
        >>> from tidings import emit
        >>> def register_user(email: str) -> None:
        ...     emit("user.created", {"email": email})
    """
    scope = _current.get()
    if scope is not None:
        buffer = scope.buffer
        if (
            buffer is not None
            and type(event) is str
            and get_ident() == scope.bus.emit_thread  # the loop's thread, and no schema or tap
        ):
            buffer.append((event, payload, time_ns(), None))
            return
        scope.bus.emit(event, payload)  # another thread, a typed event or schema, or no buffer
        return
    _emit_unscoped(event, payload)


def _emit_unscoped(event: object, payload: object) -> None:
    buses = live_buses()
    if len(buses) == 1:
        buses[0].emit(event, payload)
        return
    from .bus import EventBus  # a cycle at import time; this path is rare

    name, _ = EventBus.name_and_payload(event, payload)  # a bad event is the caller's bug anyway
    if emit_disabled_by_env():
        return
    if not buses:
        why = "no tidings bus is running (start the app, whose lifespan starts the bus)"
    else:
        why = f"{len(buses)} buses are running and it is not clear which one is meant"
    logger.error(
        "event %r was dropped: it was emitted outside any request, handler or lifespan, and %s; "
        "call bus.emit() on a started bus there",
        name,
        why,
        extra=fields(name),
    )
