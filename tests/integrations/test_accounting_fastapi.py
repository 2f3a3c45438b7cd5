"""Nothing is lost silently, FastAPI side: every due handler call has one outcome (seeded, randomized).

The same accounting as ``tests/core/test_accounting.py`` (whose ledger and ``check`` this reuses), for
a FastAPI app, in one of two set-ups the seed picks:

* **native**: ``app.add_middleware(TidingsMiddleware, bus=bus)``; endpoints (``async def`` and plain
  ``def``) emit through ``tidings.emit``, the injected emitter (``Emitter``,
  ``Depends(current_emitter)``), a dependency of theirs, ``BackgroundTasks`` run after the response (one
  that raises afterwards), a task that outlives the request, typed events (a Pydantic model); some
  raise, some raise ``HTTPException``. Handlers are registered by name, wildcard or class (the typed
  event), and may take FastAPI dependencies (``async def``, plain ``def``, ``yield`` ones, one that
  raises before the handler, a ``yield`` one that raises on exit after the handler returned, one
  that adds a background task to ``BackgroundTasks``: the rest of the call, which may emit, take a
  few turns of the loop or run in FastAPI's thread pool, and raise on the call's first attempts);
* **compat**: the fastapi-events layer (``tidings.compat.fastapi_events``): its
  ``EventHandlerASGIMiddleware`` with ``bus=``, ``dispatch()`` (names, a model with
  ``__event_name__``, ``middleware_id=`` from threads), functions registered with
  ``LocalHandler.register`` (with and without dependencies), and sometimes a ``LocalHandler`` subclass
  whose ``handle_many`` override makes it one batch handler for every event.

Handlers return, raise, fail their first attempts under a retry policy, hang past a timeout, chain
events (by ``bus.emit``, ``tidings.emit``, a typed event, the emitter their dependency gives, or
``dispatch``), emit from a thread, or ``await bus.emit_now``. Plain ``def`` ones past their
timeout are left behind in their thread; they may emit before their timeout as well as after it,
and some run about as long as their timeout, so that their emits meet its take-over of the call.
Hung ones may be released mid-run, once reported: their background tasks then run (some wait until
before the shutdown, or past it) while the steps go on, so that drains cut them off. The app's
lifespan starts the bus (or the test does, by hand) and emits in its startup and shutdown code;
events are emitted while the bus shuts down, within a drain bound that is sometimes generous and
sometimes tiny.

Each (event, handler) call that was due must then have exactly one terminal outcome: see the core
test's docstring. A failing seed is named in the test id: ``pytest
tests/integrations/test_accounting_fastapi.py -k "[17]"``; ``TIDINGS_ACCOUNTING_SEEDS=A-B`` widens the
range, as for the core test.
"""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import anyio
import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from pydantic import BaseModel
from starlette.requests import Request

import tidings
from tidings import DrainTimeoutError, Event, EventBus, Limits, RetryPolicy, TidingsMiddleware
from tidings._core.threads import DaemonThreadPool
from tidings.compat.fastapi_events.dispatcher import dispatch
from tidings.compat.fastapi_events.handlers.local import LocalHandler
from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware
from tidings.compat.fastapi_events.typing import Event as CompatEvent
from tidings.integrations.fastapi import Emitter, EventEmitter, current_emitter
from tidings.store import SQLiteStore
from tidings.types import Message, Receive, Scope, Send

from ..conftest import Recorder, Records
from ..core.test_accounting import (
    MAX_DEPTH,
    NAMES,
    PATTERNS,
    SEEDS,
    Ledger,
    check,
    release_reported,
    token_of,
)

pytestmark = pytest.mark.anyio

Api = Literal["native", "compat"]
Behaviour = Literal[
    "returns", "raises", "flaky", "hangs", "chains", "thread_emits", "emits_now", "dep_fails", "exit_fails",
    "overruns",
]  # fmt: skip
Deps = Literal["none", "async", "sync", "yield", "sync_yield", "background"]
Via = Literal["bus", "tidings", "typed", "emitter", "dispatch", "dispatch_model"]
Step = tuple[str, Any]
NATIVE_PATHS = (
    "/emit", "/sync", "/emitter", "/emitter-sync", "/dep-emit", "/fail", "/http-error",
    "/background", "/background-sync", "/background-fail", "/typed", "/spawn",
)  # fmt: skip
STATUS = {"/fail": 500, "/http-error": 409}


class Placed(BaseModel):
    """The typed event: handlers registered by class get it; "order.placed" then has it as its schema."""

    __event_name__: ClassVar[str] = "order.placed"

    token: str
    depth: int


class Paid(BaseModel):
    """A model ``dispatch()`` takes as the event (handlers get its dump)."""

    __event_name__: ClassVar[str] = "order.paid"

    token: str
    depth: int


@pytest.fixture
def anyio_backend(seed: int) -> tuple[str, dict[str, Any]]:
    """One backend per seed (the seed picks it), as in the core test."""
    if seed % 2:
        return ("asyncio", {"use_uvloop": True})
    return ("asyncio", {"debug": True})


# -- the scenario, generated from a seed -------------------------------------------------------------


@dataclass(frozen=True)
class RestPlan:
    """The background task a "background" dependency adds: the rest of the call, after the handler."""

    is_async: bool  # else a plain def one, in FastAPI's thread pool
    emits: bool  # the handler's child, the way the handler emits it (below the depth limit)
    fail_attempts: int  # how many first attempts of the call it fails
    turns: int  # an async one: the turns of the loop it takes first (a drain may cut it off meanwhile)
    waits: bool = False  # a left-behind candidate's: it runs until the run lets rests end (Plan)


@dataclass(frozen=True)
class HandlerPlan:
    name: str
    patterns: tuple[str, ...]
    is_async: bool
    behaviour: Behaviour
    deps: Deps = "none"
    typed: bool = False  # registered by class (Placed), native only
    fail_attempts: int = 0  # "flaky", "exit_fails": how many first attempts raise
    retry: RetryPolicy | None = None  # native only: compat handlers have the bus's
    timeout: float | None = None  # native only
    child: str = NAMES[0]
    via: Via = "bus"
    early: bool = False  # a plain def "hangs" or "overruns": it emits its child before its timeout too
    runs_for: float = 0.0  # "overruns" (plain def): how long it runs, either side of its timeout
    rest: RestPlan | None = None  # deps == "background"


@dataclass(frozen=True)
class Plan:
    seed: int
    api: Api
    lifespan: bool  # the app's lifespan starts and closes the bus (else the test does, by hand)
    durable: bool
    limits: Limits
    request_handlers: Literal["inline", "task"]
    request_errors: Literal["deliver", "drop"]
    async_hook: bool
    handler_timeout: float | None
    retry: RetryPolicy | None  # the bus's default
    handlers: tuple[HandlerPlan, ...]
    batch: tuple[Behaviour, ...]  # compat: the functions of a LocalHandler subclass with handle_many
    steps: tuple[Step, ...]
    release_before_shutdown: bool
    # background tasks that wait (RestPlan.waits) end before shutdown; else only after it, so
    # that a drain cuts them off (the shutdown's bound is never generous then)
    rests_end_before_shutdown: bool
    drain_timeout: float
    startup_emits: tuple[str, ...]  # in the lifespan's startup code
    shutdown_emits: tuple[str, ...]  # in the lifespan's shutdown code
    late_emits: tuple[str, ...]
    late_thread_emits: tuple[str, ...]

    @property
    def hangs_sync(self) -> bool:
        return any(h.behaviour == "hangs" and not h.is_async for h in self.handlers)

    @classmethod
    def generate(cls, seed: int) -> Plan:
        rng = random.Random(seed)
        api: Api = "compat" if rng.random() < 0.35 else "native"
        compat = api == "compat"
        handlers: list[HandlerPlan] = []
        for index in range(rng.randint(2, 6)):
            is_async = rng.random() < 0.6
            behaviours: list[Behaviour] = ["returns", "raises", "flaky", "hangs", "chains", "thread_emits"]
            behaviours += ["returns", "dep_fails", "exit_fails"]
            if is_async and not compat:
                behaviours.append("emits_now")
            behaviour = rng.choice(behaviours)
            deps: Deps = rng.choice(("none", "none", "async", "sync", "yield", "sync_yield"))
            if behaviour == "dep_fails" and deps == "none":
                deps = rng.choice(("async", "sync", "yield", "sync_yield"))
            if behaviour == "exit_fails":
                deps = rng.choice(("yield", "sync_yield"))
            typed = not compat and rng.random() < 0.2
            patterns = () if typed else tuple(rng.sample(PATTERNS, rng.choice((1, 1, 2))))
            retry: RetryPolicy | None = None
            fail_attempts = 0
            timeout: float | None = None
            if behaviour in ("flaky", "exit_fails"):
                attempts = rng.randint(2, 3)
                fail_attempts = rng.randint(1, attempts)  # == attempts: a dead letter in the end
                retry = RetryPolicy(max_attempts=attempts, backoff=rng.choice((0.002, 0.01)), jitter=0.0)
            elif behaviour in ("raises", "dep_fails") and rng.random() < 0.5:
                retry = RetryPolicy(max_attempts=2, backoff=0.005, jitter=0.0)
            elif behaviour == "hangs":
                timeout = rng.choice((0.02, 0.04))
                if is_async and rng.random() < 0.3:
                    retry = RetryPolicy(max_attempts=2, backoff=0.005, jitter=0.0)
            vias: tuple[Via, ...] = ("dispatch", "dispatch_model", "bus", "emitter")
            if not compat:
                vias = ("bus", "tidings", "typed", "emitter")
            handlers.append(
                HandlerPlan(
                    name=f"h{index}_{behaviour}_{'async' if is_async else 'sync'}_{deps}",
                    patterns=patterns,
                    is_async=is_async,
                    behaviour=behaviour,
                    deps=deps,
                    typed=typed,
                    fail_attempts=fail_attempts,
                    retry=None if compat else retry,
                    timeout=None if compat else timeout,
                    child=rng.choice(NAMES),
                    via=rng.choice(vias),
                )
            )
        extra = random.Random(f"rests-{seed}")  # see with_rests
        handlers = with_rests(extra, compat, handlers)
        compat_extra = random.Random(f"compat-overruns-{seed}")  # see compat_overrunning
        if compat:
            handlers = compat_overrunning(compat_extra, handlers)
        # (compat: a handler that runs about as long as the bus's timeout needs it tiny, as one that hangs)
        hangs = any(h.behaviour in ("hangs", "overruns") for h in handlers)
        if compat and hangs:
            # The bus's timeout is tiny then, and applies to every compat handler: a plain def one
            # past it is left behind, and its yield dependencies are closed by the timeout's
            # cancellation, so an "exit_fails" one's exit, which says how its call ended, never runs.
            handlers = [
                replace(h, behaviour="returns", name=h.name.replace(h.behaviour, "returns", 1))
                if not h.is_async and h.behaviour == "exit_fails"
                else h
                for h in handlers
            ]
        # Under a tiny timeout, a plain def yield dependency is not generated: its exit runs in
        # FastAPI's thread pool after the handler noted its return (or the exit noted it itself),
        # and a timeout that comes as the call awaits that thread is the call's outcome, though the
        # harness saw it return (a dead letter, or a retry, after a return). An async one's exit
        # runs to its end in one step.
        handlers = [
            replace(h, deps="yield", name=f"{h.name.removesuffix(h.deps)}yield")
            if h.deps == "sync_yield" and (h.timeout is not None or (compat and hangs))
            else h
            for h in handlers
        ]
        handler_timeout: float | None = 0.5  # native: an emits_now handler may wait for a worker thread
        bus_retry: RetryPolicy | None = None
        batch: tuple[Behaviour, ...] = ()
        if compat:
            # compat handlers have the bus's timeout and retry policy: fastapi-events has no per-handler ones
            handler_timeout = rng.choice((0.02, 0.04)) if hangs else rng.choice((None, 0.5))
            if handler_timeout is not None:
                handlers = [
                    replace(h, runs_for=handler_timeout * compat_extra.uniform(0.6, 1.4))
                    if h.behaviour == "overruns"
                    else h
                    for h in handlers
                ]
            if rng.random() < 0.6:
                attempts = rng.randint(2, 3)
                bus_retry = RetryPolicy(max_attempts=attempts, backoff=rng.choice((0.002, 0.01)), jitter=0.0)
            if rng.random() < 0.4:
                batch = tuple(
                    rng.choice(("returns", "returns", "raises", "flaky")) for _ in range(rng.randint(1, 3))
                )
        steps: list[Step] = []
        kinds = ["emit", "emit", "burst", "thread", "request", "request", "request", "yield", "drain"]
        if not compat:
            kinds.append("emit_now")
        paths = NATIVE_PATHS
        for _ in range(rng.randint(2, 8)):
            kind = rng.choice(kinds)
            if kind == "emit" or kind == "thread":
                steps.append((kind, (rng.choice(NAMES), rng.random() < 0.5)))  # (name, the other way)
            elif kind == "burst":
                steps.append((kind, tuple(rng.choice(NAMES) for _ in range(rng.randint(2, 5)))))
            elif kind == "emit_now":
                steps.append((kind, (rng.choice(NAMES), rng.random() < 0.5)))  # (name, in the background)
            elif kind == "request":
                path = rng.choice(paths)
                names = tuple(rng.choice(NAMES) for _ in range(rng.randint(0, 3)))
                steps.append((kind, (path, names, rng.random() < 0.5)))  # (..., in the background)
            elif kind == "drain":
                steps.append((kind, rng.choice((0.0, 0.005, 0.05))))
            else:
                steps.append((kind, None))
        hangs_sync = any(h.behaviour == "hangs" and not h.is_async for h in handlers)
        if hangs_sync:
            # Hung calls may hold every worker thread until they are released (see the core test).
            steps = [
                (kind, (*arg[:-1], True)) if kind in ("emit_now", "request") else (kind, arg)
                for kind, arg in steps
            ]
        if hangs_sync and extra.random() < 0.5:
            # once each has been reported past its timeout, hung calls return while the bus runs:
            # their background tasks run (and may wait) as the steps after go on, drains included
            steps.insert(extra.randint(0, len(steps)), ("release", None))
        waiting = any(h.rest is not None and h.rest.waits for h in handlers)
        rests_end_before_shutdown = not waiting or extra.random() < 0.5
        release_before_shutdown = rng.random() < 0.5
        bounds = [0.0, 0.001, 0.02, 0.1]
        if not hangs_sync or release_before_shutdown:
            bounds += [2.0, 2.0]
        lifespan = compat or rng.random() < 0.6  # compat: the app builds its middleware at startup
        plan = cls(
            seed=seed,
            api=api,
            lifespan=lifespan,
            durable=rng.random() < 0.3,
            limits=Limits(max_concurrency=rng.choice((1, 2, 256)), max_threads=rng.choice((1, 2, 8))),
            request_handlers=rng.choice(("inline", "task")),
            request_errors=rng.choice(("deliver", "drop")),
            async_hook=rng.random() < 0.3,
            handler_timeout=handler_timeout,
            retry=bus_retry,
            handlers=tuple(handlers),
            batch=batch,
            steps=tuple(steps),
            release_before_shutdown=release_before_shutdown,
            rests_end_before_shutdown=rests_end_before_shutdown,
            drain_timeout=rng.choice(bounds),
            startup_emits=tuple(rng.choice(NAMES) for _ in range(rng.choice((0, 0, 1, 2))))
            if lifespan
            else (),
            shutdown_emits=tuple(rng.choice(NAMES) for _ in range(rng.choice((0, 0, 1, 2))))
            if lifespan
            else (),
            late_emits=tuple(rng.choice(NAMES) for _ in range(rng.choice((0, 0, 2, 4)))),
            late_thread_emits=tuple(rng.choice(NAMES) for _ in range(rng.choice((0, 1)))),
        )
        if plan.drain_timeout == 2.0:  # a waiting rest would hold a generous bound to its end
            plan = replace(plan, rests_end_before_shutdown=True)
        if not plan.durable and any(h.rest is not None and h.timeout is not None for h in handlers):
            # the rests of calls left behind, more often with the log: what they emit is recorded
            # before the call is completed, and a cut-off keeps the call in it
            plan = replace(plan, durable=extra.random() < 0.4)
        return plan


def with_rests(rng: random.Random, compat: bool, handlers: list[HandlerPlan]) -> list[HandlerPlan]:
    """Calls left behind past their timeout, their emits and their background tasks (a second stream).

    Plain def handlers that hang may emit before their timeout as well as once released; native
    plain def ones that return or chain may instead run for about their timeout (its take-over
    meets their emits). Some handlers get a "background" dependency, most of all those that are
    left behind: their background task runs once their thread returned, and may wait until the
    run lets it end. ``rng`` is a random stream of its own: the rest of each seed's scenario
    stays as it was.
    """
    changed: list[HandlerPlan] = []
    for handler in handlers:
        behaviour = handler.behaviour
        if not compat and not handler.is_async and behaviour in ("returns", "chains") and rng.random() < 0.25:
            timeout = rng.choice((0.02, 0.04))
            behaviour = "overruns"
            handler = replace(
                handler,
                name=handler.name.replace(handler.behaviour, behaviour),
                behaviour=behaviour,
                timeout=timeout,
                runs_for=timeout * rng.uniform(0.6, 1.4),
            )
        left_behind = not handler.is_async and behaviour in ("hangs", "overruns")
        if left_behind:
            handler = replace(handler, early=rng.random() < 0.5)
        if behaviour != "exit_fails" and rng.random() < (0.5 if left_behind else 0.15):
            rest = RestPlan(
                is_async=rng.random() < 0.5,
                emits=rng.random() < 0.7,
                fail_attempts=rng.choice((0, 0, 1, 2)),
                turns=rng.choice((0, 1, 3)),
                # (under a timeout of 0.02 or 0.04s: one that ran in time waits within it)
                waits=left_behind and rng.random() < 0.5,
            )
            retry = handler.retry
            if rest.fail_attempts and retry is None and not compat:
                retry = RetryPolicy(max_attempts=2, backoff=0.005, jitter=0.0)
            handler = replace(
                handler,
                deps="background",
                rest=rest,
                retry=retry,
                name=f"{handler.name.removesuffix(handler.deps)}background",
            )
        changed.append(handler)
    return changed


def compat_overrunning(rng: random.Random, handlers: list[HandlerPlan]) -> list[HandlerPlan]:
    """Compat plain def handlers that run for about the bus's timeout (a third random stream).

    fastapi-events has no per-handler timeout: the bus's applies, made tiny by
    :meth:`Plan.generate` when a handler overruns, which then sets ``runs_for`` from it. As the
    native ones of :func:`with_rests`, they may emit before the timeout's take-over, or as they
    return (in it, or once left behind).
    """
    changed: list[HandlerPlan] = []
    for handler in handlers:
        if not handler.is_async and handler.behaviour in ("returns", "chains") and rng.random() < 0.25:
            handler = replace(
                handler,
                name=handler.name.replace(handler.behaviour, "overruns", 1),
                behaviour="overruns",
                early=rng.random() < 0.5,
            )
        changed.append(handler)
    return changed


# -- what happened -----------------------------------------------------------------------------------


def ends_here(handler: HandlerPlan) -> bool:
    """Whether the handler's return is the call's (else its yield dependency's exit, or its
    background tasks, say how the call ended)."""
    return handler.behaviour != "exit_fails" and handler.deps != "background" and not exit_ends(handler)


def exit_ends(handler: HandlerPlan) -> bool:
    """Whether its plain def yield dependency's exit notes that the call returned, not the handler.

    That exit runs in FastAPI's thread pool once the handler returned, and a timeout that comes
    while the call waits for a thread there is the call's outcome: noted by the handler, the
    return would come before a timeout on a busy machine (the bus's 0.5 s one, say). A handler
    that hangs or overruns has a timeout of its own, under which it gets no such dependency.
    """
    return handler.deps == "sync_yield" and handler.behaviour not in ("hangs", "overruns")


def returned(ledger: Ledger, token: str, handler: str) -> None:
    with ledger.lock:
        ledger.returned.append((token, handler))


def attempt(ledger: Ledger, token: str, handler: str) -> int:
    with ledger.lock:
        ledger.attempts[token, handler] += 1
        return ledger.attempts[token, handler]


def names(request: Request) -> list[str]:
    """The event names a test request asks its endpoint to emit."""
    return request.query_params.getlist("name")


def key_of(payload: Any) -> tuple[str, int]:
    """The token and depth of a payload: a dict (an event's, a dump) or a model."""
    if isinstance(payload, dict):
        return payload["token"], payload["depth"]
    assert isinstance(payload, (Placed, Paid)), payload
    return payload.token, payload.depth


# -- the scenario ------------------------------------------------------------------------------------


class Scenario:
    """One generated scenario: its bus, handlers and FastAPI app, run once."""

    def __init__(self, plan: Plan, tmp_path: Path) -> None:
        self.plan = plan
        self.compat = plan.api == "compat"
        self.ledger = Ledger()
        self.failures: list[tidings.HandlerError] = []
        self.drain_pending: list[tuple[str, str]] = []
        self.release = threading.Event()  # hung plain def handlers wait for it
        self.never = asyncio.Event()  # hung async def handlers wait for it
        # waiting background tasks wait for these: plain def ones (in threads), async ones
        self.rests_may_end, self.rests_may_end_async = threading.Event(), asyncio.Event()
        self.log_path = tmp_path / f"log-{plan.seed}.db"
        self.entered = Recorder()  # one item per request that reached the app
        self.spawned: list[asyncio.Task[None]] = []  # tasks requests started, that outlive them
        self.middleware_id = 900_000 + plan.seed
        hook: Callable[[tidings.HandlerError], object] = self._failed
        if plan.async_hook:
            hook = self._async_hook
        self.bus = EventBus(
            name=f"accounting-fastapi-{plan.seed}",
            handler_timeout=plan.handler_timeout,
            drain_timeout=plan.drain_timeout,
            limits=plan.limits,
            retry=plan.retry or RetryPolicy(max_attempts=1),
            request_handlers=plan.request_handlers,
            request_errors=plan.request_errors,
            on_failure=hook,
            store=SQLiteStore(self.log_path) if plan.durable else None,
        )
        app = FastAPI(lifespan=self._lifespan)
        if self.compat:
            functions = LocalHandler()  # local_handler's class; one of its own, so scenarios share nothing
            for handler in plan.handlers:
                function = self._compat_handler(handler)
                for pattern in handler.patterns:
                    functions.register(function, event_name=pattern)
            objects: list[object] = [functions]
            if plan.batch:
                objects.append(self._batching())
            app.add_middleware(
                EventHandlerASGIMiddleware, handlers=objects, middleware_id=self.middleware_id, bus=self.bus
            )
        else:
            for handler in plan.handlers:
                options: dict[str, Any] = {"name": handler.name, "retry": handler.retry}
                if handler.timeout is not None:
                    options["timeout"] = handler.timeout
                patterns: tuple[str | type, ...] = (Placed,) if handler.typed else handler.patterns
                self.bus.on(*patterns, **options)(self._native_handler(handler))
            app.add_middleware(TidingsMiddleware, bus=self.bus)
        self._add_routes(app)

        async def entering(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                self.entered.add(None)  # the middleware starts the bus (if closed) before its first await
            await app(scope, receive, send)

        self.app = entering

    def _failed(self, error: tidings.HandlerError) -> None:
        self.failures.append(error)
        self.ledger.progress.add(None)  # a mid-run release may wait for it

    async def _async_hook(self, error: tidings.HandlerError) -> None:
        self._failed(error)

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        for name in self.plan.startup_emits:
            self._app_emit(name, self.ledger.payload(name, 0))
        yield
        for name in self.plan.shutdown_emits:  # after the drain: handled by the final one, or dropped
            self._app_emit(name, self.ledger.payload(name, 0))

    def _app_emit(self, name: str, payload: dict[str, Any]) -> None:
        """Emit the way the scenario's API does, in app code (an endpoint, the lifespan)."""
        if self.compat:
            dispatch(name, payload)
        else:
            tidings.emit(name, payload)

    def _typed_emit(self, name: str, payload: dict[str, Any]) -> None:
        """Emit a model as the event where there is one for ``name``."""
        if self.compat and name == Paid.__event_name__:
            dispatch(Paid(**payload))
        elif not self.compat and name == Placed.__event_name__:
            tidings.emit(Placed(**payload))
        else:
            self._app_emit(name, payload)

    # -- handlers --------------------------------------------------------------------------------
    def _spec_name(self, handler: HandlerPlan) -> str:
        """The handler name tidings gives it: its own (native), its module and qualified name (compat)."""
        return f"{__name__}.{handler.name}" if self.compat else handler.name

    def _emit_child(self, handler: HandlerPlan, depth: int, emitter: EventEmitter | None) -> None:
        if depth >= MAX_DEPTH:
            return
        name = handler.child
        payload = self.ledger.payload(name, depth + 1)
        via = handler.via
        if via == "bus":
            self.bus.emit(name, payload)
        elif via == "tidings":
            tidings.emit(name, payload)
        elif via in ("typed", "dispatch_model"):
            self._typed_emit(name, payload)
        elif via == "dispatch":
            dispatch(name, payload)
        else:  # the emitter a dependency gave (events chain, as with emit()); without one, emit()
            (emitter or EventEmitter(self.bus)).emit(name, payload)

    def _thread_emit(self, name: str, payload: dict[str, Any]) -> Callable[[], None]:
        """Emit from a thread of no context: ``bus.emit``, or ``dispatch`` with the middleware's id."""
        if self.compat:
            return functools.partial(dispatch, name, payload, middleware_id=self.middleware_id)
        return functools.partial(self.bus.emit, name, payload)

    async def _run_async(self, handler: HandlerPlan, payload: Any, emitter: EventEmitter | None) -> None:
        ledger, behaviour = self.ledger, handler.behaviour
        token, depth = key_of(payload)
        name = self._spec_name(handler)
        if behaviour == "raises":
            raise RuntimeError(f"{handler.name} fails")
        if behaviour == "flaky" and attempt(ledger, token, name) <= handler.fail_attempts:
            raise ConnectionError(f"{handler.name} fails this attempt")
        if behaviour == "hangs":
            await self.never.wait()
        if behaviour == "chains":
            self._emit_child(handler, depth, emitter)
        if behaviour == "thread_emits" and depth < MAX_DEPTH:
            child = ledger.payload(handler.child, depth + 1)
            ledger.start_thread(self._thread_emit(handler.child, child))
        if behaviour == "emits_now" and depth < MAX_DEPTH:
            await self._emit_now(handler.child, depth + 1)
        if ends_here(handler):
            returned(ledger, token, name)

    def _run_sync(self, handler: HandlerPlan, payload: Any, emitter: EventEmitter | None) -> None:
        ledger, behaviour = self.ledger, handler.behaviour
        token, depth = key_of(payload)
        name = self._spec_name(handler)
        if behaviour == "raises":
            raise RuntimeError(f"{handler.name} fails")
        if behaviour == "flaky" and attempt(ledger, token, name) <= handler.fail_attempts:
            raise ConnectionError(f"{handler.name} fails this attempt")
        if behaviour in ("hangs", "overruns"):
            with ledger.hanging_call((token, name) if behaviour == "hangs" else None):
                if behaviour == "hangs":
                    if handler.early:
                        self._emit_child(handler, depth, emitter)  # as its job's, while the job waits for it
                    assert self.release.wait(30), "never released"
                    self._emit_child(handler, depth, emitter)  # after its job went on without it
                elif depth < MAX_DEPTH:  # (one that emits nothing has no emit to race with)
                    if handler.early:
                        self._emit_child(handler, depth, emitter)  # the job's, or as its timeout takes it
                    time.sleep(handler.runs_for)  # its work: about as long as its timeout
                    if not handler.early:
                        self._emit_child(handler, depth, emitter)  # as it returns, or once left behind
                if ends_here(handler):
                    returned(ledger, token, name)
            return
        if behaviour == "chains":
            self._emit_child(handler, depth, emitter)
        if behaviour == "thread_emits" and depth < MAX_DEPTH:
            child = ledger.payload(handler.child, depth + 1)
            ledger.start_thread(self._thread_emit(handler.child, child))
        if ends_here(handler):
            returned(ledger, token, name)

    def _dependency(self, handler: HandlerPlan) -> Callable[..., Any]:
        """The FastAPI dependency the handler asks for: it gives an emitter (or fails, as planned)."""
        ledger, bus, name = self.ledger, self.bus, self._spec_name(handler)
        fails = handler.behaviour == "dep_fails"
        exit_fails = handler.behaviour == "exit_fails"

        def on_exit(request: Request) -> None:
            """After the handler returned: fail the call (its first attempts), or note that it returned."""
            token, _ = key_of(request.scope["tidings.event"].payload)
            if exit_fails and attempt(ledger, token, name) <= handler.fail_attempts:
                raise RuntimeError(f"{handler.name}: its dependency fails on exit")
            if exit_fails or exit_ends(handler):
                returned(ledger, token, name)

        if handler.deps == "background":
            rest = self._rest(handler)

            async def background_dependency(tasks: BackgroundTasks, request: Request) -> EventEmitter:
                if fails:
                    raise LookupError(f"{handler.name}: its dependency fails")
                emitter = await current_emitter()
                for task in rest:  # run after the handler returned (once its thread did, if left behind)
                    tasks.add_task(task, request.scope["tidings.event"].payload, emitter)
                return emitter

            return background_dependency
        if handler.deps == "async":

            async def async_dependency() -> EventEmitter:
                if fails:
                    raise LookupError(f"{handler.name}: its dependency fails")
                return await current_emitter()  # the handler's job's bus: its emits chain

            return async_dependency
        if handler.deps == "sync":

            def sync_dependency() -> EventEmitter:  # in FastAPI's thread pool
                if fails:
                    raise LookupError(f"{handler.name}: its dependency fails")
                return EventEmitter(bus)

            return sync_dependency
        if handler.deps == "yield":

            async def yield_dependency(request: Request) -> AsyncIterator[EventEmitter]:
                if fails:
                    raise LookupError(f"{handler.name}: its dependency fails")
                yield await current_emitter()
                on_exit(request)

            return yield_dependency

        def sync_yield_dependency(request: Request) -> Iterator[EventEmitter]:
            if fails:
                raise LookupError(f"{handler.name}: its dependency fails")
            yield EventEmitter(bus)
            on_exit(request)

        return sync_yield_dependency

    def _rest(self, handler: HandlerPlan) -> list[Callable[[Any, EventEmitter], Any]]:
        """The background tasks of a handler with a "background" dependency: the rest of its call.

        The last one notes that the call returned: on the loop, once the others did (a plain def
        task's thread runs to its end also when the call is cancelled as it waits for it, at its
        timeout or by a cut-off: the call did not return then).
        """
        plan, ledger, name = handler.rest, self.ledger, self._spec_name(handler)
        assert plan is not None

        def work(payload: Any, emitter: EventEmitter) -> None:
            token, depth = key_of(payload)
            if plan.emits:
                self._emit_child(handler, depth, emitter)
            if attempt(ledger, token, f"{name} (its background task)") <= plan.fail_attempts:
                raise RuntimeError(f"{handler.name}: its background task fails")

        async def ended(payload: Any, emitter: EventEmitter) -> None:
            returned(ledger, key_of(payload)[0], name)

        if plan.is_async:

            async def async_task(payload: Any, emitter: EventEmitter) -> None:
                if plan.waits:
                    await self.rests_may_end_async.wait()
                for _ in range(plan.turns):
                    await asyncio.sleep(0)  # a turn of the loop: a drain may cut the call off meanwhile
                work(payload, emitter)

            return [async_task, ended]

        def sync_task(payload: Any, emitter: EventEmitter) -> None:  # in FastAPI's thread pool
            with ledger.hanging_call():  # the run's end waits for it: a cut-off does not stop its thread
                if plan.waits:
                    assert self.rests_may_end.wait(30), "never let end"
                work(payload, emitter)

        return [sync_task, ended]

    def _native_handler(self, handler: HandlerPlan) -> Callable[..., Any]:
        run_async, run_sync = (
            functools.partial(self._run_async, handler),
            functools.partial(self._run_sync, handler),
        )
        if handler.deps == "none":
            if handler.typed:
                if handler.is_async:

                    async def typed(placed: Placed) -> None:
                        await run_async(placed, None)

                    return typed

                def typed_sync(placed: Placed) -> None:
                    run_sync(placed, None)

                return typed_sync
            if handler.is_async:

                async def plain(event: Event) -> None:
                    await run_async(event.payload, None)

                return plain

            def plain_sync(event: Event) -> None:
                run_sync(event.payload, None)

            return plain_sync
        dependency = self._dependency(handler)
        if handler.typed:
            if handler.is_async:

                async def typed_with(placed: Placed, emitter: EventEmitter = Depends(dependency)) -> None:  # noqa: B008
                    await run_async(placed, emitter)

                return typed_with

            def typed_with_sync(placed: Placed, emitter: EventEmitter = Depends(dependency)) -> None:  # noqa: B008
                run_sync(placed, emitter)

            return typed_with_sync
        if handler.is_async:

            async def plain_with(event: Event, emitter: EventEmitter = Depends(dependency)) -> None:  # noqa: B008
                await run_async(event.payload, emitter)

            return plain_with

        def plain_with_sync(event: Event, emitter: EventEmitter = Depends(dependency)) -> None:  # noqa: B008
            run_sync(event.payload, emitter)

        return plain_with_sync

    def _compat_handler(self, handler: HandlerPlan) -> Callable[..., Any]:
        """A function for ``LocalHandler.register``: it takes the tuple ``(event_name, payload)``."""
        run_async, run_sync = (
            functools.partial(self._run_async, handler),
            functools.partial(self._run_sync, handler),
        )
        function: Callable[..., Any]
        if handler.deps == "none":
            if handler.is_async:

                async def compat(event: CompatEvent) -> None:
                    await run_async(event[1], None)

                function = compat
            else:

                def compat_sync(event: CompatEvent) -> None:
                    run_sync(event[1], None)

                function = compat_sync
        else:
            dependency = self._dependency(handler)
            if handler.is_async:

                async def compat_with(
                    event: CompatEvent,
                    emitter: EventEmitter = Depends(dependency),  # noqa: B008 - fastapi-events' style
                ) -> None:
                    await run_async(event[1], emitter)

                function = compat_with
            else:

                def compat_with_sync(
                    event: CompatEvent,
                    emitter: EventEmitter = Depends(dependency),  # noqa: B008 - fastapi-events' style
                ) -> None:
                    run_sync(event[1], emitter)

                function = compat_with_sync
        function.__qualname__ = function.__name__ = handler.name  # the compat layer names it after this
        return function

    def _batching(self) -> LocalHandler:
        """A ``LocalHandler`` subclass that overrides ``handle_many`` (to count, say): one batch handler."""
        ledger, plan = self.ledger, self.plan

        class Batching(LocalHandler):
            async def handle_many(self, events: Iterable[CompatEvent]) -> None:
                batch = list(events)
                await super().handle_many(batch)  # its functions, one after another; raises the first error
                for _, payload in batch:
                    returned(ledger, key_of(payload)[0], name)

        name = f"{Batching.__module__}.{Batching.__qualname__}"
        batching = Batching()
        rng = random.Random(plan.seed + 1)
        for index, behaviour in enumerate(plan.batch):

            async def function(event: CompatEvent, behaviour: str = behaviour, index: int = index) -> None:
                token, _ = key_of(event[1])
                if behaviour == "raises":
                    raise RuntimeError(f"batch function {index} fails")
                if behaviour == "flaky" and attempt(ledger, token, f"batch-{index}") <= 1:
                    raise ConnectionError(f"batch function {index} fails this attempt")

            function.__qualname__ = function.__name__ = f"batch_{index}_{behaviour}"
            batching.register(function, event_name=rng.choice(PATTERNS))
        return batching

    async def _emit_now(self, name: str, depth: int) -> None:
        payload = self.ledger.payload(name, depth)
        try:
            await self.bus.emit_now(name, payload)
        except tidings.BusStateError:  # raised into the caller: nothing was accepted
            with self.ledger.lock:
                self.ledger.refused.add(payload["token"])

    # -- endpoints -------------------------------------------------------------------------------
    def _add_routes(self, app: FastAPI) -> None:
        ledger = self.ledger
        emit = self._app_emit

        def emit_all(names: Iterable[str]) -> None:
            for name in names:
                emit(name, ledger.payload(name, 0))

        async def emit_all_async(names: Iterable[str]) -> None:
            emit_all(names)

        async def failing_task(names: Iterable[str]) -> None:
            emit_all(names)
            raise RuntimeError("the background task fails after the response")

        async def emitting_dependency(request: Request) -> AsyncIterator[None]:
            emit_all(names(request))
            yield
            emit_all(names(request))  # after the endpoint returned, before the middleware hands the events on

        @app.get("/emit")
        async def emit_endpoint(request: Request) -> str:
            emit_all(names(request))
            return "ok"

        @app.get("/sync")
        def sync_endpoint(request: Request) -> str:  # in FastAPI's thread pool
            emit_all(names(request))
            return "ok"

        @app.get("/emitter")
        async def emitter_endpoint(emitter: Emitter, request: Request) -> str:
            for each in names(request):
                emitter.emit(each, ledger.payload(each, 0))
            return "ok"

        @app.get("/emitter-sync")
        def emitter_sync_endpoint(
            request: Request,
            emitter: EventEmitter = Depends(current_emitter),  # noqa: B008 - the spelled-out form
        ) -> str:
            for each in names(request):
                emitter.emit(each, ledger.payload(each, 0))
            return "ok"

        @app.get("/dep-emit", dependencies=[Depends(emitting_dependency)])
        async def dependency_endpoint() -> str:
            return "ok"

        @app.get("/fail")
        async def failing_endpoint(request: Request) -> str:
            emit_all(names(request))
            raise RuntimeError("the endpoint fails")

        @app.get("/http-error")
        async def http_error_endpoint(request: Request) -> str:
            emit_all(names(request))
            raise HTTPException(status_code=409, detail="conflict")

        @app.get("/background")
        async def background_endpoint(tasks: BackgroundTasks, request: Request) -> str:
            tasks.add_task(emit_all_async, names(request))  # after the response has been sent
            return "ok"

        @app.get("/background-sync")
        def background_sync_endpoint(tasks: BackgroundTasks, request: Request) -> str:
            tasks.add_task(emit_all, names(request))  # after the response, in FastAPI's thread pool
            return "ok"

        @app.get("/background-fail")
        async def background_failing_endpoint(tasks: BackgroundTasks, request: Request) -> str:
            tasks.add_task(failing_task, names(request))  # raises after a 200 started: the events stay due
            return "ok"

        @app.get("/typed")
        async def typed_endpoint(request: Request) -> str:
            for each in names(request):
                self._typed_emit(each, ledger.payload(each, 0))
            return "ok"

        @app.get("/spawn")
        async def spawning_endpoint(request: Request) -> str:
            emitted = names(request)

            async def later() -> None:
                for _ in range(3):
                    await asyncio.sleep(0)  # a turn of the loop: the request has ended by now or soon
                emit_all(emitted)

            self.spawned.append(asyncio.get_running_loop().create_task(later()))
            return "ok"

    # -- the run ---------------------------------------------------------------------------------
    async def run(self) -> None:
        plan = self.plan
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        requests = 0
        pools: list[DaemonThreadPool] = []
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        outbox: asyncio.Queue[Message] = asyncio.Queue()
        try:
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://test") as client,
                anyio.create_task_group() as background,
            ):
                if plan.lifespan:
                    scope = {
                        "type": "lifespan",
                        "asgi": {"version": "3.0", "spec_version": "2.0"},
                        "state": {},
                    }
                    background.start_soon(self.app, scope, inbox.get, outbox.put)
                    await inbox.put({"type": "lifespan.startup"})
                    message = await outbox.get()
                    assert message["type"] == "lifespan.startup.complete", message
                else:
                    await self.bus.start()
                pools.append(self.bus._runner._executor)  # type: ignore[arg-type]  # started
                for kind, arg in plan.steps:
                    if kind == "emit":
                        name, other = arg
                        payload = self.ledger.payload(name, 0)
                        if self.compat:  # no context here: the one running bus, or the middleware's
                            dispatch(name, payload, middleware_id=self.middleware_id if other else None)
                        elif other:
                            tidings.emit(name, payload)  # no context here: the one running bus
                        else:
                            self.bus.emit(name, payload)
                    elif kind == "burst":
                        for name in arg:
                            self._app_emit(name, self.ledger.payload(name, 0))
                    elif kind == "thread":
                        name, _ = arg
                        self.ledger.start_thread(self._thread_emit(name, self.ledger.payload(name, 0)))
                    elif kind == "emit_now":
                        name, in_background = arg
                        if in_background:
                            background.start_soon(self._emit_now, name, 0)
                        else:
                            await self._emit_now(name, 0)
                    elif kind == "request":
                        path, names, in_background = arg
                        requests += 1
                        if in_background:
                            background.start_soon(self._request, client, path, names)
                        else:
                            await self._request(client, path, names)
                    elif kind == "drain":
                        try:
                            await self.bus.drain(arg)
                        except DrainTimeoutError as exc:
                            self.drain_pending += [(token_of(p.event), p.handler) for p in exc.pending]
                    elif kind == "release":
                        await release_reported(self.ledger, self.failures, self.release)
                    else:
                        await asyncio.sleep(0)
                # every request has passed the middleware's start: none starts the bus again once closed
                await self.entered.wait_count(requests)
                if plan.release_before_shutdown:
                    self.release.set()
                if plan.rests_end_before_shutdown:
                    self._end_rests()
                background.start_soon(self._emit_late)
                if plan.lifespan:
                    await inbox.put({"type": "lifespan.shutdown"})
                    message = await outbox.get()
                    assert message["type"] == "lifespan.shutdown.complete", message
                else:
                    await self.bus.aclose()
        finally:
            await self.bus.aclose()  # (a no-op once closed)
            self.release.set()  # hung plain def handlers return, so their threads end
            self._end_rests()
            await self.ledger.hanging.wait_count(self.ledger.hung)
            if self.spawned:
                await asyncio.wait(self.spawned)
            joined, rounds = 0, 0
            while True:  # the test's threads, then the bus's worker threads, until neither starts more
                with self.ledger.lock:
                    threads = self.ledger.threads[joined:]
                if not threads and rounds:
                    break
                rounds += 1
                for thread in threads:
                    await anyio.to_thread.run_sync(thread.join, 5.0)
                joined += len(threads)
                # The bus's worker threads (see the core test): a cut-off hop passes on how its call ended.
                for pool in pools:
                    for thread in list(pool._threads):
                        await anyio.to_thread.run_sync(thread.join, 5.0)
            # plain def background tasks a cut-off cancelled the wait for (FastAPI's thread pool)
            await self.ledger.hanging.wait_count(self.ledger.hung)
            await asyncio.sleep(0)
            await anyio.wait_all_tasks_blocked()  # what the threads handed to the loop (hook calls)

    def _end_rests(self) -> None:
        self.rests_may_end.set()
        self.rests_may_end_async.set()

    async def _request(self, client: httpx.AsyncClient, path: str, names: tuple[str, ...]) -> None:
        # In a task of its own, as a server runs each request (see the core test).
        request = asyncio.ensure_future(client.get(path, params=[("name", name) for name in names]))
        await asyncio.wait([request])
        if not request.cancelled():
            response = request.result()
            assert response.status_code == STATUS.get(path, 200), (path, response.text)

    async def _emit_late(self) -> None:
        """Emit while the bus shuts down, and after it closed: handled, cut off, or dropped by name."""
        for name in self.plan.late_thread_emits:
            self.ledger.start_thread(self._thread_emit(name, self.ledger.payload(name, 0)))
        for name in self.plan.late_emits:
            payload = self.ledger.payload(name, 0)
            if self.compat:
                dispatch(name, payload, middleware_id=self.middleware_id)
            else:
                self.bus.emit(name, payload)
            await asyncio.sleep(0)


def describe(plan: Plan) -> str:
    lines = [
        f"seed {plan.seed}: api={plan.api} lifespan={plan.lifespan} durable={plan.durable} {plan.limits}",
        f"  request_handlers={plan.request_handlers} request_errors={plan.request_errors} "
        f"async_hook={plan.async_hook} handler_timeout={plan.handler_timeout} retry={plan.retry}",
        f"  drain={plan.drain_timeout} release_before_shutdown={plan.release_before_shutdown} "
        f"rests_end_before_shutdown={plan.rests_end_before_shutdown} "
        f"startup={plan.startup_emits} shutdown={plan.shutdown_emits} late={plan.late_emits} "
        f"late_thread={plan.late_thread_emits} batch={plan.batch}",
    ]
    lines += [
        f"  handler {h.name} on {'Placed' if h.typed else h.patterns} child={h.child} via={h.via} "
        f"retry={h.retry} timeout={h.timeout} fail_attempts={h.fail_attempts} early={h.early} "
        f"runs_for={h.runs_for:.3f} rest={h.rest}"
        for h in plan.handlers
    ]
    lines += [f"  step {kind} {arg}" for kind, arg in plan.steps]
    return "\n".join(lines)


@pytest.mark.parametrize("seed", SEEDS)
async def test_every_due_call_has_exactly_one_outcome(seed: int, tmp_path: Path, records: Records) -> None:
    plan = Plan.generate(seed)
    scenario = Scenario(plan, tmp_path)
    with anyio.fail_after(20):
        await scenario.run()
    problems = check(scenario, records)
    assert not problems, describe(plan) + "\n" + "\n".join(problems)
