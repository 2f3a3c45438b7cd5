"""The pure ASGI middleware: request scopes, after-response delivery, lifespan integration."""

from __future__ import annotations

import asyncio
import logging
from threading import get_ident
from typing import TYPE_CHECKING

from .._core.bus import EventBus
from .._core.dispatcher import Scope as EventScope
from .._core.dispatcher import current_scope, reset_scope, set_scope
from .._core.runner import Job, task_of
from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._core.policies import RequestErrorPolicy
    from ..types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["TidingsMiddleware"]

logger = logging.getLogger("tidings")

new_job = object.__new__


class TidingsMiddleware:
    """Gives each request its own event buffer and runs the bus with the app's lifespan.

    * **HTTP**: events emitted while the request runs (endpoint, dependencies, background tasks,
      sync endpoints in the threadpool) are buffered and handled after the app has returned, that
      is after the last body chunk was sent, streaming responses included. They run in the
      request's own task, in emit order (or in a bus task, with ``request_handlers="task"``). If
      the app raises, the ``request_errors`` policy decides: ``"deliver"`` (default: handled in a
      bus task, so they never delay the error response still to be sent; with no lifespan, before
      it) or ``"drop"``. A request that finishes after the bus closed has its events logged and
      dropped, as any event emitted to a closed bus.
      Tasks the request started that emit after it finished hand their events to the bus
      directly: nothing is lost. With several tidings middlewares on one app (a bus each), each
      bus's events wait for its own middleware's request: ``emit()`` goes to the innermost
      middleware's bus, ``other_bus.emit()`` waits for the response as well.
    * **websocket**: a connection can last for hours, so its events are not held until it closes:
      each is handed to the bus when emitted.
    * **lifespan**: the bus starts before the app's startup code runs (so startup code can emit),
      and is drained before the app's shutdown code runs (so handlers still have the database
      pools and clients that code closes). Events emitted by shutdown code are drained at the end.
      The drain bound (``drain_timeout``) covers both drains. Without a lifespan (some test
      clients), the bus starts at the first request; close it yourself with ``await bus.aclose()``.

    Args:
        app: the ASGI app to wrap.
        bus: the bus whose handlers run this app's events.
        request_errors: overrides the bus's policy for requests whose app raised.

    Example:
        >>> from fastapi import FastAPI
        >>> from tidings import EventBus, TidingsMiddleware
        >>> bus = EventBus()
        >>> app = FastAPI()
        >>> app.add_middleware(TidingsMiddleware, bus=bus)
    """

    __slots__ = ("app", "bus", "named_app", "request_errors", "track_response")

    def __init__(
        self, app: ASGIApp, *, bus: EventBus, request_errors: RequestErrorPolicy | None = None
    ) -> None:
        if not isinstance(bus, EventBus):
            raise ConfigurationError(f"TidingsMiddleware needs bus=EventBus(...), got {bus!r}")
        if request_errors not in (None, "drop", "deliver"):
            raise ConfigurationError(
                f"request_errors must be 'drop', 'deliver' or None, got {request_errors!r}"
            )
        self.app = app
        # Wrapped by hand (TidingsMiddleware(app, bus=bus)), no scope names the app at this level:
        # this names it for FastAPI dependencies in handlers (their overrides are the app's).
        self.named_app = app if hasattr(app, "dependency_overrides") else None
        if bus.app is None and self.named_app is not None:
            bus.app = self.named_app
        self.bus = bus
        self.request_errors: RequestErrorPolicy = request_errors or bus.request_errors
        # "drop" needs the status of the response started (if one did) when the app raised; this
        # wraps send to record it (the Litestar plugin's wrapper also judges the errors it answers)
        self.track_response: Callable[[Job, Send], Send] | None = (
            _tracking if self.request_errors == "drop" else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # HTTP is inlined here rather than in a method: one coroutine layer less per request.
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
        bus = self.bus
        if not bus.enabled:
            await self._not_http(scope, receive, send)
            return
        # ensure_running()'s check, inlined (a call less per request): the bus serves a loop that
        # runs a task on this thread, so this one's, and the task is this request's (kept for its
        # job, which holds it so that drain and timeouts can cancel it). Else the bus starts now
        # (no lifespan; a test client without one starts it for each request), or was started by
        # hand: the app of this request is the one whose overrides handlers use.
        loop = bus.serving_loop
        task = task_of(loop) if loop is not None and get_ident() == bus.loop_thread else None
        if task is None:
            if bus.ensure_running() or bus.app is None:
                bus.app = self.named_app or scope.get("app")
            task = asyncio.current_task()
        elif bus.app is None:
            bus.app = self.named_app or scope.get("app")
        events = new_job(Job)  # open_request(), inlined: Job(bus, []) without a type call's __init__
        events.bus = bus
        events.buffer = []
        outer = current_scope()
        if outer is not None:  # e.g. an outer tidings middleware's request: its bus's events still wait
            events.parent = outer
        if self.track_response is not None:
            send = self.track_response(events, send)
        token = set_scope(events)
        try:
            try:
                await self.app(scope, receive, send)
            except BaseException as exc:
                if self._app_raised(events, exc):
                    await bus.run_job(events, task)  # positional: a cheaper call
                raise
            if events.buffer:
                if not bus.request_handlers_inline:
                    bus.spawn_request_job(events)
                else:
                    await bus.run_job(events, task)  # positional: a cheaper call
            else:
                events.buffer = None  # tasks the request started now emit straight to the bus
        finally:
            reset_scope(token)

    def _app_raised(self, events: Job, exc: BaseException) -> bool:
        """Dispose of the events of a request whose app raised; ``True``: run them here, now."""
        bus = self.bus
        if isinstance(exc, asyncio.CancelledError):
            bus.adopt(events)  # this task cannot run handlers any more; the bus's own tasks can
        elif self.request_errors == "drop" and not 0 < events.response_status < 500:
            # A 5xx already sent is the failure's own error response, not finished work: Starlette's
            # ServerErrorMiddleware, inside the app when this middleware wraps it by hand, sends its
            # 500 and then re-raises.
            status = events.response_status
            when = f"after its {status} error response" if status else "before responding"
            bus.discard_request_events(
                events, f"the app raised {type(exc).__name__} {when} (request_errors='drop')"
            )
        elif not events.buffer:
            events.buffer = None
        elif bus.started_lazily:
            # No lifespan: a bus task would be cut off when the loop closes (a test client makes
            # one per request), so the error response waits for the handlers instead.
            return True
        else:
            # Not inline: the error response is still to be sent (by an outer middleware), and
            # handlers must not delay it.
            bus.spawn_request_job(events)
        return False

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        # websocket (or anything newer), or a disabled bus: events go straight to the bus
        if self.bus.enabled:
            self.bus.ensure_running()  # no lifespan ran (a test client not entered, --lifespan off)
        direct: EventScope = self.bus.direct_scope
        outer = current_scope()
        if outer is not None:  # an outer tidings middleware's request: its bus's events still wait
            direct = Job(self.bus, None)
            direct.parent = outer
        token = set_scope(direct)
        try:
            await self.app(scope, receive, send)
        finally:
            reset_scope(token)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        bus = self.bus
        app_before = bus.app
        # FastAPI dependencies in handlers use its overrides
        lifespan_app = bus.app = scope.get("app") or self.named_app or bus.app
        # ...and its lifespan state: the server's dict, which Starlette fills with what the lifespan yields
        bus.lifespan_state = scope.get("state")

        async def lifespan_receive() -> Message:
            message = await receive()
            kind = message.get("type")
            if kind == "lifespan.startup":
                await bus.start()
            elif kind == "lifespan.shutdown":
                await bus.begin_shutdown()
            return message

        async def lifespan_send(message: Message) -> None:
            if message.get("type") == "lifespan.startup.complete":
                bus.detect_tracing()  # apps often set OpenTelemetry up in their startup code
            elif message.get("type") in (
                "lifespan.shutdown.complete",
                "lifespan.shutdown.failed",
                "lifespan.startup.failed",  # the server stops; nothing else will close the bus
            ):
                await bus.aclose()
            await send(message)

        token = set_scope(bus.direct_scope)
        try:
            await self.app(scope, lifespan_receive, lifespan_send)
        finally:
            reset_scope(token)
            # the ended lifespan's resources (closed pools, often) are not for a later use of the bus
            if bus.lifespan_state is scope.get("state"):
                bus.lifespan_state = None
            if bus.app is lifespan_app:  # a later app's requests name their own
                bus.app = app_before


def _tracking(events: Job, send: Send) -> Send:
    async def tracking_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            events.response_status = message["status"]
        await send(message)

    return tracking_send
