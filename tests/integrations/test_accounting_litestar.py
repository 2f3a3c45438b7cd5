"""Nothing is lost silently, in a Litestar app: tests/core/test_accounting.py's accounting, with the plugin.

Each seed generates a scenario on top of the core test's (its bus settings and ``bus.on`` handlers, the
same behaviours): a Litestar app with :class:`TidingsPlugin`, Litestar listeners (``@listener``,
``async def`` and plain ``def``: they return, raise, fail on their first attempts under the bus's
retry policy, hang past the bus's ``handler_timeout``, chain through ``app.emit`` or ``tidings.emit``,
emit from a thread; plain ``def`` ones that hang may emit before their timeout as well as once
released, and some run about as long as the timeout, so that their emits meet its take-over of the
call), hung calls perhaps released mid-run once each is reported, and route handlers (``async
def`` and plain ``def`` with ``sync_to_thread``) that emit through ``tidings.emit`` or
``request.app.emit``: some return, some raise (answered by Litestar
with a 500, a 404, or by exception handlers of the app with a 409, a 503 that emits, or an exception
handler that emits and raises), some emit from an ``after_response`` hook or a background task.
``request_errors`` is "deliver" or "drop", set on the bus or overridden by the plugin. The app's
``on_startup`` hooks, a lifespan context manager of its own and its ``on_shutdown`` hooks emit too.
The lifespan is driven as a server drives it; its shutdown drains within a random bound while the test
emits from the loop and from threads.

The core test's check then counts every (event, handler) call that was due: exactly one terminal
outcome each (returned; a dead letter; reported unfinished, and kept in the durable log), or its event
dropped with an error naming it. On top of that:

* the events that no policy drops must have an outcome: those the test emitted before shutdown, the
  app's startup and shutdown code's, and those of each request whose app returned before shutdown
  began (a server waits for its requests before it shuts the app down; the test does not, and a
  request that ends after the bus closed has its events dropped by name), except a failed request's
  under ``request_errors="drop"``;
* those failed requests' events must not be handled at all: the events a route emitted before it
  raised, when Litestar answers with a 500 or an exception handler with a 503, and an exception
  handler's own events when it raises (what one emits before answering is delivered);
* each request answered with the status its route and the exception handlers give.

No ``from __future__ import annotations``: Litestar reads route handlers' annotations at runtime.
A failing seed is named in the test id: ``pytest tests/integrations/test_accounting_litestar.py -k "[17]"``;
``TIDINGS_ACCOUNTING_SEEDS=A-B`` widens the range, as for the core test.
"""

import asyncio
import dataclasses
import functools
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, cast

import anyio
import httpx
import pytest
from litestar import Litestar, Request, Response, get
from litestar.background_tasks import BackgroundTask
from litestar.events import EventListener, listener
from litestar.exceptions import NotFoundException
from litestar.middleware import DefineMiddleware

import tidings
from tests.core.test_accounting import (
    MAX_DEPTH,
    NAMES,
    SEEDS,
    Behaviour,
    HandlerPlan,
    Ledger,
    Plan,
    Scenario,
    Step,
    check,
    describe,
    outcomes_of,
    release_reported,
)
from tidings import EventBus, RetryPolicy
from tidings._core.threads import DaemonThreadPool
from tidings.integrations.litestar import TidingsPlugin
from tidings.store import SQLiteStore
from tidings.types import ASGIApp, Receive, Scope, Send

from ..conftest import Recorder, Records
from .test_litestar import Lifespan, OutOfStock, PaymentDown, Unanswerable

pytestmark = pytest.mark.anyio

Policy = Literal["deliver", "drop"]
# path -> (status, whether its route's events are the events of a failed request under "drop")
ROUTES: dict[str, tuple[int, bool]] = {
    "/emit": (200, False),
    "/sync": (200, False),
    "/crash": (500, True),
    "/sync-crash": (500, True),
    "/missing": (404, False),
    "/out-of-stock": (409, False),
    "/payment-down": (503, True),
    "/broken": (500, True),
    "/after": (200, False),
    "/background": (200, False),
    "/sync-background": (200, False),
}
# the tokens emitted by the request being handled (its route, hooks, exception handler, background task)
REQUEST_TOKENS: ContextVar[list[str] | None] = ContextVar("REQUEST_TOKENS", default=None)


@pytest.fixture
def anyio_backend(seed: int) -> tuple[str, dict[str, Any]]:
    """One backend per seed (the seed picks it), rather than every seed on both."""
    if seed % 2:
        return ("asyncio", {"use_uvloop": True})
    return ("asyncio", {"debug": True})


# -- the scenario, generated from a seed -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LitestarPlan(Plan):
    """The core test's plan (bus, ``bus.on`` handlers, late emits), with the app's side of it."""

    listeners: tuple[HandlerPlan, ...]  # Litestar listeners: exact ids; via "bus" is app.emit
    plugin_errors: Policy | None  # TidingsPlugin(request_errors=...), None: the bus's policy
    handler_timeout: float
    bus_retry: RetryPolicy | None  # the bus's default policy (the listeners'); None: no retries
    startup_emits: tuple[str, ...]  # from an on_startup hook, through app.emit
    shutdown_emits: tuple[str, ...]  # from the app's lifespan manager's exit (tidings.emit), on_shutdown

    @property
    def policy(self) -> Policy:
        return self.plugin_errors or self.request_errors

    @classmethod
    def generate(cls, seed: int) -> "LitestarPlan":
        core = Plan.generate(seed)
        rng = random.Random(f"litestar-{seed}")
        bus_retry = None
        if rng.random() < 0.4:
            bus_retry = RetryPolicy(max_attempts=rng.randint(2, 3), backoff=0.004, jitter=0.0)
        listeners: list[HandlerPlan] = []
        for index in range(rng.randint(1, 5)):
            is_async = rng.random() < 0.6
            behaviours: list[Behaviour] = ["returns", "raises", "hangs", "chains", "thread_emits"]
            if bus_retry is not None:
                behaviours.append("flaky")
            behaviour = rng.choice(behaviours)
            fail_attempts = rng.randint(1, bus_retry.max_attempts) if bus_retry is not None else 0
            listeners.append(
                HandlerPlan(
                    name=f"l{index}-{behaviour}-{'async' if is_async else 'sync'}",
                    patterns=tuple(rng.sample(NAMES[:4], rng.choice((1, 1, 2)))),  # exact ids only
                    is_async=is_async,
                    behaviour=behaviour,
                    fail_attempts=fail_attempts if behaviour == "flaky" else 0,
                    child=rng.choice(NAMES),
                    via=rng.choice(("bus", "tidings")),
                )
            )
        steps: list[Step] = []
        for _ in range(rng.randint(2, 8)):
            kind = rng.choice(
                ("emit", "app_emit", "burst", "thread", "emit_now", "yield", "drain", *["request"] * 4)
            )
            if kind in ("emit", "app_emit", "thread"):
                steps.append((kind, rng.choice(NAMES)))
            elif kind == "burst":
                steps.append((kind, tuple(rng.choice(NAMES) for _ in range(rng.randint(2, 5)))))
            elif kind == "emit_now":
                steps.append((kind, (rng.choice(NAMES), rng.random() < 0.5)))  # (name, in the background)
            elif kind == "request":
                path = rng.choice(tuple(ROUTES))
                names = tuple(rng.choice(NAMES) for _ in range(rng.randint(0, 3)))
                later = tuple(rng.choice(NAMES) for _ in range(rng.randint(0, 2)))  # hook's, handler's
                via = rng.choice(("app", "tidings"))
                steps.append((kind, (path, names, later, via, rng.random() < 0.5)))
            elif kind == "drain":
                steps.append((kind, rng.choice((0.0, 0.005, 0.05))))
            else:
                steps.append((kind, None))
        # A second random stream, so that the rest of each seed's scenario stays as it was: plain
        # def listeners that run about as long as the bus's timeout (their emits meet its take-over),
        # hung ones that emit before their timeout too, and hung calls released mid-run.
        extra = random.Random(f"litestar-overruns-{seed}")
        listeners = overrunning_listeners(extra, listeners, overrun=bus_retry is None)
        everyone = core.handlers + tuple(listeners)
        hangs_sync = any(h.behaviour == "hangs" and not h.is_async for h in everyone)
        if hangs_sync and extra.random() < 0.5:
            # once each has been reported past its timeout, hung calls return while the bus runs
            steps.insert(extra.randint(0, len(steps)), ("release", None))
        if hangs_sync:  # as in the core test: whatever awaits plain def calls runs in the background
            steps = [
                (kind, (*arg[:-1], True)) if kind in ("emit_now", "request") else (kind, arg)
                for kind, arg in steps
            ]
        bounds = [0.0, 0.001, 0.02, 0.1]
        if not hangs_sync or core.release_before_shutdown:
            bounds += [2.0, 2.0]
        fields = {f.name: getattr(core, f.name) for f in dataclasses.fields(Plan)}
        fields.update(steps=tuple(steps), drain_timeout=rng.choice(bounds))
        return cls(
            **fields,
            listeners=tuple(listeners),
            plugin_errors=rng.choice((None, None, "deliver", "drop")),
            # hung and overrunning listeners have the bus's timeout (the core handlers, their own)
            handler_timeout=LISTENER_TIMEOUT
            if any(h.behaviour in ("hangs", "overruns") for h in listeners)
            else 0.5,
            bus_retry=bus_retry,
            startup_emits=tuple(rng.choice(NAMES) for _ in range(rng.choice((0, 0, 1, 2)))),
            shutdown_emits=tuple(rng.choice(NAMES) for _ in range(rng.choice((0, 0, 1, 2)))),
        )


LISTENER_TIMEOUT = 0.05  # the bus's handler_timeout when a listener hangs or overruns


def overrunning_listeners(
    rng: random.Random, listeners: list[HandlerPlan], *, overrun: bool
) -> list[HandlerPlan]:
    """The core test's ``overrunning``, for listeners, which have the bus's timeout and retry policy.

    A plain def one that returns or chains may instead run for about the bus's timeout (only with no
    retry policy, as in the core test: a timed-out call would be retried while it still runs); one
    that hangs or overruns may emit its child before its timeout as well.
    """
    changed: list[HandlerPlan] = []
    for handler in listeners:
        sync_work = not handler.is_async and handler.behaviour in ("returns", "chains")
        if overrun and sync_work and rng.random() < 0.25:
            handler = dataclasses.replace(
                handler,
                name=handler.name.replace(handler.behaviour, "overruns"),
                behaviour="overruns",
                runs_for=LISTENER_TIMEOUT * rng.uniform(0.6, 1.4),
            )
        if handler.behaviour in ("hangs", "overruns") and not handler.is_async:
            handler = dataclasses.replace(handler, early=rng.random() < 0.5)
        changed.append(handler)
    return changed


class LitestarScenario(Scenario):
    """The core scenario's handlers, ledger and hung calls, run by a Litestar app with the plugin."""

    plan: LitestarPlan

    def __init__(self, plan: LitestarPlan, tmp_path: Path) -> None:  # the core's app is not built
        self.plan = plan
        self.ledger = Ledger()
        self.failures = []
        self.drain_pending = []
        self.release = threading.Event()
        self.never = asyncio.Event()
        self.log_path = tmp_path / f"log-{plan.seed}.db"
        self.entered = Recorder()  # one item per request that has passed the plugin's middleware
        self.strict: set[str] = set()  # tokens whose events must not be dropped
        self.dropped: set[str] = set()  # tokens whose events request_errors="drop" drops
        # The tokens of each request whose app has not returned yet. Once shutdown begins, its events
        # may be dropped by name: a server waits for its requests before it shuts the app down, but
        # the test does not (a request that ends after the bus closed has its events dropped).
        self.running: dict[int, list[str]] = {}
        self.shutting_down = False
        self.statuses: list[tuple[str, int, int]] = []  # (path, expected, got)
        self.late: list[asyncio.Task[None]] = []
        hook: Callable[[tidings.HandlerError], object] = self._failed  # wakes a mid-run release
        if plan.async_hook:
            hook = self._async_hook
        options: dict[str, Any] = {} if plan.bus_retry is None else {"retry": plan.bus_retry}
        self.bus = EventBus(
            **options,
            name=f"accounting-litestar-{plan.seed}",
            handler_timeout=plan.handler_timeout,
            drain_timeout=plan.drain_timeout,
            limits=plan.limits,
            request_handlers=plan.request_handlers,
            request_errors=plan.request_errors,
            on_failure=hook,
            store=SQLiteStore(self.log_path) if plan.durable else None,
        )
        for handler in plan.handlers:
            function = self._async_handler(handler) if handler.is_async else self._sync_handler(handler)
            options = {"name": handler.name, "retry": handler.retry}
            if handler.timeout is not None:
                options["timeout"] = handler.timeout
            self.bus.on(*handler.patterns, **options)(function)
        self.litestar = self._build_app()
        for handler in plan.listeners:  # the plugin names each listener function by where it is
            assert self.bus.registry.named(self._listener_name(handler)) is not None, handler.name

    # -- bookkeeping -----------------------------------------------------------------------------
    def _payload(self, name: str, depth: int = 0, *, strict: bool | None = False) -> dict[str, Any]:
        """Fresh; ``strict``: its event may not be dropped; ``None``: it must be (a failed request's)."""
        payload = self.ledger.payload(name, depth)
        token = payload["token"]
        with self.ledger.lock:
            tokens = REQUEST_TOKENS.get()
            if tokens is not None:
                tokens.append(token)
                if strict and self.shutting_down:
                    strict = False
            if strict is not False:
                (self.strict if strict else self.dropped).add(token)
        return payload

    def _listener_name(self, handler: HandlerPlan) -> str:
        return f"{__name__}.{handler.name}"

    def _returned(self, payload: dict[str, Any], handler: str) -> None:
        with self.ledger.lock:
            self.ledger.returned.append((payload["token"], handler))

    def _attempt(self, payload: dict[str, Any], handler: str) -> int:
        with self.ledger.lock:
            self.ledger.attempts[payload["token"], handler] += 1
            return self.ledger.attempts[payload["token"], handler]

    # -- listeners -------------------------------------------------------------------------------
    def _listener_child(self, handler: HandlerPlan, payload: dict[str, Any]) -> None:
        if payload["depth"] >= MAX_DEPTH:
            return
        child = self.ledger.payload(handler.child, payload["depth"] + 1)
        if handler.via == "tidings":
            tidings.emit(handler.child, child)
        else:
            self.litestar.emit(handler.child, child)

    def _thread_child(self, handler: HandlerPlan, payload: dict[str, Any]) -> None:
        if payload["depth"] < MAX_DEPTH:
            child = self.ledger.payload(handler.child, payload["depth"] + 1)
            self.ledger.start_thread(functools.partial(self.litestar.emit, handler.child, child))

    def _listener(self, handler: HandlerPlan) -> EventListener:
        """A Litestar listener: called with the emitted argument (the payload) as Litestar would."""
        name = self._listener_name(handler)
        ledger = self.ledger

        def fails(payload: dict[str, Any]) -> bool:
            if handler.behaviour == "raises":
                return True
            return handler.behaviour == "flaky" and self._attempt(payload, name) <= handler.fail_attempts

        async def run_async(payload: dict[str, Any]) -> None:
            if fails(payload):
                raise RuntimeError(f"{handler.name} fails")
            if handler.behaviour == "hangs":
                await self.never.wait()
            if handler.behaviour == "chains":
                self._listener_child(handler, payload)
            if handler.behaviour == "thread_emits":
                self._thread_child(handler, payload)
            self._returned(payload, name)

        def run_sync(payload: dict[str, Any]) -> None:
            if fails(payload):
                raise RuntimeError(f"{handler.name} fails")
            if handler.behaviour == "hangs":
                with ledger.hanging_call((payload["token"], name)):
                    if handler.early:
                        self._listener_child(handler, payload)  # as its job's, while the job waits for it
                    assert self.release.wait(30), "never released"
                    self._listener_child(handler, payload)  # after its job went on without it
                    self._returned(payload, name)
                return
            if handler.behaviour == "overruns":
                with ledger.hanging_call():
                    if handler.early:
                        self._listener_child(
                            handler, payload
                        )  # as its job's, or as the timeout takes it over
                    time.sleep(handler.runs_for)  # its work: about as long as its timeout
                    if not handler.early:
                        self._listener_child(handler, payload)  # as it returns, or after it was left behind
                    self._returned(payload, name)
                return
            if handler.behaviour == "chains":
                self._listener_child(handler, payload)
            if handler.behaviour == "thread_emits":
                self._thread_child(handler, payload)
            self._returned(payload, name)

        function: Callable[..., Any] = run_async if handler.is_async else run_sync
        function.__qualname__ = handler.name
        return listener(*handler.patterns)(function)

    # -- the app ---------------------------------------------------------------------------------
    def _emit_all(self, request: Request[Any, Any, Any], key: str, *, strict: bool | None) -> None:
        """Emit each name of the query's ``key`` the way its ``via`` says."""
        via = request.query_params.get("via")
        for name in request.query_params.getall(key, []):
            payload = self._payload(name, strict=strict)
            if via == "app":
                request.app.emit(name, payload)
            else:
                tidings.emit(name, payload)

    def _build_app(self) -> Litestar:
        plan = self.plan
        drop = plan.policy == "drop"

        def route(path: str, *, sync: bool = False, **options: Any) -> Callable[..., Any]:
            # the route's own events may be dropped when it fails under "drop"
            strict = None if drop and ROUTES[path][1] else True
            error: BaseException | None = {
                "/crash": RuntimeError("the route fails"),
                "/sync-crash": RuntimeError("the route fails"),
                "/missing": NotFoundException("no such thing"),
                "/out-of-stock": OutOfStock(),
                "/payment-down": PaymentDown(),
                "/broken": Unanswerable(),
            }.get(path)
            background = path in ("/background", "/sync-background")

            def respond(request: Request[Any, Any, Any]) -> Response[str]:
                self._emit_all(request, "name", strict=strict)
                if error is not None:
                    raise error
                task = None
                if background:
                    task = BackgroundTask(self._later_sync if sync else self._later, request)
                return Response("ok", background=task)

            if sync:

                def sync_handler(request: Request[Any, Any, Any]) -> Response[str]:
                    return respond(request)

                return get(path, sync_to_thread=True, **options)(sync_handler)

            async def async_handler(request: Request[Any, Any, Any]) -> Response[str]:
                return respond(request)

            return get(path, **options)(async_handler)

        def answer(status: int, *, emits_first: bool = True) -> Callable[..., Response[Any]]:
            def handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
                # what an exception handler emits is delivered, unless its answer fails
                self._emit_all(request, "later", strict=None if status == 0 and drop else True)
                if status == 0:
                    raise RuntimeError("the exception handler fails")
                return Response({"detail": type(exc).__name__}, status_code=status)

            return handler

        routes = [
            route("/emit"),
            route("/sync", sync=True),
            route("/crash"),
            route("/sync-crash", sync=True),
            route("/missing"),
            route("/out-of-stock"),
            route("/payment-down"),
            route("/broken"),
            route("/after", after_response=self._after_response),
            route("/background"),
            route("/sync-background", sync=True),
        ]

        @asynccontextmanager
        async def resource(app: Litestar) -> AsyncIterator[None]:
            yield
            for name in plan.shutdown_emits:  # closed after the plugin's first drain
                tidings.emit(name, self._payload(name, strict=True))

        def on_startup(app: Litestar) -> None:
            for name in plan.startup_emits:
                app.emit(name, self._payload(name, strict=True))

        def on_shutdown(app: Litestar) -> None:
            for name in plan.shutdown_emits:
                app.emit(name, self._payload(name, strict=True))

        def entering(app: ASGIApp) -> ASGIApp:
            async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
                if scope["type"] != "http":
                    await app(scope, receive, send)
                    return
                tokens: list[str] = []
                with self.ledger.lock:
                    self.running[id(tokens)] = tokens
                self.entered.add(None)  # inside the plugin's middleware: it has started the bus if closed
                reset = REQUEST_TOKENS.set(tokens)
                try:
                    await app(scope, receive, send)
                finally:
                    REQUEST_TOKENS.reset(reset)
                    with self.ledger.lock:
                        del self.running[id(tokens)]

            return middleware

        plugin = TidingsPlugin(self.bus, request_errors=plan.plugin_errors)
        return Litestar(
            route_handlers=routes,
            listeners=[self._listener(handler) for handler in plan.listeners],
            plugins=[plugin],
            middleware=[DefineMiddleware(cast(Any, entering))],
            exception_handlers={
                OutOfStock: answer(409),
                PaymentDown: answer(503),
                Unanswerable: answer(0),
            },
            lifespan=[resource],
            on_startup=[on_startup],
            on_shutdown=[on_shutdown],
            logging_config=None,  # Litestar's default reconfigures the process's root logger
        )

    async def _after_response(self, request: Request[Any, Any, Any]) -> None:
        self._emit_all(request, "later", strict=True)

    async def _later(self, request: Request[Any, Any, Any]) -> None:
        self._emit_all(request, "later", strict=True)

    def _later_sync(self, request: Request[Any, Any, Any]) -> None:  # in a thread of Litestar's
        self._emit_all(request, "later", strict=True)

    # -- the run ---------------------------------------------------------------------------------
    async def run(self) -> None:
        plan = self.plan
        transport = httpx.ASGITransport(app=cast(Any, self.litestar), raise_app_exceptions=False)
        requests = 0
        pools: list[DaemonThreadPool] = []
        try:
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://test") as client,
                anyio.create_task_group() as background,
            ):
                async with Lifespan(self.litestar, on_shutdown_message=self._shutdown_begins):
                    pools.append(self.bus._runner._executor)  # type: ignore[arg-type]  # started
                    for kind, arg in plan.steps:
                        if kind == "emit":
                            self.bus.emit(arg, self._payload(arg, strict=True))
                        elif kind == "app_emit":
                            self.litestar.emit(arg, self._payload(arg, strict=True))
                        elif kind == "burst":
                            for name in arg:
                                self.litestar.emit(name, self._payload(name, strict=True))
                        elif kind == "thread":
                            payload = self._payload(arg)
                            self.ledger.start_thread(functools.partial(self.litestar.emit, arg, payload))
                        elif kind == "emit_now":
                            name, in_background = arg
                            if in_background:
                                background.start_soon(self._emit_now, name, 0)
                            else:
                                await self._emit_now(name, 0)
                        elif kind == "request":
                            *call, in_background = arg
                            requests += 1
                            if in_background:
                                background.start_soon(self._send_request, client, *call)
                            else:
                                await self._send_request(client, *call)
                        elif kind == "drain":
                            try:
                                await self.bus.drain(arg)
                            except tidings.DrainTimeoutError as exc:
                                self.drain_pending += [
                                    (cast(dict[str, Any], p.event.payload)["token"], p.handler)
                                    for p in exc.pending
                                ]
                        elif kind == "release":
                            await release_reported(self.ledger, self.failures, self.release)
                        else:
                            await asyncio.sleep(0)
                    # every request has passed the plugin's middleware: none starts the bus once closed
                    await self.entered.wait_count(requests)
                    if plan.release_before_shutdown:
                        self.release.set()
                assert self.bus.state is tidings.BusState.CLOSED
                for task in self.late:
                    await task
        finally:
            await self.bus.aclose()  # (a no-op once closed)
            self.release.set()  # hung plain def handlers return, so their threads end
            await self.ledger.hanging.wait_count(self.ledger.hung)
            for pool in pools:  # a hop the drain cut off passes its call's failure on when it ends
                for thread in list(pool._threads):
                    await anyio.to_thread.run_sync(thread.join, 5.0)
            # after the worker threads: a plain def handler notes the thread it starts before starting it
            for thread in self.ledger.threads:
                await anyio.to_thread.run_sync(thread.join, 5.0)
            await asyncio.sleep(0)
            await anyio.wait_all_tasks_blocked()  # what the threads handed to the loop (hook calls)

    def _shutdown_begins(self) -> None:
        """The server asked the app to shut down: emit while it does, from the loop and a thread."""
        with self.ledger.lock:
            self.shutting_down = True
            for tokens in self.running.values():
                self.strict.difference_update(tokens)
        self.late.append(asyncio.ensure_future(self._emit_late()))

    async def _send_request(
        self, client: httpx.AsyncClient, path: str, names: tuple[str, ...], later: tuple[str, ...], via: str
    ) -> None:
        # In a task of its own, as a server runs each request: with request_handlers="inline" a
        # drain that cuts off the request's handlers cancels that task (and not the test's).
        params: list[tuple[str, str | int | float | bool | None]] = [("via", via)]
        params += [("name", name) for name in names]
        params += [("later", name) for name in later]
        request = asyncio.ensure_future(client.get(path, params=params))
        await asyncio.wait([request])
        if not request.cancelled():
            self.statuses.append((path, ROUTES[path][0], request.result().status_code))


def litestar_problems(scenario: LitestarScenario) -> list[str]:
    """What the core check does not see: statuses, and events dropped that no policy drops."""
    problems = [
        f"{path} answered {got}, expected {expected}"
        for path, expected, got in scenario.statuses
        if got != expected
    ]
    outcomes = outcomes_of(scenario)
    for token in sorted(scenario.strict, key=lambda token: int(token[1:])):
        name = scenario.ledger.emitted[token]
        due = [(token, spec.name) for spec in scenario.bus.registry.resolve(name)]
        if due and not any(outcomes.any(call) for call in due):
            problems.append(f"{name} {token} had no outcome, and no policy drops it")
    for token in sorted(scenario.dropped, key=lambda token: int(token[1:])):
        name = scenario.ledger.emitted[token]
        counted = (outcomes.returned, outcomes.dead, outcomes.unfinished, outcomes.other)
        handled = [call for calls in counted for call in calls if call[0] == token and calls[call]]
        if handled:
            problems.append(f"{name} {token} of a failed request was handled under 'drop': {handled}")
    return problems


def describe_litestar(plan: LitestarPlan) -> str:
    lines = [
        describe(plan),
        f"  plugin_errors={plan.plugin_errors} (policy {plan.policy}) handler_timeout={plan.handler_timeout}"
        f" bus_retry={plan.bus_retry}",
        f"  startup={plan.startup_emits} shutdown={plan.shutdown_emits}",
    ]
    lines += [
        f"  listener {h.name} on {h.patterns} child={h.child} via={h.via} fail_attempts={h.fail_attempts}"
        for h in plan.listeners
    ]
    return "\n".join(lines)


@pytest.mark.parametrize("seed", SEEDS)
async def test_every_due_call_has_exactly_one_outcome(seed: int, tmp_path: Path, records: Records) -> None:
    plan = LitestarPlan.generate(seed)
    scenario = LitestarScenario(plan, tmp_path)
    with anyio.fail_after(20):
        await scenario.run()
    problems = check(scenario, records) + litestar_problems(scenario)
    assert not problems, describe_litestar(plan) + "\n" + "\n".join(problems)
