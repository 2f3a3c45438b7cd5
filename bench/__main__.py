"""Run the tidings benchmark suite: ``uv run --group bench python -m bench [--quick] [--only NAME]``.

In-process scenarios run in a ``bench.worker`` subprocess per scenario and variant, every system side
by side in it and timed in turns; the loopback scenario runs one uvicorn server process per system. Progress
goes to stderr; the Markdown table of medians, ratios and targets goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .apps import BARE_SYSTEMS, EVENT_SYSTEMS, LOOPBACK_SYSTEMS, POSTGRES_DSN, SYSTEMS
from .loopback import HTTP_IMPL, WRK, WrkResult, run_wrk, serve
from .report import Measurement, Results, build_rows, render_markdown

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .apps import SystemName

SCENARIOS: Final = ("emit", "requests", "burst", "wrk")
NOISY: Final = 0.10  # warn when a measurement's repeats spread over more than 10% of its median


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    loop: str
    emit_loop: int  # emits timed per emit-cost request
    emit_repeats: int  # emit-cost requests (samples) per system
    repeats: int  # repeats per worker of the requests and 1,000-event scenarios
    rounds: int  # workers per event count in the requests scenario (samples are pooled)
    repeat_seconds: float  # target length of one such repeat
    wrk_seconds: int  # length of one wrk run
    wrk_repeats: int  # wrk runs per system (after one short warm-up run)

    @classmethod
    def make(cls, *, quick: bool, loop: str) -> Settings:
        if quick:
            return cls(quick, loop, 10_000, 5, 3, 1, 0.1, 2, 1)
        return cls(quick, loop, 10_000, 15, 5, 3, 0.3, 5, 3)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _worker(
    settings: Settings,
    workdir: Path,
    scenario: str,
    systems: Sequence[SystemName],
    *,
    events: int = 0,
    sync_handler: bool = False,
) -> tuple[dict[str, list[float]], str]:
    """Run one worker process measuring ``systems`` side by side; their samples and the unit."""
    out = workdir / f"{scenario}-{events}-{int(sync_handler)}.json"
    repeats = settings.emit_repeats if scenario == "emit" else settings.repeats
    command = [
        sys.executable,
        "-m",
        "bench.worker",
        f"--scenario={scenario}",
        f"--systems={','.join(systems)}",
        f"--events={events}",
        f"--repeats={repeats}",
        f"--size={settings.emit_loop}",
        f"--repeat-seconds={settings.repeat_seconds}",
        f"--loop={settings.loop}",
        f"--out={out}",
    ]
    if sync_handler:
        command.append("--sync-handler")
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(command[2:])} failed:\n{done.stderr}")
    result = json.loads(out.read_text())
    samples: dict[str, list[float]] = result["samples"]
    unit: str = result["unit"]
    return samples, unit


def _record(results: Results, m: Measurement) -> None:
    results.add(m)
    note = f"  (repeats spread {m.spread:.0%})" if m.spread > NOISY else ""
    _log(f"  {m.scenario:<8} {m.system:<15} {m.variant:<9} median {m.median:,.3f} {m.unit}{note}")


def _event_systems() -> tuple[SystemName, ...]:
    """Every event system, less tidings-postgres when no PostgreSQL answers (said on stderr)."""
    global _POSTGRES_UP
    if _POSTGRES_UP is None:
        import asyncio

        import asyncpg

        async def probe() -> None:
            connection = await asyncpg.connect(POSTGRES_DSN, timeout=5)
            await connection.close()

        try:
            asyncio.run(probe())
            _POSTGRES_UP = True
        except (OSError, asyncpg.PostgresError) as exc:
            _log(f"no PostgreSQL at {POSTGRES_DSN} ({exc}): tidings-postgres is left out")
            _POSTGRES_UP = False
    return tuple(s for s in EVENT_SYSTEMS if _POSTGRES_UP or s != "tidings-postgres")


_POSTGRES_UP: bool | None = None


def run_emit(settings: Settings, workdir: Path, results: Results) -> None:
    _log(f"emit cost: {settings.emit_loop:,} emits per request, {settings.emit_repeats} requests")
    by_system, unit = _worker(settings, workdir, "emit", _event_systems())
    for system, samples in by_system.items():
        _record(results, Measurement("emit", _system(system), "", unit, samples))


def run_requests(settings: Settings, workdir: Path, results: Results) -> None:
    _log(
        f"in-process ASGI requests: {settings.rounds} round(s) of a worker per event count, "
        f"{settings.repeats} repeats of ~{settings.repeat_seconds}s each"
    )
    # Every worker measures the bare frameworks too, so that each ratio compares samples taken in
    # turns in the same processes; rounds of fresh processes pool more of them.
    systems = (*BARE_SYSTEMS, *_event_systems())
    pooled: dict[tuple[str, str], list[float]] = {}
    unit = ""
    for round_ in range(settings.rounds):
        _log(f"  round {round_ + 1}/{settings.rounds}")
        for events in (0, 1, 10):
            by_system, unit = _worker(settings, workdir, "requests", systems, events=events)
            for system, samples in by_system.items():
                pooled.setdefault((system, str(events)), []).extend(samples)
    for (system, variant), samples in pooled.items():
        _record(results, Measurement("requests", _system(system), variant, unit, samples))


def run_burst(settings: Settings, workdir: Path, results: Results) -> None:
    _log(f"1,000 events in one request: {settings.repeats} repeats of ~{settings.repeat_seconds}s")
    for sync_handler in (False, True):
        by_system, unit = _worker(
            settings, workdir, "burst", _event_systems(), events=1000, sync_handler=sync_handler
        )
        variant = "sync" if sync_handler else "async"
        for system, samples in by_system.items():
            _record(results, Measurement("burst", _system(system), variant, unit, samples))


def _system(name: str) -> SystemName:
    if name not in SYSTEMS:
        raise RuntimeError(f"a worker reported an unknown system {name!r}")
    return name


def run_loopback(settings: Settings, workdir: Path, results: Results) -> None:
    if not os.access(WRK, os.X_OK):
        _log(f"{WRK} is not installed (apt-get install wrk): the uvicorn + wrk scenario is left out")
        return
    _log(
        f"uvicorn (loop {settings.loop}, http {HTTP_IMPL}) + wrk -t1 -c16 -d{settings.wrk_seconds}s, "
        f"{settings.wrk_repeats} round(s) of every system after a 1s warm-up each"
    )
    runs: dict[SystemName, list[WrkResult]] = {system: [] for system in LOOPBACK_SYSTEMS}
    with contextlib.ExitStack() as servers:
        urls: dict[SystemName, str] = {}
        for system in LOOPBACK_SYSTEMS:
            log = workdir / f"uvicorn-{system}.log"
            try:
                urls[system] = servers.enter_context(serve(system, events=1, loop=settings.loop, log=log))
                run_wrk(urls[system], duration_s=1)  # warm-up
            except Exception:
                _log(f"uvicorn log for {system}:\n{log.read_text() if log.exists() else '(none)'}")
                raise
        # Every server waits, idle, while another is loaded: rounds interleave the systems in time,
        # so drift on a shared machine hits every system alike (as the in-process rounds do).
        for round_ in range(settings.wrk_repeats):
            _log(f"  round {round_ + 1}/{settings.wrk_repeats}")
            for system, url in urls.items():
                runs[system].append(run_wrk(url, duration_s=settings.wrk_seconds))
    for system, system_runs in runs.items():
        for variant, unit, samples in (
            ("rps", "req/s", [r.requests_per_s for r in system_runs]),
            ("p50", "ms", [r.p50_ms for r in system_runs]),
            ("p99", "ms", [r.p99_ms for r in system_runs]),
        ):
            _record(results, Measurement("wrk", system, variant, unit, samples))


RUNNERS: Final = {"emit": run_emit, "requests": run_requests, "burst": run_burst, "wrk": run_loopback}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats (a smoke run)")
    parser.add_argument("--only", choices=SCENARIOS, help="run only this scenario")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample and row here")
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="event loop for every system, in-process and under uvicorn (default: asyncio)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    settings = Settings.make(quick=args.quick, loop=args.loop)
    results = Results()
    started = time.monotonic()
    # Workers and uvicorn import ``bench`` from the repository root, whatever the caller's directory.
    root = Path(__file__).resolve().parent.parent
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    ran = [name for name in SCENARIOS if args.only is None or args.only == name]
    with tempfile.TemporaryDirectory(prefix="tidings-bench-") as tmp:
        for name in ran:
            RUNNERS[name](settings, Path(tmp), results)
    elapsed = time.monotonic() - started
    rows = build_rows(results)
    method = {
        "emit": f"{settings.emit_repeats} emit-cost requests",
        "requests": f"{settings.repeats} repeats in each of {settings.rounds} process(es) for requests/s",
        "burst": f"{settings.repeats} repeats for 1,000 events",
        "wrk": f"{settings.wrk_repeats} wrk run(s) of {settings.wrk_seconds}s",
    }
    footer = (
        "Medians of: " + "; ".join(method[name] for name in SCENARIOS if name in ran) + ". "
        f"Python {platform.python_version()}, loop {settings.loop}, uvicorn http {HTTP_IMPL}, "
        f"{os.cpu_count()} CPUs{', --quick' if settings.quick else ''}; took {elapsed:.0f}s."
    )
    print(render_markdown(rows))
    print()
    print(footer)
    if args.json is not None:
        payload = {
            "settings": asdict(settings),
            "python": platform.python_version(),
            "elapsed_s": elapsed,
            "measurements": [
                {**asdict(m), "median": m.median, "spread": m.spread} for m in results.measurements.values()
            ],
            "rows": [{**asdict(row), "met": row.met} for row in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        _log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
