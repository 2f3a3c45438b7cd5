"""SIGTERM on a real uvicorn: pending handler work is drained before the app's shutdown code, and the
drain bound stops a handler that never returns.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest

from .support import POLL, index_of, serve

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

EXITED_ON_SIGTERM = (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled once it is done


async def exited_within(process: subprocess.Popen[bytes], seconds: float) -> bool:
    with anyio.move_on_after(seconds):
        while process.poll() is None:  # noqa: ASYNC110 - a child process offers nothing to await
            await anyio.sleep(POLL)
    return process.poll() is not None


async def test_sigterm_drains_every_event_before_the_lifespan_shutdown_code(tmp_path: Path) -> None:
    with serve("tests.e2e.apps.drain:app", tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            # Two events from a request (handled in the request's task after its response) and two
            # from a task the lifespan started (handled in a job of the bus). Each first event's
            # handler blocks on its gate; each second event is pending behind it.
            assert (await client.post("/work/req", params={"n": 2})).status_code == 200
            assert (await client.post("/enqueue/bg", params={"n": 2})).status_code == 200
        await server.wait_for_record("start req/0")
        await server.wait_for_record("start bg/0")

        server.send_signal(signal.SIGTERM)
        await server.wait_for_log("Shutting down")
        # uvicorn itself waits for the request's task, so let that work finish first ...
        server.open_gate("req")
        # ... after which uvicorn starts the lifespan shutdown, and tidings drains before the app's
        # shutdown code runs: the "bg" work is still blocked, so that code cannot have run yet.
        await server.wait_for_log("Waiting for application shutdown.")
        assert not any(line.startswith("lifespan shutdown") for line in server.record), server.describe()
        assert "start bg/1" not in server.record
        server.open_gate("bg")
        assert await server.wait_exit() in EXITED_ON_SIGTERM

        lines = server.record
        shutdown = index_of(lines, "lifespan shutdown db=open")
        for tag in ("req", "bg"):
            for i in (0, 1):
                started = index_of(lines, f"start {tag}/{i}")
                done = index_of(lines, f"done {tag}/{i} db=open")
                follow_up = index_of(lines, f"follow-up {tag}/{i} db=open")  # chained, during the drain
                assert started < done < follow_up < shutdown
        # An event emitted by the shutdown code itself is handled by the final drain.
        assert index_of(lines, "stopping handler ran") > shutdown
        assert "Application shutdown complete." in server.log
        assert "ERROR" not in server.log


@pytest.mark.parametrize(
    ("endpoint", "event", "handler"),
    [
        pytest.param("/enqueue", "stuck", "hang_forever", id="async-handler"),
        pytest.param("/enqueue-sync", "stuck.sync", "hang_forever_in_a_thread", id="def-handler"),
    ],
)
async def test_the_drain_bound_cuts_off_a_hung_handler_and_names_it(
    tmp_path: Path, endpoint: str, event: str, handler: str
) -> None:
    with serve("tests.e2e.apps.hang:app", tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            assert (await client.post(f"{endpoint}/forever")).status_code == 200
        await server.wait_for_record("hanging on forever")
        [event_id] = [line.split(": ")[1] for line in server.record if line.startswith("id of forever")]

        server.send_signal(signal.SIGTERM)  # drain_timeout is 0.5 s; the handler never returns
        assert await server.wait_exit() in EXITED_ON_SIGTERM

        log = server.log
        assert "drain bound ran out with 1 handler call(s) unfinished" in log, server.describe()
        assert f"tests.e2e.apps.hang.{handler} <- {event} ({event_id})" in log
        assert "Application shutdown complete." in log
        assert "lifespan shutdown" in server.record  # the app's own shutdown code still ran


async def test_request_handlers_are_bounded_by_uvicorns_graceful_shutdown_timeout(tmp_path: Path) -> None:
    # uvicorn waits for request tasks before the lifespan shutdown, and tidings runs a request's
    # handlers in that task: for them the bound is --timeout-graceful-shutdown, not drain_timeout.
    with serve("tests.e2e.apps.hang:app", tmp_path, "--timeout-graceful-shutdown", "1") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            assert (await client.post("/stuck/in-request")).status_code == 200
        await server.wait_for_record("hanging on in-request")
        [event_id] = [line.split(": ")[1] for line in server.record if line.startswith("id of in-request")]

        server.send_signal(signal.SIGTERM)
        assert await server.wait_exit() in EXITED_ON_SIGTERM

        assert f"tests.e2e.apps.hang.hang_forever <- stuck ({event_id})" in server.log, server.describe()
        record = server.record
        assert "on_failure HandlerCancelledError tests.e2e.apps.hang.hang_forever <- stuck" in record
        assert record[-1] == "lifespan shutdown"


async def test_ctrl_c_exits_after_the_drain_bound_cut_off_a_def_handler(tmp_path: Path) -> None:
    with serve("tests.e2e.apps.hang:app", tmp_path) as server:  # drain_timeout=0.5, no handler_timeout
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            (await client.post("/enqueue-sync/forever")).raise_for_status()
        await server.wait_for_record("hanging on forever")

        server.send_signal(signal.SIGINT)
        await server.wait_for_log("drain bound ran out")
        await server.wait_for_log("Finished server process")  # uvicorn is done; only Python's exit is left
        assert await exited_within(server.process, 3.0), server.describe()


async def test_handler_timeout_bounds_request_handlers_at_sigterm(tmp_path: Path) -> None:
    """Under uvicorn a request's handlers run in the request's task, which uvicorn's graceful
    shutdown waits for before the lifespan shutdown (and so before tidings' drain): there,
    ``handler_timeout`` is the bound (request_handlers="task" puts them under the drain bound)."""
    with serve("tests.e2e.apps.hang:app", tmp_path, HANG_HANDLER_TIMEOUT="1") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            (await client.post("/stuck/in-request")).raise_for_status()
        await server.wait_for_record("hanging on in-request")
        server.send_signal(signal.SIGTERM)
        assert await exited_within(server.process, 10.0), server.describe()
        assert server.process.returncode in EXITED_ON_SIGTERM, server.describe()
        await server.wait_for_record(
            "on_failure HandlerTimeoutError tests.e2e.apps.hang.hang_forever <- stuck"
        )


async def test_in_task_mode_the_drain_bound_covers_request_handlers_at_sigterm(tmp_path: Path) -> None:
    """With request_handlers="task" the request's task ends with its response, so uvicorn does not
    wait for the handlers, and tidings' drain bound cuts off the one that hangs."""
    with serve("tests.e2e.apps.hang:app", tmp_path, HANG_REQUEST_HANDLERS="task") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            (await client.post("/stuck/in-request")).raise_for_status()
        await server.wait_for_record("hanging on in-request")
        server.send_signal(signal.SIGTERM)
        assert await exited_within(server.process, 5.0), server.describe()
        assert server.process.returncode in EXITED_ON_SIGTERM, server.describe()
        assert "drain bound ran out" in server.log
        record = server.record
        assert "on_failure HandlerCancelledError tests.e2e.apps.hang.hang_forever <- stuck" in record
