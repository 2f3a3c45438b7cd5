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

``--instructions`` counts CPU instructions per request instead, under valgrind's callgrind (Debian
package ``valgrind``): one process per variant and request count, the count per request being the
difference between a run of 4,000 requests and one of 2,000 (so start-up and imports cancel out).
Instruction counts do not depend on what else the machine is doing, so two commits can be compared
on a busy machine; they are not times (a cache miss costs more than an instruction), and wall-clock
ratios on a slow machine are lower than these.

``--bytecodes`` counts the Python bytecodes each variant executes per request instead
(``sys.settrace`` with opcode events, over 200 requests after a warm-up; a few seconds). On this
VM in its slow state, the time ratios track the bytecode ratios (within about 5 %), not the
instruction ratios: each bytecode costs the interpreter an indirect branch, and those mispredict.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from threading import get_ident
from time import thread_time, time_ns
from types import FrameType
from typing import Any

from starlette.middleware import Middleware

from tidings import Event, EventBus, TidingsMiddleware, emit
from tidings._core.dispatcher import reset_scope, set_scope
from tidings._core.envelope import EMPTY_HEADERS
from tidings._core.runner import Job, task_of

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
        # what the shipped middleware does, in the same steps (its check of the bus, its Job)
        loop = bus.serving_loop
        task = task_of(loop) if loop is not None and get_ident() == bus.loop_thread else None
        if task is None:
            bus.ensure_running()
        events = object.__new__(Job)
        events.bus = bus
        events.buffer = []
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


_VARIANTS: dict[str, tuple[Callable[[], ASGIApp], int]] = {
    "bare Starlette": (lambda: build_app("starlette", AppSpec(events=0)), 0),
    "tidings": (lambda: _variant(TidingsMiddleware), 1),
    "no run_job": (lambda: _variant(_NoRunJob), 1),
    "no job": (lambda: _variant(_NoJob), 1),
    "floor": (_floor, 1),
}
"""Each variant's app factory and its events per request."""


async def _measure(rounds: int) -> dict[str, list[float]]:
    apps = {name: (build(), events) for name, (build, events) in _VARIANTS.items()}
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


_COUNTED_REQUESTS = (2000, 4000)  # the two runs whose difference is counted
_WARM_UP_REQUESTS = 500


async def _serve(variant: str, requests: int) -> None:
    """Run one variant's app for ``requests`` requests after a warm-up (the process callgrind counts)."""
    build, events = _VARIANTS[variant]
    app = build()
    lifespan = Lifespan(app)
    driver = RequestDriver(app, await lifespan.__aenter__())
    try:
        for count in (_WARM_UP_REQUESTS, requests):
            expected = TALLY.count + count * events
            await driver.run(count)
            await TALLY.wait_for(expected)
    finally:
        await lifespan.__aexit__(None, None, None)


def _instructions(valgrind: str, variant: str, requests: int) -> int:
    """The instructions one process serving ``requests`` requests of ``variant`` executes, start to end."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={os.path.join(folder, 'callgrind.out')}",
            sys.executable,
            "-m",
            "bench.parts",
            "--serve",
            variant,
            "--requests",
            str(requests),
        ]
        # a fixed hash seed: dict and set layouts, and so the instructions, are the same every run
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run of {variant!r} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def _count_instructions() -> dict[str, float]:
    """Instructions per request of each variant: the difference of two runs, two processes at a time."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (Debian package valgrind) on the PATH")
    jobs = [(variant, requests) for variant in _VARIANTS for requests in _COUNTED_REQUESTS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        totals = dict(zip(jobs, pool.map(lambda job: _instructions(valgrind, *job), jobs), strict=True))
    fewer, more = _COUNTED_REQUESTS
    return {name: (totals[name, more] - totals[name, fewer]) / (more - fewer) for name in _VARIANTS}


_TRACED_REQUESTS = 200


async def _bytecodes_of(variant: str) -> float:
    """Python bytecodes run per request by ``variant`` (every frame: the app's, tidings', the driver's)."""
    build, events = _VARIANTS[variant]
    app = build()
    lifespan = Lifespan(app)
    driver = RequestDriver(app, await lifespan.__aenter__())
    executed = 0

    def count(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal executed
        if event == "opcode":
            executed += 1
        return count

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return count

    try:
        expected = TALLY.count + _WARM_UP_REQUESTS * events
        await driver.run(_WARM_UP_REQUESTS)
        await TALLY.wait_for(expected)
        expected = TALLY.count + _TRACED_REQUESTS * events
        sys.settrace(trace)
        try:
            await driver.run(_TRACED_REQUESTS)
            await TALLY.wait_for(expected)
        finally:
            sys.settrace(None)
    finally:
        await lifespan.__aexit__(None, None, None)
    return executed / _TRACED_REQUESTS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.parts", description=__doc__)
    parser.add_argument("--rounds", type=int, default=25, help="timed rounds of 2,000 requests each")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count CPU instructions per request under callgrind instead of timing (about 3 minutes)",
    )
    parser.add_argument(
        "--bytecodes",
        action="store_true",
        help="count the Python bytecodes executed per request instead of timing (a few seconds)",
    )
    parser.add_argument("--serve", choices=list(_VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=_COUNTED_REQUESTS[0], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        asyncio.run(_serve(args.serve, args.requests))
        return
    if args.instructions or args.bytecodes:
        if args.instructions:
            counts, unit = _count_instructions(), "instructions"
        else:
            counts, unit = {name: asyncio.run(_bytecodes_of(name)) for name in _VARIANTS}, "bytecodes"
        bare_count = counts["bare Starlette"]
        print(f"| variant | {unit}/request | ratio to bare Starlette |")
        print("|---|---|---|")
        for name, count in counts.items():
            print(f"| {name} | {count:,.0f} | {bare_count / count:.2f} |")
        return
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
