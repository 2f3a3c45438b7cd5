"""Handle events in this process with plain functions: ``@local_handler.register(event_name="cat*")``.

Every registered function becomes a tidings handler of its own on the bus of each
:class:`~tidings.compat.fastapi_events.middleware.EventHandlerASGIMiddleware` given this
``LocalHandler``, so each call is isolated (a failing function never keeps the others from running,
and is logged, reported, retried or made a dead letter by itself), ``async def`` functions run on the
event loop and plain ``def`` ones in worker threads. Functions registered after the middleware was
built (handler modules imported late) are registered on its bus then, and run from then on.

A function receives the event tuple ``(event_name, payload)`` as its first argument; its other
parameters may be FastAPI dependencies (``= Depends(...)`` or ``Annotated[..., Depends(...)]``),
solved by FastAPI for each call, with sub-dependencies, ``yield`` dependencies and the app's
``dependency_overrides``; any other parameter keeps its default, as in fastapi-events. A dependency
FastAPI cannot read (a parameter typed with a class it cannot validate, a decorator's ``*args``) is
solved as fastapi-events solved it: its own dependencies only (see ``_dependencies``).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import typing
import weakref
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ...._core.envelope import Event as Envelope
from ....exceptions import ConfigurationError
from .._dependencies import readable_dependency
from .._support import (
    await_result,
    event_tuple,
    is_async_callable,
    is_dependency,
    name_key,
    set_handler_loop,
    subscribe,
)
from .base import BaseEventHandler

if TYPE_CHECKING:
    from collections.abc import Callable

    from ...._core.bus import EventBus
    from ...._core.registry import HandlerSpec
    from ..typing import Event, EventName

__all__ = ["LocalHandler", "local_handler"]

logger = logging.getLogger("tidings")

FuncT = TypeVar("FuncT", bound="Callable[..., Any]")

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _qualname(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None) or type(func).__module__
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}.{qualname}"


def _adapt(func: Callable[..., Any]) -> Callable[..., Any]:
    """A tidings handler that calls ``func`` with the event tuple and its FastAPI dependencies.

    Its signature shows tidings what to give it: the event envelope first, then ``func``'s
    dependency parameters (annotations resolved), so tidings' FastAPI integration solves them.

    Raises:
        ConfigurationError: ``func`` cannot take the event as its first positional argument, or has
            another required parameter that is not a dependency (no call could ever succeed).
    """
    label = _qualname(func)
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the signature of handler {label}: {exc}") from exc
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # an annotation that cannot be resolved: use them as written
        hints = dict(getattr(func, "__annotations__", None) or {})
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (*_POSITIONAL, inspect.Parameter.VAR_POSITIONAL):
        raise ConfigurationError(
            f"handler {label} must take the event, the tuple (event_name, payload), as its first argument"
        )
    dependencies: list[inspect.Parameter] = []
    views: dict[int, tuple[object, object]] = {}
    for parameter in parameters[1:]:
        annotation = hints.get(parameter.name, parameter.annotation)
        if is_dependency(annotation, parameter.default):
            keyword = parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
            dependencies.append(readable_dependency(keyword, label, views))
        elif isinstance(annotation, str) and ("Depends(" in annotation or "Security(" in annotation):
            raise ConfigurationError(
                f"handler {label}: the annotation of {parameter.name!r} ({annotation}) cannot be "
                "resolved, so its FastAPI dependency cannot be read; define the names it uses at "
                "module level, outside TYPE_CHECKING"
            )
        elif parameter.default is inspect.Parameter.empty and parameter.kind in (
            *_POSITIONAL,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            raise ConfigurationError(
                f"handler {label}: parameter {parameter.name!r} is neither the event nor a FastAPI "
                "dependency (Depends), so nothing can fill it"
            )
    first = parameters[0].name if parameters[0].kind in _POSITIONAL else "event"
    if first in {p.name for p in dependencies}:  # *args first, and a dependency named "event"
        first = "_fastapi_events_event"

    # One closure per combination, each doing no more than it must: a call through it costs about
    # 0.15 µs more than a tidings handler called directly (a coroutine and a tuple; bench/README.md).
    adapter: Callable[..., Any]
    if is_async_callable(func):
        if dependencies:

            async def adapter(event: Envelope, /, **values: Any) -> Any:
                return await func(
                    event_tuple(event) if event.headers else (event.name, event.payload), **values
                )

        else:

            async def adapter(event: Envelope, /) -> Any:
                return await func(event_tuple(event) if event.headers else (event.name, event.payload))

    elif dependencies:

        def adapter(event: Envelope, /, **values: Any) -> Any:
            return func(event_tuple(event) if event.headers else (event.name, event.payload), **values)

    else:

        def adapter(event: Envelope, /) -> Any:
            result = func(event_tuple(event) if event.headers else (event.name, event.payload))
            if result is not None:  # a decorator's plain def wrapper returns its coroutine
                await_result(result)

    signature = inspect.Signature(
        [inspect.Parameter(first, inspect.Parameter.POSITIONAL_ONLY, annotation=Envelope), *dependencies]
    )
    adapter.__signature__ = signature  # type: ignore[union-attr]  # read by inspect.signature
    adapter.__annotations__ = {first: Envelope, **{p.name: p.annotation for p in dependencies}}
    adapter.__module__ = getattr(func, "__module__", None) or adapter.__module__
    adapter.__qualname__ = getattr(func, "__qualname__", adapter.__qualname__)
    adapter.__name__ = getattr(func, "__name__", adapter.__name__)
    adapter.__doc__ = getattr(func, "__doc__", None)
    adapter.__wrapped__ = func  # type: ignore[union-attr]  # tidings list shows where func is defined
    return adapter


class LocalHandler(BaseEventHandler):
    """Functions registered per event name pattern, each run as a tidings handler of its own.

    Patterns are Unix shell-style (``fnmatch``): ``"*"`` (every event, the default), ``"cat*"``,
    ``"order.?"``. A name given as an ``Enum`` member matches as fastapi-events matches it: a
    ``str``-valued member (``StrEnum``) as its value, any other as ``str(member)``
    (``"UserEvents.SIGNED_UP"``); registering with the member itself always matches it.

    For each event, the matching functions run in registration order (``async def`` ones on the
    loop, one after another; plain ``def`` ones in a worker thread, one after another, except that
    one with ``Depends`` parameters takes its turn among the ``async def`` ones, where its
    dependencies are solved, and then a thread hop of its own). A function registered twice, under
    two patterns that both match, runs once.

    Example:
        >>> from tidings.compat.fastapi_events.handlers.local import LocalHandler
        >>> handler = LocalHandler()
        >>> @handler.register(event_name="cat*")
        ... async def handle_cat_events(event):
        ...     event_name, payload = event
        ...     print(event_name, payload)
        >>> import asyncio
        >>> asyncio.run(handler.handle(("cat-spotted", {"id": 1})))
        cat-spotted {'id': 1}
    """

    def __init__(self) -> None:
        self._registry: dict[str, list[Callable[..., Any]]] = {}
        """Pattern -> functions, in registration order (as fastapi-events keeps them)."""
        self._registrations: list[tuple[str, Callable[..., Any]]] = []
        self._adapters: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}
        self._buses: weakref.WeakSet[EventBus] = weakref.WeakSet()
        self._direct: EventBus | None = None

    @overload
    def register(self, _func: FuncT, event_name: EventName = "*") -> FuncT: ...

    @overload
    def register(self, _func: None = None, event_name: EventName = "*") -> Callable[[FuncT], FuncT]: ...

    def register(
        self, _func: FuncT | None = None, event_name: EventName = "*"
    ) -> FuncT | Callable[[FuncT], FuncT]:
        """Register a function for the events whose name matches ``event_name``; a decorator too.

        The function receives the tuple ``(event_name, payload)`` as its first argument; its other
        parameters may be FastAPI dependencies. It is returned unchanged.

        Args:
            _func: the function (omitted when used as ``@local_handler.register(event_name=...)``).
            event_name: an event name or ``fnmatch`` pattern (``str`` or ``Enum`` member); ``"*"``
                (the default) matches every event.

        Returns:
            The function (or a decorator that registers one).

        Raises:
            tidings.ConfigurationError: the function cannot take the event as its first argument,
                has a required parameter that is neither the event nor a dependency, or has
                dependencies FastAPI cannot read.
        """
        pattern, _ = name_key(event_name)

        def wrap(func: FuncT) -> FuncT:
            self._register(pattern, func)
            return func

        if _func is None:
            return wrap
        return wrap(_func)

    def _register(self, pattern: str, func: Callable[..., Any]) -> None:
        entry = self._adapters.get(id(func))
        if entry is None or entry[0] is not func:
            entry = (func, _adapt(func))
            self._adapters[id(func)] = entry
        adapter = entry[1]
        for bus in list(self._buses):
            subscribe(bus, adapter, pattern, _qualname(func))
        if self._direct is not None:
            subscribe(self._direct, adapter, pattern, _qualname(func))
        self._registry.setdefault(pattern, []).append(func)
        self._registrations.append((pattern, adapter))

    def attach(self, bus: EventBus) -> None:
        """Register every function on ``bus``, and the functions registered later as they come.

        The middleware calls this for the ``LocalHandler`` objects in its ``handlers``. Idempotent.

        Raises:
            tidings.ConfigurationError: a function has dependencies FastAPI cannot read.
        """
        if bus in self._buses:
            return
        for pattern, adapter in self._registrations:
            subscribe(bus, adapter, pattern, _qualname(adapter))
        self._buses.add(bus)

    def _direct_bus(self) -> EventBus:
        if self._direct is None:
            from ...._core.bus import EventBus

            bus = EventBus(name="local_handler.handle", handler_timeout=None)
            for pattern, adapter in self._registrations:
                subscribe(bus, adapter, pattern, _qualname(adapter))
            self._direct = bus
        return self._direct

    async def handle(self, event: Event) -> None:
        """Run the functions matching ``event``'s name now, in registration order, and wait for them.

        For calling a ``LocalHandler`` by hand (tests, scripts); the middleware does not call it.
        Every matching function runs even if one raises.

        Raises:
            Exception: the first exception a function raised (the others are logged).
        """
        name, payload = event
        key, headers = name_key(name)
        envelope = Envelope(key, payload, headers) if headers else Envelope(key, payload)
        first: Exception | None = None
        for spec in self._direct_bus().registry.resolve(key):
            try:
                await _call(spec, envelope)
            except Exception as exc:
                if first is None:
                    first = exc
                else:
                    logger.error("handler %s raised on %r", spec.name, key, exc_info=exc)
        if first is not None:
            raise first


async def _call(spec: HandlerSpec, envelope: Envelope) -> None:
    if spec.is_async:
        await spec.call(envelope)
    else:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # the caller's, as asyncio.to_thread would copy
        context.run(set_handler_loop, loop)  # no tidings scope here names the loop for await_result
        await loop.run_in_executor(None, context.run, spec.call, envelope)


local_handler = LocalHandler()
"""The process's default ``LocalHandler``: ``@local_handler.register(event_name="...")``."""
