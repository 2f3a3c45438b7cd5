"""What the compatibility modules share: event names, the disable switch, buses by middleware id.

**Names.** fastapi-events matches handler patterns against ``str(name)`` unless the name is a ``str``
already: a plain ``Enum`` member ``UserEvents.SIGNED_UP`` matches as ``"UserEvents.SIGNED_UP"``, a
``str``-valued one (``StrEnum``, ``class E(str, Enum)``) as its value. tidings' event names are plain
``str``, so the same rule makes the tidings name (:func:`name_key`), and handlers still get the member
itself: the event carries a reference to it in a header (:data:`NAME_HEADER`), which survives a durable
event log too, and :func:`event_tuple` turns it back into the member.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import threading
import weakref
from contextvars import ContextVar
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, NoReturn

from ..._core.dispatcher import current_scope
from ..._core.runner import awaited
from .constants import FASTAPI_EVENTS_DISABLE_DISPATCH_ENV_VAR

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..._core.bus import EventBus
    from ..._core.envelope import Event as Envelope
    from ..._core.registry import HandlerSpec
    from .typing import Event, EventName

__all__ = [
    "NAME_HEADER",
    "await_result",
    "bus_for",
    "dispatch_disabled",
    "dispatch_off",
    "event_tuple",
    "is_async_callable",
    "is_dependency",
    "is_depends_marker",
    "matched_name",
    "name_key",
    "register_bus",
    "subscribe",
]

logger = logging.getLogger("tidings")

NAME_HEADER: Final = "fastapi-events-name"
"""Header naming the ``Enum`` member an event was dispatched with: ``module:Class.MEMBER``."""

_members: dict[str, Enum] = {}  # NAME_HEADER value -> member, filled as members are dispatched
_members_lock = threading.Lock()


def matched_name(name: EventName) -> str:
    """The ``str`` fastapi-events matches patterns against: ``str(name)`` unless ``name`` is a ``str``.

    A plain ``Enum`` member is ``"UserEvents.SIGNED_UP"``; a ``str``-valued one (``StrEnum``,
    ``class E(str, Enum)``) is its value, the ``str`` it is.

    Raises:
        TypeError: ``name`` is neither a ``str`` nor an ``Enum`` member.
    """
    if isinstance(name, str):
        return str.__str__(name)
    if isinstance(name, Enum):
        return str(name)
    raise TypeError(f"an event name must be a str or an Enum member, got {type(name).__name__}")


def name_key(name: EventName) -> tuple[str, Mapping[str, str] | None]:
    """The tidings event name for ``name``, and the headers that give handlers the ``Enum`` member back.

    Raises:
        TypeError: ``name`` is neither a ``str`` nor an ``Enum`` member.
    """
    if type(name) is str:
        return name, None
    key = matched_name(name)
    if not isinstance(name, Enum):
        return key, None
    cls = type(name)
    ref = f"{cls.__module__}:{cls.__qualname__}.{name.name}"
    if _members.get(ref) is not name:
        with _members_lock:
            _members[ref] = name
    return key, {NAME_HEADER: ref}


def _member(ref: str) -> Enum | None:
    """The member ``ref`` names: dispatched in this process, or imported (an event read from a log)."""
    member = _members.get(ref)
    if member is not None:
        return member
    module_name, _, path = ref.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in path.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        return None
    if not isinstance(target, Enum):
        return None
    with _members_lock:
        _members[ref] = target
    return target


def event_tuple(event: Envelope) -> Event:
    """The ``(event_name, payload)`` tuple a fastapi-events handler expects for ``event``."""
    headers = event.headers
    if headers:  # EMPTY_HEADERS is falsy: a str-named event costs this one test
        ref = headers.get(NAME_HEADER)
        if ref is not None:
            member = _member(ref)
            if member is not None:
                return (member, event.payload)
    return (event.name, event.payload)


# -- FASTAPI_EVENTS_DISABLE_DISPATCH ------------------------------------------------------------------


def _environment_reader(name: str) -> Callable[[], str | None]:
    """A cheap reader of one environment variable, for a check made on every request.

    ``os.environ.get`` costs about 0.6 µs when the variable is unset (``Mapping.get`` raises and
    catches a ``KeyError``); the dict ``os.environ`` keeps its encoded items in costs 0.03 µs. That
    dict is what ``os.environ[...] = ...`` and ``monkeypatch.setenv`` update, so it is never stale;
    where it is not there (another Python), the plain lookup is used.
    """
    environ = os.environ
    data = getattr(environ, "_data", None)
    encodekey = getattr(environ, "encodekey", None)
    decodevalue = getattr(environ, "decodevalue", None)
    if isinstance(data, dict) and callable(encodekey) and callable(decodevalue):
        key = encodekey(name)
        get = data.get

        def read() -> str | None:
            value = get(key)
            return None if value is None else str(decodevalue(value))

        return read
    return lambda: environ.get(name)


_read_disable = _environment_reader(FASTAPI_EVENTS_DISABLE_DISPATCH_ENV_VAR)
_parsed: dict[str, bool] = {}


def dispatch_disabled() -> bool:
    """Whether ``FASTAPI_EVENTS_DISABLE_DISPATCH`` is set to a truthy value now.

    Values are read as fastapi-events reads them (``strtobool``). A value that is neither true nor
    false is logged once as a warning and counts as false: where fastapi-events raised ``ValueError``
    from every ``dispatch()``, a typo in a deployment's environment should not fail every request.
    """
    value = _read_disable()
    if value is None:
        return False
    try:
        return _parsed[value]
    except KeyError:
        pass
    from .utils import strtobool

    try:
        disabled = strtobool(value)
    except ValueError:
        logger.warning(
            "%s=%r is not a truth value (1/0, true/false, yes/no, on/off, y/n, t/f); dispatch() stays on",
            FASTAPI_EVENTS_DISABLE_DISPATCH_ENV_VAR,
            value,
        )
        disabled = False
    if len(_parsed) < 64:
        _parsed[value] = disabled
    return disabled


_dispatch_off: ContextVar[bool | None] = ContextVar(
    "tidings.compat.fastapi_events.dispatch_off", default=None
)
dispatch_off = _dispatch_off.get
"""Whether the middleware found dispatch disabled when the current request started (``None``
outside such a request: in startup code, or a handler of an event emitted there).

The request still runs in a tidings request scope, so native ``tidings.emit()`` keeps its meaning
(handled after the response); only ``dispatch()`` reads this, and drops its events.
"""
set_dispatch_off = _dispatch_off.set
reset_dispatch_off = _dispatch_off.reset


# -- buses by middleware id ---------------------------------------------------------------------------

_buses: weakref.WeakValueDictionary[object, EventBus] = weakref.WeakValueDictionary()
_unknown_ids: set[object] = set()


def register_bus(middleware_id: object, bus: EventBus) -> None:
    """Make ``dispatch(..., middleware_id=middleware_id)`` reach ``bus`` (the latest middleware wins)."""
    _buses[middleware_id] = bus
    _unknown_ids.discard(middleware_id)


def bus_for(middleware_id: object) -> EventBus | None:
    """The bus of the middleware created with ``middleware_id``; ``None`` (warned once) if none was."""
    bus = _buses.get(middleware_id)
    if bus is None and middleware_id not in _unknown_ids:
        _unknown_ids.add(middleware_id)
        logger.warning(
            "dispatch(middleware_id=%r): no EventHandlerASGIMiddleware was created with this id "
            "(an app builds its middleware when it first runs, at startup); the event goes where "
            "dispatch() without middleware_id would send it",
            middleware_id,
        )
    return bus


# -- registration -------------------------------------------------------------------------------------


def is_depends_marker(value: object) -> bool:
    """Whether ``value`` is ``Depends(...)`` or ``Security(...)``.

    Duck-typed (``fastapi.params.Depends`` and ``Security``), so that nothing imports FastAPI here.
    """
    return type(value).__module__.startswith("fastapi.") and hasattr(value, "dependency")


def is_dependency(annotation: object, default: object) -> bool:
    """Whether a parameter is a FastAPI dependency: ``= Depends(...)`` or ``Annotated[..., Depends(...)]``."""
    import typing

    if is_depends_marker(default):
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return any(is_depends_marker(meta) for meta in typing.get_args(annotation)[1:])
    return False


def is_async_callable(func: object) -> bool:
    """Whether calling ``func`` starts a coroutine: an ``async def``, or an async ``__call__``."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - an async __call__ on an instance
    )


_handler_loop: ContextVar[asyncio.AbstractEventLoop | None] = ContextVar(
    "tidings.compat.fastapi_events.handler_loop", default=None
)
set_handler_loop = _handler_loop.set
"""Name the loop for :func:`await_result` where no tidings scope does (``LocalHandler.handle``)."""


def await_result(result: object) -> None:
    """Wait, in a plain ``def`` handler's worker thread, for the awaitable the handler returned.

    fastapi-events awaited whatever ``handle()`` and ``handle_many()`` returned (it hands them to
    ``asyncio.gather``), so a plain ``def`` returning a coroutine (a decorator's wrapper, a client
    call's coroutine) was a working handler. tidings runs plain ``def`` handlers in worker threads
    and ignores what they return: the awaitable is run on the event loop the handlers serve (where
    its clients and pools live) and waited for here, so it fails, times out and is retried as the
    handler call it belongs to.

    Raises:
        Exception: what the awaitable raised.
        RuntimeError: no event loop is known to run it on, or this thread is running one.
    """
    if not inspect.isawaitable(result):
        return
    loop = _handler_loop.get()
    if loop is None:
        scope = current_scope()  # the handler job's: handlers run with their job as scope
        loop = scope.bus.loop if scope is not None else None
    if loop is None or loop.is_closed():
        _refuse(result, "no event loop is there to await it")
    if asyncio._get_running_loop() is not None:
        _refuse(result, "it was called on an event loop's thread, which waiting would block")
    asyncio.run_coroutine_threadsafe(awaited(result), loop).result()


def _refuse(awaitable: object, why: str) -> NoReturn:
    if inspect.iscoroutine(awaitable):
        awaitable.close()  # it will never run: no "never awaited" warning on top of this error
    raise RuntimeError(f"a plain def handler returned an awaitable, and {why}")


def subscribe(bus: EventBus, target: object, pattern: str, base_name: str) -> HandlerSpec | None:
    """Register ``target`` on ``bus`` for ``pattern``, under a handler name no other target has.

    tidings names handlers (its logs, event log and dead letters refer to them by name), and names
    must be unique; fastapi-events has no names, so two functions with the same qualified name (made
    by one factory, say) are both fine there. The second one gets ``#2`` after its name, and so on,
    in registration order. Registering a target again under a pattern it has already is a no-op.
    """
    registry = bus.registry
    for subscription in registry:
        if subscription.handler.target is target and subscription.pattern == pattern:
            return None
    name, number = base_name, 1
    while (existing := registry.named(name)) is not None and existing.target is not target:
        number += 1
        name = f"{base_name}#{number}"
    return bus.subscribe(target, pattern, name=name)
