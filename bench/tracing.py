"""What OpenTelemetry tracing costs tidings: ``python -m bench.tracing [--quick] [--loop uvloop]``.

Three set-ups of one Starlette app (``GET /`` emits N events to a no-op handler), each measured in
fresh worker processes (``python -m bench.tracing --worker ...``):

* ``off``: no OpenTelemetry anywhere, ``EventBus()``: what every tidings app without tracing runs.
* ``app``: the app is traced (an SDK tracer provider set globally, a server span around every
  request, as OpenTelemetry's ASGI instrumentation makes) but ``EventBus(tracing=False)``.
* ``on``: the same traced app with ``EventBus()``, which finds the provider and traces: a span per
  handler call, the request's context in every event's headers.

The provider's span processor is a ``SimpleSpanProcessor`` over an exporter that drops the spans:
every span is built, ended and handed to the exporter in line, with no I/O and no background
thread, so the figures are the CPU cost of the spans themselves. ``on`` minus ``app`` is what
tidings' tracing adds; ``off`` against the main benchmark's emit figure shows that tracing being
available costs nothing when it is off. The Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from time import perf_counter, perf_counter_ns
from typing import TYPE_CHECKING, Any, Final, Literal

from ._types import ASGIApp, Receive, Scope, Send
from .harness import Lifespan, RequestDriver

if TYPE_CHECKING:
    from tidings import EventBus

Variant = Literal["off", "app", "on"]
VARIANTS: Final[tuple[Variant, ...]] = ("off", "app", "on")
TITLES: Final[dict[Variant, str]] = {
    "off": "no OpenTelemetry",
    "app": "app traced, tidings tracing off",
    "on": "app traced, tidings tracing on",
}
# (scenario, events per request, sync handler), with a row title each
CASES: Final[tuple[tuple[str, int, bool, str], ...]] = (
    ("emit", 0, False, "emit cost in a request, µs per emit call"),
    ("requests", 0, False, "µs per request, 0 events"),
    ("requests", 1, False, "µs per request, 1 event, async handler"),
    ("requests", 10, False, "µs per request, 10 events, async handler"),
    ("requests", 1, True, "µs per request, 1 event, sync handler"),
)
EVENT: Final = "bench.event"
PAYLOAD: Final = {"id": 1}
_WARMUP_REQUESTS: Final = 300


# -- the worker: one (variant, case) in this process ------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def hit(self) -> None:
        self.count += 1  # a sync handler's thread: one job's sync calls run one at a time


class _RequestSpans:
    """A server span around every HTTP request, current while the app runs (like the ASGI instrumentation)."""

    def __init__(self, app: ASGIApp) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        self.app = app
        self.tracer = trace.get_tracer("bench.requests")
        self.kind = SpanKind.SERVER

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span(f"{scope['method']} {scope['path']}", kind=self.kind):
            await self.app(scope, receive, send)


def _install_provider() -> None:
    from collections.abc import Sequence

    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class DropSpans(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(DropSpans()))
    trace.set_tracer_provider(provider)


def _build(
    variant: Variant, events: int, sync: bool, emit_loop: int, counter: _Counter, samples: list[float]
) -> tuple[ASGIApp, EventBus]:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from tidings import Event, EventBus, TidingsMiddleware, emit

    if variant != "off":
        _install_provider()
    bus = EventBus(tracing=False) if variant == "app" else EventBus()

    if sync:

        @bus.on(EVENT)
        def on_event_sync(event: Event) -> None:
            counter.hit()

    else:

        @bus.on(EVENT)
        async def on_event(event: Event) -> None:
            counter.hit()

    async def index(request: Request) -> PlainTextResponse:
        name, payload = EVENT, PAYLOAD
        if emit_loop:
            t0 = perf_counter_ns()
            for _ in range(emit_loop):
                pass
            t1 = perf_counter_ns()
            for _ in range(emit_loop):
                emit(name, payload)
            t2 = perf_counter_ns()
            samples.append(((t2 - t1) - (t1 - t0)) / emit_loop / 1000)
        else:
            for _ in range(events):
                emit(name, payload)
        return PlainTextResponse("ok")

    app: ASGIApp = Starlette(routes=[Route("/", index)], middleware=[Middleware(TidingsMiddleware, bus=bus)])
    if variant != "off":
        app = _RequestSpans(app)
    return app, bus


async def _worker(args: argparse.Namespace) -> dict[str, Any]:
    variant: Variant = args.variant
    counter = _Counter()
    emit_samples: list[float] = []
    emit_loop = args.size if args.scenario == "emit" else 0
    app, bus = _build(variant, args.events, args.sync_handler, emit_loop, counter, emit_samples)
    expected = 0
    samples: list[float] = []
    async with Lifespan(app) as state:
        tracing_on = bus.tracing is not None
        if tracing_on != (variant == "on"):
            raise RuntimeError(f"variant {variant}: bus.tracing is {bus.tracing!r}")
        if variant == "off" and any(name.startswith("opentelemetry") for name in sys.modules):
            raise RuntimeError("variant off: something imported OpenTelemetry")
        driver = RequestDriver(app, state)
        if args.scenario == "emit":
            for _ in range(2 + args.repeats):  # two warm-up requests
                gc.collect()
                await driver.run(1)
            samples = emit_samples[2:]
            expected = driver.responses * args.size
        else:

            async def timed(n: int) -> float:
                start = perf_counter()
                await driver.run(n)  # handlers run in each request's task: done when it returns
                return (perf_counter() - start) / n

            await timed(_WARMUP_REQUESTS)
            size = max(100, min(500_000, int(args.repeat_seconds / await timed(_WARMUP_REQUESTS))))
            for _ in range(args.repeats):
                gc.collect()
                samples.append(await timed(size) * 1e6)
            expected = driver.responses * args.events
    if counter.count != expected:
        raise RuntimeError(f"{counter.count} handler calls for {expected} events")
    unit = "us/emit" if args.scenario == "emit" else "us/request"
    return {"samples": samples, "unit": unit, "handler_calls": counter.count}


def _run_worker(args: argparse.Namespace) -> None:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.loop == "uvloop":
        factory = importlib.import_module("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(_worker(args))
    Path(args.out).write_text(json.dumps(result))


# -- the orchestrator ------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _spawn(
    variant: Variant, scenario: str, events: int, sync: bool, args: argparse.Namespace, out: Path
) -> list[float]:
    command = [
        sys.executable,
        "-m",
        "bench.tracing",
        "--worker",
        f"--variant={variant}",
        f"--scenario={scenario}",
        f"--events={events}",
        f"--repeats={args.repeats}",
        f"--size={args.size}",
        f"--repeat-seconds={args.repeat_seconds}",
        f"--loop={args.loop}",
        f"--out={out}",
    ]
    if sync:
        command.append("--sync-handler")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(command[2:])} failed:\n{done.stderr}")
    samples: list[float] = json.loads(out.read_text())["samples"]
    return samples


def _table(medians: dict[tuple[int, Variant], float]) -> str:
    header = ["Figure", *(TITLES[v] for v in VARIANTS), "tidings' tracing adds (on - app)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for index, (scenario, _, _, title) in enumerate(CASES):
        digits = 3 if scenario == "emit" else 2
        cells = [f"{medians[(index, v)]:.{digits}f}" for v in VARIANTS]
        added = medians[(index, "on")] - medians[(index, "app")]
        lines.append("| " + " | ".join([title, *cells, f"{added:+.{digits}f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats (a smoke run)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample here")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=["emit", "requests"], help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sync-handler", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=10_000, help=argparse.SUPPRESS)
    parser.add_argument("--repeat-seconds", type=float, default=0.3, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _run_worker(args)
        return
    rounds = 1 if args.quick else 3
    args.repeats = 3 if args.quick else 5
    args.repeat_seconds = 0.1 if args.quick else 0.3
    root = Path(__file__).resolve().parent.parent
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    started = time.monotonic()
    pooled: dict[tuple[int, Variant], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tidings-bench-tracing-") as tmp:
        for round_ in range(rounds):  # rounds interleave the variants, so drift hits them alike
            _log(f"round {round_ + 1}/{rounds}")
            for index, (scenario, events, sync, title) in enumerate(CASES):
                for variant in VARIANTS:
                    out = Path(tmp) / f"{index}-{variant}.json"
                    samples = _spawn(variant, scenario, events, sync, args, out)
                    pooled.setdefault((index, variant), []).extend(samples)
                    _log(f"  {title:<45} {variant:<4} median {statistics.median(samples):,.3f}")
    medians = {key: statistics.median(samples) for key, samples in pooled.items()}
    print(_table(medians))
    print()
    print(
        f"Medians of {args.repeats} repeats in each of {rounds} process(es) per figure. Python "
        f"{platform.python_version()}, loop {args.loop}, {os.cpu_count()} CPUs"
        f"{', --quick' if args.quick else ''}; took {time.monotonic() - started:.0f}s."
    )
    if args.json is not None:
        rows = [
            {
                "figure": CASES[index][3],
                "variant": variant,
                "samples": samples,
                "median": medians[(index, variant)],
            }
            for (index, variant), samples in pooled.items()
        ]
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
