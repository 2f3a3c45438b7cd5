"""Two processes on one PostgreSQL log never run the same delivery: each runs exactly once."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tidings import Event
from tidings._core.bus import _CLAIM_BATCH
from tidings.store.postgres import PostgresStore

from ..conftest import POSTGRES_DSN
from .support import ROOT

pytestmark = pytest.mark.e2e

# A batch for each relay, claimed at the same moment (both connected, then both started): FOR UPDATE
# SKIP LOCKED must keep the two claims apart. Without it, a delivery ran twice in 20 runs of 20 (and
# in 2 of 10 runs of the former version: 2,000 deliveries, the relays started one after the other,
# each claiming again after its relay's 5 s interval).
DELIVERIES = 2 * _CLAIM_BATCH


async def _record_backlog(schema: str) -> None:
    store = PostgresStore(POSTGRES_DSN, schema=schema)
    await store.open()
    events = [Event("job", {"n": n}) for n in range(DELIVERIES)]
    await store.record([(event, "jobs.run") for event in events], lease=0)  # claimable at once
    await store.aclose()


def test_two_relays_share_a_backlog_without_running_a_delivery_twice(pg_schema: str, tmp_path: Path) -> None:
    asyncio.run(_record_backlog(pg_schema))
    runs_file = tmp_path / "runs.txt"
    env = {**os.environ, "RELAY_DSN": POSTGRES_DSN, "RELAY_SCHEMA": pg_schema, "RELAY_RUNS": str(runs_file)}
    relays = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.apps.relay"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        # both imported, then both go: they claim at the same moment, not one after the other
        for relay in relays:
            assert relay.stdout is not None
            if relay.stdout.readline().strip() != "ready":
                pytest.fail(f"a relay did not start:\n{relay.communicate(timeout=30)[1][-4000:]}")
        for relay in relays:
            assert relay.stdin is not None
            relay.stdin.write("go\n")
            relay.stdin.flush()
        outputs = [relay.communicate(timeout=180) for relay in relays]
    finally:
        for relay in relays:
            if relay.poll() is None:
                relay.kill()
                relay.communicate()
    for relay, (out, err) in zip(relays, outputs, strict=True):
        assert relay.returncode == 0, err[-4000:]
        assert out.strip() == "idle"
    runs = [line.split() for line in runs_file.read_text().splitlines()]
    per_delivery = collections.Counter(n for _, n in runs)
    assert len(per_delivery) == DELIVERIES
    assert max(per_delivery.values()) == 1, "a delivery ran twice"
    per_process = collections.Counter(pid for pid, _ in runs)
    assert len(per_process) == 2, f"one process did all the work: {per_process}"
