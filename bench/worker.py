"""One scenario's measurement in a fresh interpreter: ``python -m bench.worker ...``.

The orchestrator (``python -m bench``) starts one worker per scenario and variant (event count,
handler kind). A worker builds the app of every system it is given, side by side in one process
and on one event loop, runs their lifespans, warms each up, then times the systems in turns: every
repeat measures each system once, in an order that rotates from one repeat to the next. A busy
neighbour or a machine that changes speed then slows every system alike, which separate processes
measured one after another cannot promise (their samples land seconds or minutes apart). It
writes the raw samples, per system, as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from typing import Literal

from .apps import (
    BARE_SYSTEMS,
    EMIT_SAMPLES,
    POSTGRES_DSN,
    POSTGRES_SCHEMA,
    SYSTEMS,
    AppSpec,
    SystemName,
    Tally,
    build_app,
    settle,
)
from .harness import Lifespan, RequestDriver

_WARMUP_REQUESTS = 300

ScenarioName = Literal["emit", "requests", "burst"]
LoopName = Literal["asyncio", "uvloop"]


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    scenario: ScenarioName
    systems: tuple[SystemName, ...]
    events: int
    sync_handler: bool
    repeats: int
    size: int
    repeat_seconds: float
    loop: LoopName


@dataclass(frozen=True, slots=True)
class WorkerResult:
    """Raw samples of each system, one per repeat, in ``unit``."""

    samples: dict[str, list[float]]
    unit: str
    handler_calls: int


@dataclass(frozen=True, slots=True)
class _System:
    """One system's app, ready for requests; ``events`` is the handler calls each request makes."""

    name: SystemName
    driver: RequestDriver
    events: int
    tally: Tally

    async def run(self, requests: int) -> None:
        """Send ``requests`` requests and return once every handler call they make has run.

        Raises:
            RuntimeError: more handler calls ran than the requests' events (a call ran twice, or
                one that is not these requests').
        """
        expected = self.tally.count + requests * self.events
        await self.driver.run(requests)
        await self.tally.wait_for(expected)
        await settle(self.name)
        if self.tally.count != expected:
            raise RuntimeError(f"{self.name}: {self.tally.count} handler calls, {expected} expected")


@contextlib.asynccontextmanager
async def _started(
    systems: tuple[SystemName, ...], spec: AppSpec, events: int
) -> AsyncIterator[list[_System]]:
    """Every system's app for ``spec``, its lifespan running for the duration of the block."""
    if "tidings-postgres" in systems:
        await _drop_postgres_log()
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for name in systems:
            tally = Tally()  # its own: a call of another system's can never count as one of its
            app = build_app(name, dataclasses.replace(spec, tally=tally))
            state = await stack.enter_async_context(Lifespan(app))
            per_request = 0 if name in BARE_SYSTEMS else events
            started.append(_System(name, RequestDriver(app, state), per_request, tally))
        yield started


async def _drop_postgres_log() -> None:
    """Start from an empty log: an interrupted run's deliveries would be run again by the relay."""
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_DSN)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{POSTGRES_SCHEMA}" CASCADE')
    finally:
        await connection.close()


def _shuffled(systems: list[_System], turn: int) -> list[_System]:
    """``systems`` in another order each turn (the same orders every run): no system is always
    timed right after the same other one, nor always in the same place."""
    order = list(systems)
    random.Random(turn).shuffle(order)
    return order


async def _in_turns(
    systems: list[_System], repeats: int, sample: Callable[[_System], Awaitable[float]]
) -> dict[str, list[float]]:
    """``repeats`` samples of each system, taken one system after another, in a new order each turn."""
    samples: dict[str, list[float]] = {system.name: [] for system in systems}
    for turn in range(repeats):
        for system in _shuffled(systems, turn):
            gc.collect()
            samples[system.name].append(await sample(system))
    return samples


async def _emit_cost(args: WorkerArgs) -> WorkerResult:
    """µs per emit call: each request times ``size`` emits in a tight loop, minus the empty loop."""
    async with _started(args.systems, AppSpec(emit_loop=args.size), args.size) as systems:

        async def sample(system: _System) -> float:
            taken = len(EMIT_SAMPLES)
            await system.run(1)  # let every handler run before the next request
            if len(EMIT_SAMPLES) != taken + 1:
                raise RuntimeError(f"{system.name}'s request timed no emits (a bare framework?)")
            return EMIT_SAMPLES[-1]

        await _in_turns(systems, 2, sample)  # two warm-up requests each
        samples = await _in_turns(systems, args.repeats, sample)
    return WorkerResult(samples=samples, unit="us/emit", handler_calls=_calls(systems))


async def _requests(args: WorkerArgs) -> WorkerResult:
    """µs per request: requests back to back; the clock stops when every handler has run.

    A repeat is as many requests as fit in about ``repeat_seconds`` (calibrated, for each system,
    after a warm-up).
    """
    async with _started(args.systems, AppSpec(events=args.events), args.events) as systems:

        async def timed(system: _System, requests: int) -> float:
            start = perf_counter()
            await system.run(requests)
            return (perf_counter() - start) / requests

        sizes: dict[str, int] = {}
        for system in systems:
            await timed(system, _WARMUP_REQUESTS)
            per_request = await timed(system, _WARMUP_REQUESTS)
            sizes[system.name] = _clamp(args.repeat_seconds / per_request, 100, 500_000)

        async def sample(system: _System) -> float:
            return await timed(system, sizes[system.name]) * 1e6

        samples = await _in_turns(systems, args.repeats, sample)
    return WorkerResult(samples=samples, unit="us/request", handler_calls=_calls(systems))


async def _burst(args: WorkerArgs) -> WorkerResult:
    """Events per second: requests that emit ``events`` each, timed until all their handlers ran.

    Each request is waited for (all its handler calls counted) before the next is sent; a repeat is as
    many requests as fit in about ``repeat_seconds``.
    """
    spec = AppSpec(events=args.events, sync_handler=args.sync_handler)
    async with _started(args.systems, spec, args.events) as systems:

        async def timed(system: _System, requests: int) -> float:
            start = perf_counter()
            for _ in range(requests):
                await system.run(1)
            return (perf_counter() - start) / requests

        sizes: dict[str, int] = {}
        for system in systems:
            await timed(system, 1)
            sizes[system.name] = _clamp(args.repeat_seconds / await timed(system, 1), 2, 10_000)

        async def sample(system: _System) -> float:
            return args.events / await timed(system, sizes[system.name])

        samples = await _in_turns(systems, args.repeats, sample)
    return WorkerResult(samples=samples, unit="events/s", handler_calls=_calls(systems))


def _calls(systems: list[_System]) -> int:
    return sum(system.tally.count for system in systems)


def _clamp(value: float, low: int, high: int) -> int:
    return max(low, min(high, int(value)))


def _loop_factory(loop: LoopName) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if loop == "uvloop":
        factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module("uvloop").new_event_loop
        return factory
    return None


def run(args: WorkerArgs) -> WorkerResult:
    """Run one scenario's measurement on a new event loop of the requested kind."""
    if len(set(args.systems)) != len(args.systems):
        # handlers register on module-level registries (fastapi-events): a second app would double them
        raise ValueError(f"each system at most once per process, got {args.systems}")
    scenario = {"emit": _emit_cost, "requests": _requests, "burst": _burst}[args.scenario]
    with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
        return runner.run(scenario(args))


def _systems(value: str) -> tuple[SystemName, ...]:
    names = tuple(value.split(","))
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown system(s) {unknown}; known: {', '.join(SYSTEMS)}")
    return names  # type: ignore[return-value]  # checked against SYSTEMS above


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    parser.add_argument("--scenario", choices=["emit", "requests", "burst"], required=True)
    parser.add_argument(
        "--systems", type=_systems, required=True, help="comma-separated, e.g. starlette,tidings"
    )
    parser.add_argument("--events", type=int, default=0, help="events per request")
    parser.add_argument("--sync-handler", action="store_true", help="register a plain def handler")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=10_000, help="emits per emit-cost request")
    parser.add_argument("--repeat-seconds", type=float, default=0.3, help="length of one repeat")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    ns = parser.parse_args(argv)
    args = WorkerArgs(
        scenario=ns.scenario,
        systems=ns.systems,
        events=ns.events,
        sync_handler=ns.sync_handler,
        repeats=ns.repeats,
        size=ns.size,
        repeat_seconds=ns.repeat_seconds,
        loop=ns.loop,
    )
    ns.out.write_text(json.dumps(asdict(run(args))))


if __name__ == "__main__":
    main()
