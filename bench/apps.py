"""The ASGI apps under test: one builder per system, each set up the way its README shows.

Every app has one route, ``GET /``, that emits ``events`` events (or, in emit-cost mode, times a tight
loop of emits) and answers ``200 ok`` as plain text. Every handler is a no-op apart from counting its
call on the app's tally (:data:`TALLY` unless its :class:`AppSpec` gives another), so the benchmark can
tell when all of them have run (and check none was lost, and none ran twice).

This module deliberately does not use ``from __future__ import annotations``: Litestar and
fastapi-events read handler signatures at runtime.
"""

import asyncio
import atexit
import os
import shutil
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any, Final, Literal, cast, get_args

from ._types import ASGIApp

SystemName = Literal[
    "starlette",
    "tidings",
    "tidings-sqlite",
    "tidings-postgres",
    "fastapi-events",
    "tidings-compat",
    "litestar",
    "litestar-bare",
]
SYSTEMS: Final[tuple[SystemName, ...]] = get_args(SystemName)
DURABLE_SYSTEMS: Final[tuple[SystemName, ...]] = ("tidings-sqlite", "tidings-postgres")
EVENT_SYSTEMS: Final[tuple[SystemName, ...]] = (
    "tidings",
    *DURABLE_SYSTEMS,
    "fastapi-events",
    "tidings-compat",
    "litestar",
)
BARE_SYSTEMS: Final[tuple[SystemName, ...]] = ("starlette", "litestar-bare")
"""The frameworks without events: the baselines, which emit nothing and run no handler."""
LOOPBACK_SYSTEMS: Final[tuple[SystemName, ...]] = tuple(s for s in SYSTEMS if s not in DURABLE_SYSTEMS)
POSTGRES_DSN: Final = os.environ.get("TIDINGS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
POSTGRES_SCHEMA: Final = os.environ.get("TIDINGS_BENCH_POSTGRES_SCHEMA", "tidings_bench")

EVENT: Final = "bench.event"
PAYLOAD: Final = {"id": 1}

EmitFn = Callable[[str, Any], object]


class Tally:
    """Counts handler calls and lets the driver wait until a given count is reached.

    ``hit`` is for handlers running on the event loop, ``hit_threadsafe`` for handlers running in
    worker threads (several systems run sync handlers concurrently in a thread pool).
    """

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._target = -1
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def hit(self) -> None:
        self.count += 1
        if self.count == self._target:
            self._fire()

    def hit_threadsafe(self) -> None:
        with self._lock:
            self.count += 1
            reached = self.count == self._target
        if reached and self._loop is not None:
            self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_for(self, expected: int, timeout: float = 60.0) -> None:
        """Return once ``count`` has reached ``expected``.

        Raises:
            TimeoutError: the handlers did not all run within ``timeout`` seconds (events were lost).
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.count >= expected:
                return
            self._loop = loop
            self._target = expected
            self._waiter = loop.create_future()
        try:
            await asyncio.wait_for(self._waiter, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"only {self.count} of {expected} handler calls ran within {timeout}s"
            ) from None
        finally:
            self._target = -1
            self._waiter = None


TALLY: Final = Tally()

SETTLERS: Final[dict[SystemName, Callable[[], Awaitable[None]]]] = {}
"""Awaited after the handlers ran, before the clock stops: a durable log's commits of completions."""


async def settle(system: SystemName) -> None:
    """Wait until what ``system``'s handler runs left behind is done (for tidings-sqlite: committed)."""
    settler = SETTLERS.get(system)
    if settler is not None:
        await settler()


EMIT_SAMPLES: Final[list[float]] = []
"""µs per emit, one sample per emit-cost request (the loop's time minus an empty loop's, over n)."""


def time_emits(emit: EmitFn, n: int) -> None:
    """Time ``n`` calls of ``emit`` in a tight loop, minus the same loop empty; record µs per call."""
    name, payload = EVENT, PAYLOAD
    t0 = perf_counter_ns()
    for _ in range(n):
        pass
    t1 = perf_counter_ns()
    for _ in range(n):
        emit(name, payload)
    t2 = perf_counter_ns()
    EMIT_SAMPLES.append(((t2 - t1) - (t1 - t0)) / n / 1000)


@dataclass(frozen=True, slots=True)
class AppSpec:
    """What the route does.

    Attributes:
        events: events emitted per request.
        sync_handler: register a plain ``def`` handler instead of an ``async def`` one.
        emit_loop: when > 0, the route times this many emits (see :func:`time_emits`) instead.
        tally: where the handlers count their calls (a worker gives each system its own).
    """

    events: int = 0
    sync_handler: bool = False
    emit_loop: int = 0
    tally: Tally = TALLY


def build_app(system: SystemName, spec: AppSpec) -> ASGIApp:
    """Build ``system``'s app for ``spec``.

    A process builds each system's app at most once: some register their handlers on module-level
    registries (fastapi-events' ``local_handler``), which a second app would add to.
    """
    if system == "starlette":
        return _starlette(spec, None)
    if system == "tidings":
        return _tidings(spec)
    if system == "tidings-sqlite":
        return _tidings(spec, durable="sqlite")
    if system == "tidings-postgres":
        return _tidings(spec, durable="postgres")
    if system == "fastapi-events":
        return _fastapi_events(spec)
    if system == "tidings-compat":
        return _tidings_compat(spec)
    if system == "litestar":
        return _litestar(spec, with_events=True)
    if system == "litestar-bare":
        return _litestar(spec, with_events=False)
    raise ValueError(f"unknown system {system!r}")


# -- Starlette-based systems: bare, tidings, fastapi-events, tidings' fastapi-events API ----------------


def _starlette(spec: AppSpec, emit: EmitFn | None, middleware: list[Any] | None = None) -> ASGIApp:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    events, emit_loop = spec.events, spec.emit_loop

    async def index(request: Request) -> PlainTextResponse:
        if emit is not None:
            if emit_loop:
                time_emits(emit, emit_loop)
            else:
                for _ in range(events):
                    emit(EVENT, PAYLOAD)
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", index)], middleware=middleware)


def _tidings(spec: AppSpec, *, durable: Literal["sqlite", "postgres"] | None = None) -> ASGIApp:
    import tempfile

    from starlette.middleware import Middleware

    from tidings import Event, EventBus, TidingsMiddleware, emit
    from tidings.store import SQLiteStore
    from tidings.store.postgres import PostgresStore

    # With a durable log every delivery is recorded before its handler runs and completed after.
    if durable == "sqlite":
        log_dir = tempfile.mkdtemp(prefix="tidings-bench-")
        atexit.register(shutil.rmtree, log_dir, ignore_errors=True)  # when the worker process ends
        bus = EventBus(store=SQLiteStore(os.path.join(log_dir, "log.db")))
    elif durable == "postgres":
        bus = EventBus(store=PostgresStore(POSTGRES_DSN, schema=POSTGRES_SCHEMA))
    else:
        bus = EventBus()
    if durable:
        system: SystemName = "tidings-sqlite" if durable == "sqlite" else "tidings-postgres"
        SETTLERS[system] = bus.store.flush
    tally = spec.tally
    if spec.sync_handler:

        @bus.on(EVENT)
        def on_event_sync(event: Event) -> None:
            tally.hit_threadsafe()

    else:

        @bus.on(EVENT)
        async def on_event(event: Event) -> None:
            tally.hit()

    return _starlette(spec, emit, [Middleware(TidingsMiddleware, bus=bus)])


def _fastapi_events(spec: AppSpec) -> ASGIApp:
    from fastapi_events.dispatcher import dispatch
    from fastapi_events.handlers.local import local_handler
    from fastapi_events.middleware import EventHandlerASGIMiddleware
    from fastapi_events.typing import Event
    from starlette.middleware import Middleware

    tally = spec.tally
    if spec.sync_handler:

        @local_handler.register(event_name=EVENT)  # type: ignore[untyped-decorator, no-untyped-call]
        def on_event_sync(event: Event) -> None:
            tally.hit_threadsafe()

    else:

        @local_handler.register(event_name=EVENT)  # type: ignore[untyped-decorator, no-untyped-call]
        async def on_event(event: Event) -> None:
            tally.hit()

    return _starlette(spec, dispatch, [Middleware(EventHandlerASGIMiddleware, handlers=[local_handler])])


def _tidings_compat(spec: AppSpec) -> ASGIApp:
    """The fastapi-events app above, word for word, with ``fastapi_events`` imports changed only."""
    from starlette.middleware import Middleware

    from tidings.compat.fastapi_events.dispatcher import dispatch
    from tidings.compat.fastapi_events.handlers.local import local_handler
    from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware
    from tidings.compat.fastapi_events.typing import Event

    tally = spec.tally
    if spec.sync_handler:

        @local_handler.register(event_name=EVENT)
        def on_event_sync(event: Event) -> None:
            tally.hit_threadsafe()

    else:

        @local_handler.register(event_name=EVENT)
        async def on_event(event: Event) -> None:
            tally.hit()

    return _starlette(spec, dispatch, [Middleware(EventHandlerASGIMiddleware, handlers=[local_handler])])


# -- Litestar ---------------------------------------------------------------------------------------------


def _litestar(spec: AppSpec, *, with_events: bool) -> ASGIApp:
    from litestar import Litestar, MediaType, Request, get
    from litestar.events import EventListener, listener

    events, emit_loop = spec.events, spec.emit_loop

    @get("/", media_type=MediaType.TEXT)
    async def index(request: Request[Any, Any, Any]) -> str:
        if with_events:
            if emit_loop:
                time_emits(request.app.emit, emit_loop)
            else:
                emit = request.app.emit
                for _ in range(events):
                    emit(EVENT, PAYLOAD)
        return "ok"

    listeners: list[EventListener] = []
    tally = spec.tally
    if with_events:
        if spec.sync_handler:

            @listener(EVENT)
            def on_event_sync(payload: Any) -> None:
                tally.hit_threadsafe()

            listeners.append(on_event_sync)
        else:

            @listener(EVENT)
            async def on_event(payload: Any) -> None:
                tally.hit()

            listeners.append(on_event)

    app = Litestar(route_handlers=[index], listeners=listeners)
    return cast("ASGIApp", app)  # Litestar's __call__ takes its own, narrower ASGI TypedDicts


# -- uvicorn entry point ----------------------------------------------------------------------------------

SERVE_SYSTEM_ENV: Final = "TIDINGS_BENCH_SYSTEM"
SERVE_EVENTS_ENV: Final = "TIDINGS_BENCH_EVENTS"


def serve_app() -> ASGIApp:
    """App factory for ``uvicorn --factory bench.apps:serve_app``; reads the system from the environment."""
    system = os.environ[SERVE_SYSTEM_ENV]
    if system not in SYSTEMS:
        raise ValueError(f"{SERVE_SYSTEM_ENV}={system!r} is not one of {SYSTEMS}")
    return build_app(system, AppSpec(events=int(os.environ.get(SERVE_EVENTS_ENV, "1"))))
