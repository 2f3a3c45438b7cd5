"""``EventHandlerASGIMiddleware``: fastapi-events' middleware, built on a tidings bus and middleware."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, TypeVar

from ..._core.bus import EventBus
from ...asgi.middleware import TidingsMiddleware
from ._support import (
    await_result,
    dispatch_disabled,
    event_tuple,
    is_async_callable,
    register_bus,
    reset_dispatch_off,
    set_dispatch_off,
    subscribe,
)
from .handlers.base import BaseEventHandler
from .handlers.local import LocalHandler
from .handlers.null import NullHandler

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ..._core.envelope import Event as Envelope
    from ..._core.runner import Job
    from ...types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("tidings")

__all__ = ["EventHandlerASGIMiddleware"]

_CallT = TypeVar("_CallT", bound="Callable[..., Any]")


class EventHandlerASGIMiddleware:
    """Runs the handlers of the events a request dispatched after its response has been sent.

    A pure ASGI middleware: a :class:`~tidings.TidingsMiddleware` over a :class:`~tidings.EventBus`
    of its own, on which each handler is registered (each function of a
    :class:`~tidings.compat.fastapi_events.handlers.local.LocalHandler` as a handler of its own).
    What that brings over fastapi-events:

    * one handler's exception never keeps the other handlers from running, and never escapes the
      ASGI app: it is logged (and reported to ``on_failure``, retried, made a dead letter, as the
      bus is configured);
    * plain ``def`` handlers run in worker threads, one thread hop per request (an awaitable one
      returns, as a decorator's wrapper of an ``async def`` does, is awaited on the event loop);
      one with ``Depends`` parameters has them solved on the loop, then a hop of its own per call;
    * the app's lifespan starts the bus before startup code runs and drains it at shutdown, within
      ``drain_timeout``, so events of startup code, of background tasks and of handlers are handled
      rather than lost;
    * events dispatched in a websocket are handled as they come, not when the connection closes.

    ``FASTAPI_EVENTS_DISABLE_DISPATCH`` is read at the start of each HTTP request: set to a truthy
    value, the request's ``dispatch()`` calls do nothing. Native ``tidings.emit()`` calls are not
    affected: their events are still handled after the response.

    Args:
        app: the ASGI app to wrap.
        handlers: handler objects: ``LocalHandler`` (``local_handler``), ``BaseEventHandler``
            subclasses, or any object with an ``async handle(event)`` or ``handle_many(events)``.
        middleware_id: an id for ``dispatch(..., middleware_id=...)``, to reach this middleware's
            handlers from outside a request (unique in the process; the latest middleware created
            with an id gets it).
        bus: the tidings bus to use (tidings' own option): to set retries, timeouts, a durable event
            log, ``on_failure``, ``request_handlers="task"`` and so on. By default a bus of its own
            with no handler timeout (fastapi-events has none).

    Raises:
        TypeError: a handler has neither ``handle`` nor ``handle_many``.
        tidings.ConfigurationError: a function of a ``LocalHandler`` has dependencies FastAPI
            cannot read.

    Example:
        >>> from fastapi import FastAPI
        >>> from tidings.compat.fastapi_events.handlers.local import local_handler
        >>> from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware
        >>> app = FastAPI()
        >>> app.add_middleware(EventHandlerASGIMiddleware, handlers=[local_handler])
    """

    __slots__ = ("_given", "_tidings", "app", "bus", "handlers", "middleware_id")

    def __init__(
        self,
        app: ASGIApp,
        handlers: Iterable[object],
        middleware_id: int | None = None,
        *,
        bus: EventBus | None = None,
    ) -> None:
        self.app = app
        # fastapi-events reads the caller's list at each request: objects appended later run too
        self._given = handlers if isinstance(handlers, list) else None
        self.handlers = list(handlers)
        self.middleware_id = middleware_id
        if bus is None:
            label = "fastapi-events" if middleware_id is None else f"fastapi-events[{middleware_id}]"
            bus = EventBus(name=label, handler_timeout=None)
        self.bus = bus
        self._tidings = _HandledBeforeTheError(app, bus=bus)
        for handler in self.handlers:
            _attach(handler, bus)
        if middleware_id is not None:
            register_bus(middleware_id, bus)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # (list != compares element by element in C, identity first: an object swapped in for
        # another at the same place is seen too)
        if self._given is not None and self._given != self.handlers:
            self._attach_given()
        if scope["type"] != "http":
            await self._tidings(scope, receive, send)
            return
        # Read once per request, as fastapi-events does. The request keeps its tidings scope either
        # way, so a native emit() in it is still handled after the response; the flag tells this
        # request's dispatch() calls (and its handlers') whether to drop their events.
        token = set_dispatch_off(dispatch_disabled())
        try:
            await self._tidings(scope, receive, send)
        finally:
            reset_dispatch_off(token)

    def _attach_given(self) -> None:
        """Attach the handler objects appended to the caller's ``handlers`` list since the last look."""
        given = list(self._given or ())
        attached = {id(handler) for handler in self.handlers}
        kept = given[: len(self.handlers)]
        if len(kept) < len(self.handlers) or any(
            a is not b for a, b in zip(kept, self.handlers, strict=True)
        ):
            logger.warning(
                "handlers were removed from or replaced in the handlers list of %r after it was built: "
                "they keep running (tidings registers a handler for good); new ones are added",
                self,
            )
        for handler in given:
            if id(handler) not in attached:
                _attach(handler, self.bus)
        self.handlers = given


class _HandledBeforeTheError(TidingsMiddleware):
    """Runs the events of a request whose app raised before the error goes on, as fastapi-events
    does (in its middleware's ``finally``): a test that checks what a failed request's handlers did
    finds it done. The native middleware hands them to a bus task instead, so that they never
    delay the error response."""

    __slots__ = ()

    def _app_raised(self, events: Job, exc: BaseException) -> bool:
        if (
            events.buffer
            and self.request_errors == "deliver"
            and self.bus.request_handlers_inline
            and not isinstance(exc, asyncio.CancelledError)
        ):
            return True
        return super()._app_raised(events, exc)


def _attach(handler: object, bus: EventBus) -> None:
    """Register ``handler`` on ``bus`` the way fastapi-events would call it."""
    cls = type(handler)
    if (
        isinstance(handler, LocalHandler)
        and getattr(cls, "handle", None) is LocalHandler.handle
        and getattr(cls, "handle_many", None) is LocalHandler.handle_many
    ):
        # Each function a handler of its own. A subclass that overrides handle() or handle_many()
        # (metrics, auditing) is called as fastapi-events calls it, below, so its code runs.
        handler.attach(bus)
        return
    if isinstance(handler, NullHandler):
        return  # it does nothing: registering it would only cost a call per request
    for subscription in bus.registry:
        target = subscription.handler.target
        if isinstance(target, _Adapter) and target.handler is handler:
            return  # attached already (the same bus given to two middlewares)
    base_name = f"{cls.__module__}.{cls.__qualname__}"
    handle_many = getattr(handler, "handle_many", None)
    handle = getattr(handler, "handle", None)
    default_many = getattr(cls, "handle_many", None) is BaseEventHandler.handle_many
    if callable(handle_many) and not (default_many and callable(handle)):
        subscribe(bus, _Adapter.batch(handler, handle_many), "*", base_name)
    elif callable(handle):
        subscribe(bus, _Adapter.each(handler, handle), "*", base_name)
    else:
        raise TypeError(
            f"{handler!r} is not an event handler: it needs an async handle(event) or "
            "handle_many(events) method (subclass BaseEventHandler)"
        )


class _Adapter:
    """Presents a handler object to tidings: ``handle`` (one event) or ``handle_many`` (a batch).

    tidings passes :class:`~tidings.Event` envelopes; the object gets ``(event_name, payload)``
    tuples, and a batch as a ``deque`` (what fastapi-events passes), by keyword ``events=``.
    Only one of the two slots is set: tidings picks a batch handler by ``handle_many`` being there.
    """

    __slots__ = ("handle", "handle_many", "handler")

    handle: Callable[[Envelope], Any]
    handle_many: Callable[[list[Envelope]], Any]

    def __init__(self, handler: object) -> None:
        self.handler = handler

    @classmethod
    def each(cls, handler: object, handle: Callable[[Any], Any]) -> _Adapter:
        adapter = cls(handler)
        if is_async_callable(handle):

            async def handle_one(event: Envelope) -> None:
                await handle(event_tuple(event))

            adapter.handle = _showing(handle_one, handle)
        else:

            def handle_one_sync(event: Envelope) -> None:
                result = handle(event_tuple(event))
                if result is not None:  # fastapi-events awaited what handle() returned
                    await_result(result)

            adapter.handle = _showing(handle_one_sync, handle)
        return adapter

    @classmethod
    def batch(cls, handler: object, handle_many: Callable[..., Any]) -> _Adapter:
        adapter = cls(handler)
        if is_async_callable(handle_many):

            async def handle_batch(events: list[Envelope]) -> None:
                await handle_many(events=deque(map(event_tuple, events)))

            adapter.handle_many = _showing(handle_batch, handle_many)
        else:

            def handle_batch_sync(events: list[Envelope]) -> None:
                result = handle_many(events=deque(map(event_tuple, events)))
                if result is not None:
                    await_result(result)

            adapter.handle_many = _showing(handle_batch_sync, handle_many)
        return adapter

    def __repr__(self) -> str:
        return f"<fastapi-events handler {self.handler!r}>"


def _showing(call: _CallT, method: Callable[..., Any]) -> _CallT:
    """``call``, marked as standing for the handler object's ``method``: ``tidings list`` follows
    ``__wrapped__`` to show where that is defined, as for ``LocalHandler``'s functions, rather than
    this module's closure. Its own signature stays what is read of it (``__signature__``, which
    ``inspect.signature`` stops at): registration checks it, not the method's, as before.
    """
    call.__signature__ = inspect.signature(call)  # type: ignore[attr-defined]  # read by inspect
    call.__wrapped__ = method  # type: ignore[attr-defined]  # read by inspect.unwrap
    return call
