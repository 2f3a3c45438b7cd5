"""A process killed with SIGKILL mid-flood loses nothing: the durable log resumes after a restart."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from ..conftest import POSTGRES_DSN
from .support import ROOT

pytestmark = pytest.mark.e2e


async def _pg_left(schema: str) -> list[tuple[str, int]]:
    connection = await asyncpg.connect(POSTGRES_DSN)
    try:
        rows = await connection.fetch(
            f'SELECT status, count(*) FROM "{schema}".tidings_deliveries GROUP BY status'
        )
        return [(row[0], row[1]) for row in rows]
    finally:
        await connection.close()


@pytest.mark.parametrize("log", ["sqlite", "postgres"])
def test_a_process_killed_mid_flood_loses_nothing_and_charges_each_order_once(
    log: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = {
        **os.environ,
        "FLOOD_LOG": str(tmp_path / "log.db"),
        "FLOOD_APP_DB": str(tmp_path / "app.db"),
        "FLOOD_HANDLED": str(tmp_path / "handled.txt"),
    }
    schema = ""
    if log == "postgres":
        schema = request.getfixturevalue("pg_schema")
        env |= {"FLOOD_PG_DSN": POSTGRES_DSN, "FLOOD_PG_SCHEMA": schema}
    kill_at = random.randrange(1_000, 10_001, 250)  # how many recorded events before the kill
    command = [sys.executable, "-m", "tests.e2e.apps.flood"]
    flood = subprocess.Popen([*command, "emit"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    confirmed = 0
    assert flood.stdout is not None
    try:
        for line in flood.stdout:  # the child prints a line per 250 events; faulthandler guards a hang
            if line.startswith("recorded "):
                confirmed = int(line.split()[1])
            if confirmed >= kill_at:
                break
    finally:
        flood.send_signal(signal.SIGKILL)
        flood.wait(timeout=30)
        flood.stdout.close()
    assert flood.returncode == -signal.SIGKILL
    assert confirmed >= kill_at, f"the flood ended before the kill point: {confirmed}"

    resumed = subprocess.run(
        [*command, "resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stdout.strip().endswith("idle")

    handled = collections.Counter(int(n) for n in (tmp_path / "handled.txt").read_text().split())
    with sqlite3.connect(tmp_path / "app.db") as db:
        charged = collections.Counter(n for (n,) in db.execute("SELECT n FROM charges"))
    if log == "postgres":
        left = asyncio.run(_pg_left(schema))
    else:
        with sqlite3.connect(tmp_path / "log.db") as log_db:
            left = log_db.execute(
                "SELECT status, count(*) FROM tidings_deliveries GROUP BY status"
            ).fetchall()
    durable = set(range(confirmed))
    assert durable <= set(handled), f"lost (never handled): {sorted(durable - set(handled))[:20]}"
    assert durable <= set(charged), f"never charged: {sorted(durable - set(charged))[:20]}"
    assert set(charged) == set(handled)  # every recorded event reached both handlers
    assert max(charged.values()) == 1, "an order was charged twice"
    assert left == []  # nothing pending, no dead letters
    print(f"killed at {confirmed} recorded; {sum(handled.values()) - len(handled)} at-least-once repeats")
