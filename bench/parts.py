"""Where a 1-event request's time goes: ``python -m bench.parts``.

Runs, in one process and interleaved (so a busy neighbour slows every variant alike), bare
Starlette and the same app behind variants of the middleware, one event per request to one async
no-op handler, and prints µs per request (CPU time of the loop's thread, best and first quartile of
the rounds) and the ratio to bare Starlette:

* ``tidings``: ``TidingsMiddleware`` as shipped;
* ``no run_job``: the events sorted and the job tracked as shipped (``request_job``), then the
  calls awaited in the middleware instead of by the runner's ``run_job``;
* ``no job``: the request scope, ``emit()`` and the ``Event`` as shipped, the handlers resolved
  and awaited in the middleware: no job at all (so no timeouts, drain, retries or log);
* ``floor``: the least an after-response middleware can do: a context variable holding a list,
  and each handler awaited after the app returns.

The gaps between the rows are what each part costs. They are for finding what to make cheaper,
not targets: the variants drop guarantees the shipped middleware gives.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from time import thread_time, time_ns
from typing import Any

from starlette.middleware import Middleware

from tidings import Event, EventBus, TidingsMiddleware, emit
from tidings._core.dispatcher import reset_scope, set_scope
from tidings._core.envelope import EMPTY_HEADERS
from tidings._core.runner import Job

from ._types import ASGIApp, Receive, Scope, Send
from .apps import EVENT, TALLY, AppSpec, EmitFn, _starlette, build_app
from .harness import Lifespan, RequestDriver

_REQUESTS_PER_ROUND = 2000


class _Variant(TidingsMiddleware):
    """The request scope and ``emit()`` as shipped; what runs the handlers is the subclass's."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        bus = self.bus
        bus.ensure_running()
        events = bus.open_request()
        token = set_scope(events)
        try:
            await self.app(scope, receive, send)
            await self.run_handlers(bus, events)
        finally:
            reset_scope(token)

    async def run_handlers(self, bus: EventBus, events: Job) -> None:
        raise NotImplementedError


class _NoRunJob(_Variant):
    async def run_handlers(self, bus: EventBus, events: Job) -> None:
        if events.buffer and bus.request_job(events):
            for spec, arg in events.async_calls:
                await spec.call(arg)
            bus._runner.jobs.discard(events)  # what the end of run_job does
        events.buffer = None


class _NoJob(_Variant):
    async def run_handlers(self, bus: EventBus, events: Job) -> None:
        records, events.buffer = events.buffer or [], None
        resolve = bus.registry.resolve
        for name, payload, timestamp_ns, _headers in records:
            for spec in resolve(name):
                await spec.call(Event(name, payload, EMPTY_HEADERS, timestamp_ns))


_floor_buffer: ContextVar[list[tuple[str, Any, int]] | None] = ContextVar("floor_buffer", default=None)
_floor_handlers: dict[str, list[Callable[[Event], Awaitable[None]]]] = {}


def _floor_emit(name: str, payload: Any = None) -> None:
    buffer = _floor_buffer.get()
    if buffer is not None:
        buffer.append((name, payload, time_ns()))


class _Floor:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        buffer: list[tuple[str, Any, int]] = []
        token = _floor_buffer.set(buffer)
        try:
            await self.app(scope, receive, send)
            for name, payload, timestamp_ns in buffer:
                for handler in _floor_handlers.get(name, ()):
                    await handler(Event(name, payload, EMPTY_HEADERS, timestamp_ns))
        finally:
            _floor_buffer.reset(token)


async def _count(event: Event) -> None:
    TALLY.hit()


def _variant(middleware: type[TidingsMiddleware]) -> ASGIApp:
    bus = EventBus()
    bus.subscribe(_count, EVENT)
    return _starlette(AppSpec(events=1), emit, [Middleware(middleware, bus=bus)])


def _floor() -> ASGIApp:
    _floor_handlers[EVENT] = [_count]
    floor_emit: EmitFn = _floor_emit
    return _starlette(AppSpec(events=1), floor_emit, [Middleware(_Floor)])


async def _measure(rounds: int) -> dict[str, list[float]]:
    apps: dict[str, tuple[ASGIApp, int]] = {
        "bare Starlette": (build_app("starlette", AppSpec(events=0)), 0),
        "tidings": (_variant(TidingsMiddleware), 1),
        "no run_job": (_variant(_NoRunJob), 1),
        "no job": (_variant(_NoJob), 1),
        "floor": (_floor(), 1),
    }
    lifespans: list[Lifespan] = []
    drivers: dict[str, tuple[RequestDriver, int]] = {}
    for name, (app, events) in apps.items():
        lifespan = Lifespan(app)
        drivers[name] = (RequestDriver(app, await lifespan.__aenter__()), events)
        lifespans.append(lifespan)
    samples: dict[str, list[float]] = {name: [] for name in drivers}
    try:
        for round_number in range(rounds + 3):  # three rounds of warm-up
            for name, (driver, events) in drivers.items():
                gc.collect()
                expected = TALLY.count + _REQUESTS_PER_ROUND * events
                start = thread_time()
                await driver.run(_REQUESTS_PER_ROUND)
                await TALLY.wait_for(expected)
                if round_number >= 3:
                    samples[name].append((thread_time() - start) / _REQUESTS_PER_ROUND * 1e6)
    finally:
        for lifespan in reversed(lifespans):
            await lifespan.__aexit__(None, None, None)
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.parts", description=__doc__)
    parser.add_argument("--rounds", type=int, default=25, help="timed rounds of 2,000 requests each")
    args = parser.parse_args(argv)
    samples = asyncio.run(_measure(args.rounds))
    bare = min(samples["bare Starlette"])
    print("| variant | µs/request, best | first quartile | ratio to bare Starlette (best) |")
    print("|---|---|---|---|")
    for name, values in samples.items():
        best = min(values)
        quartile = statistics.quantiles(values, n=4)[0]
        print(f"| {name} | {best:.2f} | {quartile:.2f} | {bare / best:.2f} |")


if __name__ == "__main__":
    main()
