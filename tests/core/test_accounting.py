"""Nothing is lost silently: a randomized, seeded check that every due handler call has one outcome.

Each seed generates a scenario: a bus (in memory, or on a SQLite log), a mix of handlers (async
and plain ``def``; exact names and wildcards; handlers that return, raise, fail only on their
first attempts under a ``RetryPolicy``, hang past a small timeout, emit chained events, emit from
a thread of their own or through ``emit_now``; plain ``def`` ones that hang may emit before their
timeout as well as once released, and some run about as long as their timeout, emitting on either
side of it, so that their emits meet the timeout's take-over of the call), a sequence of emits
(from the loop, from threads, through ``emit_now``, from requests through ``TidingsMiddleware``;
some while the bus shuts down), perhaps a drain in the middle, perhaps hung calls released in the
middle (once reported past their timeout), and a shutdown whose drain bound is sometimes generous
and sometimes tiny. Every emitted event carries a unique token in its payload.

What each (event, handler) call that was due ended in is then counted, and each must have exactly
one terminal outcome:

* the handler returned (it records its token and name);
* it failed for good: ``on_failure`` got a ``HandlerError`` carrying its dead letter;
* it was cut off: ``on_failure`` got a ``HandlerCancelledError`` saying it did not finish, and the
  log says so too. A call cut off while it was running may have returned all the same (at least
  once);
* or its event was dropped as a whole, and an error (a warning, for a failed request's events under
  ``request_errors="drop"``) names the event.

A failure that was retried (``retry_in`` set) and a plain ``def`` call reported past its timeout
(it runs on in its thread) are not terminal: something else must follow them.

A failing seed is named in the test id: ``pytest tests/core/test_accounting.py -k "[17]"``. With the
SQLite log, the log is checked too: a dead letter is a dead row, and a pending row is a call that was
reported unfinished (or, at least once, one that returned while events its job emitted were cut off).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import tidings
from tidings import (
    DrainTimeoutError,
    Event,
    EventBus,
    HandlerCancelledError,
    HandlerError,
    HandlerTimeoutError,
    Limits,
    RetryPolicy,
    TidingsMiddleware,
)
from tidings._core.threads import DaemonThreadPool
from tidings.store import SQLiteStore
from tidings.types import Receive, Scope, Send

from ..conftest import Recorder, Records

pytestmark = pytest.mark.anyio

# A wider sweep, say before a release: TIDINGS_ACCOUNTING_SEEDS=64-1063 pytest tests/core/test_accounting.py
_FIRST, _, _LAST = os.environ.get("TIDINGS_ACCOUNTING_SEEDS", "0-63").partition("-")
SEEDS = range(int(_FIRST), int(_LAST or _FIRST) + 1)
NAMES = ("order.placed", "order.paid", "user.created", "audit.log", "unheard.of")
PATTERNS = (*NAMES[:4], "order.*", "*", "user.?reated")
MAX_DEPTH = 2  # chained events beyond this depth are not emitted: a scenario stays small

Behaviour = Literal["returns", "raises", "flaky", "hangs", "chains", "thread_emits", "emits_now", "overruns"]
Step = tuple[str, Any]


@pytest.fixture
def anyio_backend(seed: int) -> tuple[str, dict[str, Any]]:
    """One backend per seed (the seed picks it), rather than every seed on both."""
    if seed % 2:
        return ("asyncio", {"use_uvloop": True})
    return ("asyncio", {"debug": True})


# -- the scenario, generated from a seed -------------------------------------------------------------


@dataclass(frozen=True)
class HandlerPlan:
    name: str
    patterns: tuple[str, ...]
    is_async: bool
    behaviour: Behaviour
    fail_attempts: int = 0  # "flaky": how many first attempts raise
    retry: RetryPolicy | None = None
    timeout: float | None = None
    child: str = NAMES[0]  # what a chaining handler (or a hung sync one, once released) emits
    via: Literal["bus", "tidings"] = "bus"  # how a chaining handler emits
    early: bool = False  # a plain def "hangs" or "overruns": it emits its child before its timeout too
    runs_for: float = 0.0  # "overruns" (plain def): how long it runs, either side of its timeout


@dataclass(frozen=True)
class Plan:
    seed: int
    durable: bool
    limits: Limits
    request_handlers: Literal["inline", "task"]
    request_errors: Literal["deliver", "drop"]
    async_hook: bool
    handlers: tuple[HandlerPlan, ...]
    steps: tuple[Step, ...]
    release_before_shutdown: bool  # hung plain def handlers return before shutdown (else after it)
    drain_timeout: float
    late_emits: tuple[str, ...]  # emitted from the loop while the bus shuts down, and after
    late_thread_emits: tuple[str, ...]  # the same from a thread

    @classmethod
    def generate(cls, seed: int) -> Plan:
        rng = random.Random(seed)
        handlers: list[HandlerPlan] = []
        for index in range(rng.randint(2, 6)):
            is_async = rng.random() < 0.6
            behaviours: list[Behaviour] = ["returns", "raises", "flaky", "hangs", "chains", "thread_emits"]
            if is_async:
                behaviours.append("emits_now")
            behaviour = rng.choice(behaviours)
            patterns = tuple(rng.sample(PATTERNS, rng.choice((1, 1, 2))))
            retry: RetryPolicy | None = None
            fail_attempts = 0
            timeout: float | None = None
            if behaviour == "flaky":
                attempts = rng.randint(2, 3)
                fail_attempts = rng.randint(1, attempts)  # == attempts: a dead letter in the end
                retry = RetryPolicy(max_attempts=attempts, backoff=rng.choice((0.002, 0.01)), jitter=0.0)
            elif behaviour == "raises" and rng.random() < 0.5:
                retry = RetryPolicy(max_attempts=2, backoff=0.005, jitter=0.0)
            elif behaviour == "hangs":
                timeout = rng.choice((0.02, 0.04))
                if is_async and rng.random() < 0.3:
                    retry = RetryPolicy(max_attempts=2, backoff=0.005, jitter=0.0)
            handlers.append(
                HandlerPlan(
                    name=f"h{index}-{behaviour}-{'async' if is_async else 'sync'}",
                    patterns=patterns,
                    is_async=is_async,
                    behaviour=behaviour,
                    fail_attempts=fail_attempts,
                    retry=retry,
                    timeout=timeout,
                    child=rng.choice(NAMES),
                    via=rng.choice(("bus", "tidings")),
                )
            )
        steps: list[Step] = []
        for _ in range(rng.randint(2, 8)):
            kind = rng.choice(("emit", "emit", "burst", "thread", "emit_now", "request", "yield", "drain"))
            if kind == "emit" or kind == "thread":
                steps.append((kind, rng.choice(NAMES)))
            elif kind == "burst":
                steps.append((kind, tuple(rng.choice(NAMES) for _ in range(rng.randint(2, 5)))))
            elif kind == "emit_now":
                steps.append((kind, (rng.choice(NAMES), rng.random() < 0.5)))  # (name, in the background)
            elif kind == "request":
                path = rng.choice(("/emit", "/sync", "/fail"))
                names = tuple(rng.choice(NAMES) for _ in range(rng.randint(0, 3)))
                steps.append((kind, (path, names, rng.random() < 0.5)))  # (..., in the background)
            elif kind == "drain":
                steps.append((kind, rng.choice((0.0, 0.005, 0.05))))
            else:
                steps.append((kind, None))
        hangs_sync = any(h.behaviour == "hangs" and not h.is_async for h in handlers)
        extra = random.Random(f"overruns-{seed}")  # see overrunning
        handlers = overrunning(extra, handlers)
        if hangs_sync and extra.random() < 0.5:
            # once each has been reported past its timeout, hung calls return while the bus runs
            steps.insert(extra.randint(0, len(steps)), ("release", None))
        if hangs_sync:
            # Hung calls may hold every worker thread until they are released: the plain def calls
            # queued behind them wait for a thread (documented), and so would a caller awaiting them.
            steps = [
                (kind, (*arg[:-1], True)) if kind in ("emit_now", "request") else (kind, arg)
                for kind, arg in steps
            ]
        release_before_shutdown = rng.random() < 0.5
        # A hung plain def handler still running holds the drain for its whole bound: a generous
        # bound only where they return first, so that the suite stays fast.
        bounds = [0.0, 0.001, 0.02, 0.1]
        if not hangs_sync or release_before_shutdown:
            bounds += [2.0, 2.0]
        return cls(
            seed=seed,
            durable=rng.random() < 0.3,
            limits=Limits(max_concurrency=rng.choice((1, 2, 256)), max_threads=rng.choice((1, 2, 8))),
            request_handlers=rng.choice(("inline", "task")),
            request_errors=rng.choice(("deliver", "drop")),
            async_hook=rng.random() < 0.3,
            handlers=tuple(handlers),
            steps=tuple(steps),
            release_before_shutdown=release_before_shutdown,
            drain_timeout=rng.choice(bounds),
            late_emits=tuple(rng.choice(NAMES) for _ in range(rng.choice((0, 0, 2, 4)))),
            late_thread_emits=tuple(rng.choice(NAMES) for _ in range(rng.choice((0, 1)))),
        )


def overrunning(rng: random.Random, handlers: list[HandlerPlan]) -> list[HandlerPlan]:
    """Plain def handlers that meet their timeout's take-over with their emits, by a second random stream.

    One that hangs may emit before its timeout as well as once released; one that returns or
    chains may instead run for about its timeout, so that its emits fall on either side of the
    take-over, or in it. ``rng`` is a random stream of its own: the rest of each seed's scenario
    stays as it was.
    """
    changed: list[HandlerPlan] = []
    for handler in handlers:
        if not handler.is_async and handler.behaviour in ("returns", "chains") and rng.random() < 0.25:
            timeout = rng.choice((0.02, 0.04))
            handler = replace(
                handler,
                name=handler.name.replace(handler.behaviour, "overruns"),
                behaviour="overruns",
                timeout=timeout,
                runs_for=timeout * rng.uniform(0.6, 1.4),
                retry=None,
            )
        if handler.behaviour in ("hangs", "overruns") and not handler.is_async:
            handler = replace(handler, early=rng.random() < 0.5)
        changed.append(handler)
    return changed


# -- what happened -----------------------------------------------------------------------------------


class Ledger:
    """What was emitted (by token) and which calls returned; written from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.emitted: dict[str, str] = {}  # token -> event name
        self.depths: dict[str, int] = {}  # token -> 0 for the test's and endpoints' emits, else > 0
        self.refused: set[str] = set()  # emit_now raised: the caller heard, nothing was due
        self.returned: list[tuple[str, str]] = []  # (token, handler)
        self.attempts: Counter[tuple[str, str]] = Counter()
        self.threads: list[threading.Thread] = []
        self.hanging = Recorder()  # one item per hung plain def call that has ended
        self.hung = 0
        self.hung_calls: list[tuple[str, str]] = []  # (token, handler) of each hung call, as it starts
        self.progress = Recorder()  # woken as a hung call starts, and as a failure is reported

    def payload(self, name: str, depth: int) -> dict[str, Any]:
        """A fresh payload for an event about to be emitted under ``name``: noted as emitted now."""
        with self.lock:
            self.count += 1
            token = f"t{self.count}"
            self.emitted[token] = name
            self.depths[token] = depth
        return {"token": token, "depth": depth}

    def returned_from(self, event: Event, handler: str) -> None:
        with self.lock:
            self.returned.append((token_of(event), handler))

    def attempt(self, event: Event, handler: str) -> int:
        with self.lock:
            self.attempts[token_of(event), handler] += 1
            return self.attempts[token_of(event), handler]

    def start_thread(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()  # before it is listed: the end of a run joins what is listed
        with self.lock:
            self.threads.append(thread)

    @contextmanager
    def hanging_call(self, call: tuple[str, str] | None = None) -> Iterator[None]:
        """Around a call the run's end waits for; ``call`` names a hung one, for a mid-run release."""
        with self.lock:
            self.hung += 1
            if call is not None:
                self.hung_calls.append(call)
        if call is not None:
            self.progress.add(None)
        try:
            yield
        finally:
            self.hanging.add(None)


async def release_reported(ledger: Ledger, failures: list[HandlerError], release: threading.Event) -> None:
    """Release the hung plain def calls once each that started has been reported.

    Past its timeout (so it is left behind in its thread, or just about to be: its return then
    meets the take-over), or unfinished (a drain cut it off first): so they return while the bus
    runs, and what follows their return (their events, their background tasks) does too.
    """

    def reported(_: object) -> bool:
        seen = {
            (token_of(event), error.handler)
            for error in list(failures)
            if is_unfinished_report(error) or is_past_timeout_report(error)
            for event in error.events
        }
        with ledger.lock:
            return all(call in seen for call in ledger.hung_calls)

    # the calls of what was emitted so far start first (those that can: a handler thread may be
    # held by another hung call), else they would not hang at all
    await anyio.wait_all_tasks_blocked()
    await ledger.progress.wait_for(reported)
    release.set()


def token_of(event: Event) -> str:
    payload = event.payload
    if isinstance(payload, dict):
        return cast(str, payload["token"])
    return cast(str, payload.token)  # a typed event (tests/integrations/test_accounting_fastapi.py)


def depth_of(event: Event) -> int:
    payload = event.payload
    if isinstance(payload, dict):
        return cast(int, payload["depth"])
    return cast(int, payload.depth)


# -- handlers ----------------------------------------------------------------------------------------


class Scenario:
    """One generated scenario: its bus, handlers and app, run once."""

    def __init__(self, plan: Plan, tmp_path: Path) -> None:
        self.plan = plan
        self.ledger = Ledger()
        self.failures: list[HandlerError] = []
        self.drain_pending: list[tuple[str, str]] = []  # what mid-run drains raised as unfinished
        self.release = threading.Event()  # hung plain def handlers wait for it
        self.never = asyncio.Event()  # hung async def handlers wait for it
        self.log_path = tmp_path / f"log-{plan.seed}.db"
        self.entered = Recorder()  # one item per request that reached the middleware
        hook: Callable[[HandlerError], object] = self._failed
        if plan.async_hook:
            hook = self._async_hook
        self.bus = EventBus(
            name=f"accounting-{plan.seed}",
            handler_timeout=0.5,  # an emits_now handler may wait for a worker thread
            drain_timeout=plan.drain_timeout,
            limits=plan.limits,
            request_handlers=plan.request_handlers,
            request_errors=plan.request_errors,
            on_failure=hook,
            store=SQLiteStore(self.log_path) if plan.durable else None,
        )
        for handler in plan.handlers:
            function = self._async_handler(handler) if handler.is_async else self._sync_handler(handler)
            options: dict[str, Any] = {"name": handler.name, "retry": handler.retry}
            if handler.timeout is not None:
                options["timeout"] = handler.timeout
            self.bus.on(*handler.patterns, **options)(function)
        app = Starlette(
            routes=[
                Route("/emit", self._endpoint),
                Route("/sync", self._sync_endpoint),
                Route("/fail", self._failing_endpoint),
            ],
            middleware=[Middleware(TidingsMiddleware, bus=self.bus)],
        )

        async def entering(scope: Scope, receive: Receive, send: Send) -> None:
            self.entered.add(None)  # the middleware starts the bus (if closed) before its first await
            await app(scope, receive, send)

        self.app = entering

    def _failed(self, error: HandlerError) -> None:
        self.failures.append(error)
        self.ledger.progress.add(None)  # a mid-run release may wait for it

    async def _async_hook(self, error: HandlerError) -> None:
        self._failed(error)

    def _emit_child(self, handler: HandlerPlan, event: Event) -> None:
        """Emit the handler's chained event (below the depth limit) the way its plan says."""
        if depth_of(event) >= MAX_DEPTH:
            return
        payload = self.ledger.payload(handler.child, depth_of(event) + 1)
        if handler.via == "tidings":
            tidings.emit(handler.child, payload)
        else:
            self.bus.emit(handler.child, payload)

    def _async_handler(self, handler: HandlerPlan) -> Callable[[Event], Awaitable[None]]:
        ledger = self.ledger

        async def run(event: Event) -> None:
            behaviour = handler.behaviour
            if behaviour == "raises":
                raise RuntimeError(f"{handler.name} fails")
            if behaviour == "flaky" and ledger.attempt(event, handler.name) <= handler.fail_attempts:
                raise ConnectionError(f"{handler.name} fails this attempt")
            if behaviour == "hangs":
                await self.never.wait()
            if behaviour == "chains":
                self._emit_child(handler, event)
            if behaviour == "thread_emits" and depth_of(event) < MAX_DEPTH:
                payload = ledger.payload(handler.child, depth_of(event) + 1)
                ledger.start_thread(lambda: self.bus.emit(handler.child, payload))
            if behaviour == "emits_now" and depth_of(event) < MAX_DEPTH:
                await self._emit_now(handler.child, depth_of(event) + 1)
            ledger.returned_from(event, handler.name)

        return run

    def _sync_handler(self, handler: HandlerPlan) -> Callable[[Event], None]:
        ledger = self.ledger

        def run(event: Event) -> None:
            behaviour = handler.behaviour
            if behaviour == "raises":
                raise RuntimeError(f"{handler.name} fails")
            if behaviour == "flaky" and ledger.attempt(event, handler.name) <= handler.fail_attempts:
                raise ConnectionError(f"{handler.name} fails this attempt")
            if behaviour in ("hangs", "overruns"):
                with ledger.hanging_call((token_of(event), handler.name) if behaviour == "hangs" else None):
                    if behaviour == "hangs":
                        if handler.early:
                            self._emit_child(handler, event)  # as its job's, while the job waits for it
                        assert self.release.wait(30), "never released"
                        self._emit_child(handler, event)  # after its job went on without it
                    elif depth_of(event) < MAX_DEPTH:  # (one that emits nothing has no emit to race with)
                        if handler.early:
                            self._emit_child(handler, event)  # as its job's, or as the timeout takes it over
                        time.sleep(handler.runs_for)  # its work: about as long as its timeout
                        if not handler.early:
                            self._emit_child(handler, event)  # as it returns, or after it was left behind
                    ledger.returned_from(event, handler.name)
                return
            if behaviour == "chains":
                self._emit_child(handler, event)
            if behaviour == "thread_emits" and depth_of(event) < MAX_DEPTH:
                payload = ledger.payload(handler.child, depth_of(event) + 1)
                ledger.start_thread(lambda: self.bus.emit(handler.child, payload))
            ledger.returned_from(event, handler.name)

        return run

    async def _emit_now(self, name: str, depth: int) -> None:
        payload = self.ledger.payload(name, depth)
        try:
            await self.bus.emit_now(name, payload)
        except tidings.BusStateError:  # raised into the caller: nothing was accepted
            with self.ledger.lock:
                self.ledger.refused.add(cast(str, payload["token"]))

    # -- endpoints -------------------------------------------------------------------------------
    async def _endpoint(self, request: Request) -> Response:
        for name in request.query_params.getlist("name"):
            tidings.emit(name, self.ledger.payload(name, 0))
        return PlainTextResponse("ok")

    def _sync_endpoint(self, request: Request) -> Response:  # runs in a worker thread
        for name in request.query_params.getlist("name"):
            tidings.emit(name, self.ledger.payload(name, 0))
        return PlainTextResponse("ok")

    async def _failing_endpoint(self, request: Request) -> Response:
        for name in request.query_params.getlist("name"):
            tidings.emit(name, self.ledger.payload(name, 0))
        raise RuntimeError("the endpoint fails")

    # -- the run ---------------------------------------------------------------------------------
    async def run(self) -> None:
        plan = self.plan
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        requests = 0
        pools: list[DaemonThreadPool] = []
        try:
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://test") as client,
                anyio.create_task_group() as background,
            ):
                await self.bus.start()
                pools.append(self.bus._runner._executor)  # type: ignore[arg-type]  # started
                for kind, arg in plan.steps:
                    if kind == "emit":
                        self.bus.emit(arg, self.ledger.payload(arg, 0))
                    elif kind == "burst":
                        for name in arg:
                            self.bus.emit(name, self.ledger.payload(name, 0))
                    elif kind == "thread":
                        payload = self.ledger.payload(arg, 0)
                        self.ledger.start_thread(functools.partial(self.bus.emit, arg, payload))
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
                background.start_soon(self._emit_late)
                await self.bus.aclose()
        finally:
            await self.bus.aclose()  # (a no-op once closed)
            self.release.set()  # hung plain def handlers return, so their threads end
            await self.ledger.hanging.wait_count(self.ledger.hung)
            # The bus's worker threads first (handlers start threads of their own): a hop the drain
            # cut off runs its current call to its end, then passes on how it ended (a failure
            # reaches the hook after aclose() returned).
            for pool in pools:
                for thread in list(pool._threads):
                    await anyio.to_thread.run_sync(thread.join, 5.0)
            for thread in list(self.ledger.threads):
                await anyio.to_thread.run_sync(thread.join, 5.0)
            await asyncio.sleep(0)
            await anyio.wait_all_tasks_blocked()  # what the threads handed to the loop (hook calls)

    async def _request(self, client: httpx.AsyncClient, path: str, names: tuple[str, ...]) -> None:
        # In a task of its own, as a server runs each request: with request_handlers="inline" a
        # drain that cuts off the request's handlers cancels that task (and not the test's).
        request = asyncio.ensure_future(client.get(path, params=[("name", name) for name in names]))
        await asyncio.wait([request])
        if not request.cancelled():
            assert request.result().status_code == (500 if path == "/fail" else 200)

    async def _emit_late(self) -> None:
        """Emit while the bus shuts down, and after it closed: handled, cut off, or dropped by name."""
        for name in self.plan.late_thread_emits:
            payload = self.ledger.payload(name, 0)
            self.ledger.start_thread(functools.partial(self.bus.emit, name, payload))
        for name in self.plan.late_emits:
            self.bus.emit(name, self.ledger.payload(name, 0))
            await asyncio.sleep(0)


# -- the accounting ----------------------------------------------------------------------------------


class Planned(Protocol):
    @property
    def durable(self) -> bool: ...


class Accounted(Protocol):
    """What the accounting reads of a scenario run (this file's, or another integration's)."""

    @property
    def plan(self) -> Planned: ...

    ledger: Ledger
    bus: EventBus
    failures: list[HandlerError]
    drain_pending: list[tuple[str, str]]  # what mid-run drains raised as unfinished
    log_path: Path


@dataclass
class Outcomes:
    returned: Counter[tuple[str, str]] = field(default_factory=Counter)
    dead: Counter[tuple[str, str]] = field(default_factory=Counter)
    unfinished: Counter[tuple[str, str]] = field(default_factory=Counter)
    other: Counter[tuple[str, str]] = field(default_factory=Counter)  # retried, or past a sync timeout
    # an async call cancelled at its timeout and retried: it may have returned what the harness
    # counts as its work before (a FastAPI yield dependency's exit, run after it, timed out)
    cancelled_retried: Counter[tuple[str, str]] = field(default_factory=Counter)
    unfinished_ids: dict[tuple[str, str], str] = field(default_factory=dict)  # -> event id

    def any(self, call: tuple[str, str]) -> bool:
        return bool(self.returned[call] or self.dead[call] or self.unfinished[call] or self.other[call])


def is_unfinished_report(error: HandlerError) -> bool:
    """Drain's (or shutdown's) report of a call it will not finish, as opposed to a call's own failure."""
    return (
        type(error) is HandlerCancelledError
        and error.__cause__ is None
        and error.retry_in is None
        and not error.dead_letters
    )


def is_past_timeout_report(error: HandlerError) -> bool:
    """The report of a plain def call run past its timeout, left to run on: not its outcome."""
    return type(error) is HandlerTimeoutError and error.retry_in is None and not error.dead_letters


def outcomes_of(scenario: Accounted) -> Outcomes:
    outcomes = Outcomes()
    outcomes.returned.update(scenario.ledger.returned)
    for error in scenario.failures:
        if error.dead_letters:
            outcomes.dead.update((token_of(letter.event), letter.handler) for letter in error.dead_letters)
        elif is_unfinished_report(error):
            for event in error.events:
                outcomes.unfinished[token_of(event), error.handler] += 1
                outcomes.unfinished_ids[token_of(event), error.handler] = event.id
        else:
            outcomes.other.update((token_of(event), error.handler) for event in error.events)
            if isinstance(error, HandlerTimeoutError) and error.retry_in is not None:
                outcomes.cancelled_retried.update((token_of(event), error.handler) for event in error.events)
    return outcomes


def log_rows(path: Path) -> dict[tuple[str, str], str]:
    """(token, handler) -> status of every row the SQLite log holds."""
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute("SELECT handler, payload, status FROM tidings_deliveries").fetchall()
    finally:
        connection.close()
    return {(logged_token(payload), handler): status for handler, payload, status in rows}


def log_event_ids(path: Path) -> dict[str, str]:
    """token -> event id, of every event the SQLite log holds a row of."""
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute("SELECT event_id, payload FROM tidings_deliveries").fetchall()
    finally:
        connection.close()
    return {logged_token(payload): event_id for event_id, payload in rows}


def logged_token(payload: str) -> str:
    value = json.loads(payload)
    if "$tidings.typed" in value:  # a typed event (tests/integrations/test_accounting_fastapi.py)
        value = value["$tidings.typed"][1]  # [its class's keys, its fields]
    return cast(str, value["token"])


def check(scenario: Accounted, records: Records) -> list[str]:
    """Every problem with the accounting of ``scenario``, one line each."""
    ledger, bus = scenario.ledger, scenario.bus
    outcomes = outcomes_of(scenario)
    logged: list[logging.LogRecord] = list(records.recorder.items)
    dropped = Counter(
        cast(str, getattr(record, "tidings_event", None))
        for record in logged
        if "was dropped because" in record.getMessage()
    )
    logged_unfinished = {
        (getattr(record, "tidings_event_id", None), getattr(record, "tidings_handler", None))
        for record in logged
        if "did not finish" in record.getMessage()
    }
    problems: list[str] = []
    silent: Counter[str] = Counter()  # events of each name with handlers and no outcome at all
    for token, name in ledger.emitted.items():
        if token in ledger.refused:
            continue
        due = [(token, spec.name) for spec in bus.registry.resolve(name)]
        if not due:
            continue
        if not any(outcomes.any(call) for call in due):
            silent[name] += 1
            continue
        for call in due:
            returned, dead, unfinished = (
                outcomes.returned[call],
                outcomes.dead[call],
                outcomes.unfinished[call],
            )
            terminal = returned + dead + unfinished
            # at least once: a call reported unfinished while it ran may still have returned, and
            # one cancelled at its timeout after its work was done returns again when retried
            if terminal == 1 or (terminal == 2 and returned == 1 and unfinished == 1):
                continue
            if returned == terminal and 1 < returned <= 1 + outcomes.cancelled_retried[call]:
                continue
            problems.append(
                f"{name} {call}: returned {returned}, dead letters {dead}, unfinished {unfinished}, "
                f"other failures {outcomes.other[call]}"
            )
    for name, count in silent.items():
        if count > dropped[name]:
            problems.append(
                f"{count} event(s) {name!r} had no outcome, and {dropped[name]} drop(s) were logged"
            )
    for call, event_id in outcomes.unfinished_ids.items():
        if (event_id, call[1]) not in logged_unfinished:
            problems.append(f"{call} was reported unfinished to on_failure but not logged")
    for call in scenario.drain_pending:
        if not outcomes.unfinished[call]:
            problems.append(f"{call} was in DrainTimeoutError.pending but not reported unfinished")
    if scenario.plan.durable:
        rows = log_rows(scenario.log_path)
        for call in outcomes.dead:
            if rows.get(call) != "dead":
                problems.append(f"{call} became a dead letter; the log has it as {rows.get(call)}")
        for call in outcomes.unfinished:
            if rows.get(call) == "dead":
                problems.append(f"{call} was cut off, yet the log has it as a dead letter")
            # kept to run after the next start (unless it returned after all, and left the log)
            if rows.get(call) is None and not outcomes.returned[call]:
                problems.append(f"{call} was cut off, yet the log does not keep it")
        # A call that returned stays in the log while events its job emitted are not in it yet; if
        # the job is cut off then, it runs again after a restart and emits them again (at least once).
        children_cut_off = any(ledger.depths[token] > 0 for token, _ in outcomes.unfinished)
        # A call whose job was cut off may return after the bus closed its log (its task slow to
        # unwind): the log keeps it, to run again after a restart, and the bus names it.
        late = [
            record.getMessage()
            for record in logged
            if "the event log could not complete" in record.getMessage()
            and "is closed" in record.getMessage()
        ]
        event_ids = log_event_ids(scenario.log_path) if late else {}
        for call, status in rows.items():
            if status == "pending" and not outcomes.unfinished[call] and not outcomes.returned[call]:
                problems.append(f"{call} is pending in the log with no report of why")
            if (
                status == "pending"
                and outcomes.returned[call]
                and not outcomes.unfinished[call]
                and not children_cut_off
                and not any(f"{event_ids.get(call[0])}/{call[1]}" in message for message in late)
            ):
                problems.append(f"{call} returned but is still pending in the log")
    return problems


def describe(plan: Plan) -> str:
    lines = [
        f"seed {plan.seed}: durable={plan.durable} {plan.limits} request_handlers={plan.request_handlers}",
        f"  request_errors={plan.request_errors} async_hook={plan.async_hook} drain={plan.drain_timeout}",
        f"  release_before_shutdown={plan.release_before_shutdown} late={plan.late_emits} "
        f"late_thread={plan.late_thread_emits}",
    ]
    lines += [
        f"  handler {h.name} on {h.patterns} child={h.child} via={h.via} retry={h.retry} "
        f"timeout={h.timeout} early={h.early} runs_for={h.runs_for:.3f}"
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
