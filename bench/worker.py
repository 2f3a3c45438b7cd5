"""One in-process measurement in a fresh interpreter: ``python -m bench.worker ...``.

The orchestrator (``python -m bench``) starts one worker per scenario, system and variant, so no
measurement inherits another's imports, caches, threads or garbage. A worker builds one app, runs its
lifespan, warms up, times ``--repeats`` repeats and writes the raw samples as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from typing import Literal

from .apps import EMIT_SAMPLES, SYSTEMS, TALLY, AppSpec, SystemName, build_app, settle
from .harness import Lifespan, RequestDriver

_WARMUP_REQUESTS = 300

ScenarioName = Literal["emit", "requests", "burst"]
LoopName = Literal["asyncio", "uvloop"]


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    scenario: ScenarioName
    system: SystemName
    events: int
    sync_handler: bool
    repeats: int
    size: int
    repeat_seconds: float
    loop: LoopName


@dataclass(frozen=True, slots=True)
class WorkerResult:
    """Raw samples, one per repeat, in ``unit``."""

    samples: list[float]
    unit: str
    handler_calls: int


async def _emit_cost(args: WorkerArgs) -> WorkerResult:
    """µs per emit call: each request times ``size`` emits in a tight loop, minus the empty loop."""
    app = build_app(args.system, AppSpec(emit_loop=args.size))
    async with Lifespan(app) as state:
        driver = RequestDriver(app, state)
        for _ in range(2 + args.repeats):  # two warm-up requests, then one sample per request
            gc.collect()
            await driver.run(1)
            await TALLY.wait_for(driver.responses * args.size)  # let every handler run before the next
            await settle()
    return WorkerResult(samples=EMIT_SAMPLES[2:], unit="us/emit", handler_calls=TALLY.count)


async def _requests(args: WorkerArgs) -> WorkerResult:
    """µs per request: requests back to back; the clock stops when every handler has run.

    A repeat is as many requests as fit in about ``repeat_seconds`` (calibrated after a warm-up).
    """
    app = build_app(args.system, AppSpec(events=args.events))
    per_request = 0 if args.system in ("starlette", "litestar-bare") else args.events
    samples: list[float] = []
    async with Lifespan(app) as state:
        driver = RequestDriver(app, state)

        async def timed(n: int) -> float:
            start = perf_counter()
            await driver.run(n)
            await TALLY.wait_for(driver.responses * per_request)
            await settle()
            return (perf_counter() - start) / n

        await timed(_WARMUP_REQUESTS)
        size = _clamp(args.repeat_seconds / await timed(_WARMUP_REQUESTS), 100, 500_000)
        for _ in range(args.repeats):
            gc.collect()
            samples.append(await timed(size) * 1e6)
    return WorkerResult(samples=samples, unit="us/request", handler_calls=TALLY.count)


async def _burst(args: WorkerArgs) -> WorkerResult:
    """Events per second: requests that emit ``events`` each, timed until all their handlers ran.

    Each request is waited for (all its handler calls counted) before the next is sent; a repeat is as
    many requests as fit in about ``repeat_seconds``.
    """
    app = build_app(args.system, AppSpec(events=args.events, sync_handler=args.sync_handler))
    samples: list[float] = []
    async with Lifespan(app) as state:
        driver = RequestDriver(app, state)

        async def timed(n: int) -> float:
            start = perf_counter()
            for _ in range(n):
                await driver.run(1)
                await TALLY.wait_for(driver.responses * args.events)
                await settle()
            return (perf_counter() - start) / n

        await timed(1)
        size = _clamp(args.repeat_seconds / await timed(1), 2, 10_000)
        for _ in range(args.repeats):
            gc.collect()
            samples.append(args.events / await timed(size))
    return WorkerResult(samples=samples, unit="events/s", handler_calls=TALLY.count)


def _clamp(value: float, low: int, high: int) -> int:
    return max(low, min(high, int(value)))


def _loop_factory(loop: LoopName) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if loop == "uvloop":
        factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module("uvloop").new_event_loop
        return factory
    return None


def run(args: WorkerArgs) -> WorkerResult:
    """Run one measurement on a new event loop of the requested kind."""
    scenario = {"emit": _emit_cost, "requests": _requests, "burst": _burst}[args.scenario]
    with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
        return runner.run(scenario(args))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    parser.add_argument("--scenario", choices=["emit", "requests", "burst"], required=True)
    parser.add_argument("--system", choices=SYSTEMS, required=True)
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
        system=ns.system,
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
