"""What the compatibility modules share: event names, the disable switch, buses by middleware id.

**Names.** fastapi-events matches handler patterns against ``str(name)`` unless the name is a ``str``
already: a plain ``Enum`` member ``UserEvents.SIGNED_UP`` matches as ``"UserEvents.SIGNED_UP"``, a
``str``-valued one (``StrEnum``, ``class E(str, Enum)``) as its value. tidings' event names are plain
``str``, so the same rule makes the tidings name (:func:`name_key`), and handlers still get the member
itself: the event carries a reference to it in a header (:data:`NAME_HEADER`), which survives a durable
event log too, and :func:`event_tuple` turns it back into the member.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import weakref
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

from .constants import FASTAPI_EVENTS_DISABLE_DISPATCH_ENV_VAR

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ..._core.bus import EventBus
    from ..._core.envelope import Event as Envelope
    from ..._core.registry import HandlerSpec
    from .typing import Event, EventName

__all__ = [
    "NAME_HEADER",
    "bus_for",
    "dispatch_disabled",
    "event_tuple",
    "is_dependency",
    "name_key",
    "register_bus",
    "subscribe",
]

logger = logging.getLogger("tidings")

NAME_HEADER: Final = "fastapi-events-name"
"""Header naming the ``Enum`` member an event was dispatched with: ``module:Class.MEMBER``."""

_members: dict[str, Enum] = {}  # NAME_HEADER value -> member, filled as members are dispatched
_members_lock = threading.Lock()


def name_key(name: EventName) -> tuple[str, Mapping[str, str] | None]:
    """The tidings event name for ``name``, and the headers that give handlers the ``Enum`` member back.

    Raises:
        TypeError: ``name`` is neither a ``str`` nor an ``Enum`` member.
    """
    if type(name) is str:
        return name, None
    if isinstance(name, str):  # StrEnum, (str, Enum), other str subclasses: fnmatch sees the value
        key = str.__str__(name)
    elif isinstance(name, Enum):
        key = str(name)
    else:
        raise TypeError(f"an event name must be a str or an Enum member, got {type(name).__name__}")
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


def is_dependency(annotation: object, default: object) -> bool:
    """Whether a parameter is a FastAPI dependency: ``= Depends(...)`` or ``Annotated[..., Depends(...)]``.

    Duck-typed (``fastapi.params.Depends`` and ``Security``), so that nothing imports FastAPI here.
    """
    import typing

    def marker(value: object) -> bool:
        return type(value).__module__.startswith("fastapi.") and hasattr(value, "dependency")

    if marker(default):
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return any(marker(meta) for meta in typing.get_args(annotation)[1:])
    return False


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
