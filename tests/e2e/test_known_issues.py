"""Problems in tidings these tests found, pinned as strict xfails.

Each test states what tidings promises and fails because it does not happen yet; ``strict=True``
turns the fix into a failure ("XPASS(strict)"), which is the cue to drop the marker. Each expects
its failure as an ``AssertionError``, so a test that breaks for another reason (a timeout while
setting up, say) is still reported as a failure.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest

from .support import POLL, serve

pytestmark = pytest.mark.anyio


async def exited_within(process: subprocess.Popen[bytes], seconds: float) -> bool:
    with anyio.move_on_after(seconds):
        while process.poll() is None:  # noqa: ASYNC110 - a child process offers nothing to await
            await anyio.sleep(POLL)
    return process.poll() is not None


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="the drain bound never applies to handlers of request events under uvicorn: they run in "
    "the request's task, which uvicorn's graceful shutdown waits for (with no limit by default) "
    "before it sends lifespan.shutdown, where tidings' drain starts",
)
@pytest.mark.e2e
async def test_sigterm_exits_within_the_drain_bound_when_a_request_events_handler_hangs(
    tmp_path: Path,
) -> None:
    with serve("tests.e2e.apps.hang:app", tmp_path) as server:  # drain_timeout=0.5, no handler_timeout
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            (await client.post("/stuck/in-request")).raise_for_status()
        await server.wait_for_record("hanging on in-request")

        server.send_signal(signal.SIGTERM)
        await server.wait_for_log("Shutting down")
        # 6 times the bound; in fact uvicorn logs "Waiting for background tasks to complete" and
        # waits forever (with the default handler_timeout, until that cancels the call after 30 s).
        assert await exited_within(server.process, 3.0), server.describe()
