"""The benchmark stays runnable: each in-process scenario's worker, and the report built from it.

The figures themselves are not checked here (they are for ``python -m bench`` on a quiet machine,
never timed assertions in tests); what is checked is that a worker measures every system it is
given, in one process, and that the table compares each event count with the bare frameworks
measured beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import TIMES, Measurement, Results, build_rows

from ..conftest import POSTGRES_DSN

ROOT = Path(__file__).resolve().parents[2]


def _worker(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "bench.worker", f"--out={out}", "--repeats=2", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("scenario", "systems", "extra"),
    [
        ("emit", "tidings,tidings-sqlite,fastapi-events,litestar", ["--size=200"]),
        (
            "requests",
            "starlette,litestar-bare,tidings,tidings-sqlite,fastapi-events,litestar",
            ["--events=1"],
        ),
        ("burst", "tidings,fastapi-events,litestar", ["--events=50", "--sync-handler"]),
    ],
)
def test_a_worker_measures_every_system_it_is_given_in_one_process(
    tmp_path: Path, scenario: str, systems: str, extra: list[str]
) -> None:
    timing = "--repeat-seconds=0.01"
    done = _worker(tmp_path, f"--scenario={scenario}", f"--systems={systems}", timing, *extra)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert list(result["samples"]) == systems.split(",")  # each system, in the order given
    for system, samples in result["samples"].items():
        assert len(samples) == 2, system
        assert all(sample > 0 for sample in samples), system
    assert result["unit"] == {"emit": "us/emit", "requests": "us/request", "burst": "events/s"}[scenario]
    assert result["handler_calls"] > 0


def test_the_postgres_log_runs_beside_the_others(tmp_path: Path, pg_schema: str) -> None:
    # the worker drops the schema first (an interrupted run's deliveries would run, and count, again)
    env = {"TIDINGS_BENCH_POSTGRES": POSTGRES_DSN, "TIDINGS_BENCH_POSTGRES_SCHEMA": pg_schema}
    systems = "starlette,tidings,tidings-postgres"
    done = _worker(
        tmp_path,
        "--scenario=requests",
        f"--systems={systems}",
        "--events=1",
        "--repeat-seconds=0.01",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert list(result["samples"]) == systems.split(",")


def test_a_worker_refuses_a_system_twice(tmp_path: Path) -> None:
    # a second fastapi-events app would add its handler to the module-level registry again
    done = _worker(tmp_path, "--scenario=requests", "--systems=fastapi-events,fastapi-events")
    assert done.returncode != 0
    assert "each system at most once per process" in done.stderr


def test_a_worker_refuses_an_unknown_system(tmp_path: Path) -> None:
    done = _worker(tmp_path, "--scenario=requests", "--systems=starlette,flask")
    assert done.returncode != 0
    assert "unknown system(s) ['flask']" in done.stderr


def test_the_emit_scenario_refuses_a_bare_framework(tmp_path: Path) -> None:
    done = _worker(tmp_path, "--scenario=emit", "--systems=tidings,starlette", "--size=10")
    assert done.returncode != 0
    assert "starlette's request timed no emits" in done.stderr


def test_each_event_count_is_compared_turn_by_turn_with_the_bare_figures_measured_beside_it() -> None:
    results = Results()
    # µs per request, one sample per turn; in the second turn of the 1-event worker the machine
    # was slow while bare Starlette ran, and fast again for tidings: the medians (12.0 and 8.0)
    # would make tidings 1.5x bare Starlette, the turns say 0.75x
    for system, variant, samples in [
        ("starlette", "0", [6.0, 6.0, 6.0]),
        ("tidings", "0", [6.5, 6.4, 6.6]),
        ("starlette", "1", [6.0, 12.0, 12.0]),
        ("tidings", "1", [8.0, 8.0, 16.0]),
        ("litestar-bare", "1", [16.0, 16.0, 16.0]),
        ("litestar", "1", [32.0, 32.0, 32.0]),
    ]:
        results.add(Measurement("requests", system, variant, "us/request", samples))  # type: ignore[arg-type]
    rows = {row.metric: row for row in build_rows(results)}
    one = rows[f"req/s (1 event/request; {TIMES} bare Starlette, per turn)"]
    assert one.cells["tidings"] == f"125,000 (0.75{TIMES})"  # req/s from the median; ratio per turn
    assert one.cells["starlette"] == f"83,333 (1.00{TIMES})"
    assert one.met is True  # 0.75 >= 0.75
    none = rows["middleware cost with no events, µs/request over its bare framework (per turn)"]
    assert none.values == {"tidings": pytest.approx(0.5)}
    assert f"req/s (10 events/request; {TIMES} bare Starlette, per turn)" not in rows  # not measured
