"""Under a real uvicorn, handlers run after the response is on the wire, and nothing emitted is lost.

The app (``apps/after_response.py``) has handlers that block on gate files only this test opens, and
it opens them only once it holds the complete response: if a handler delayed the response, the
request would never complete. Orderings are read from the app's record file, not inferred from time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from .support import Server, index_of, serve

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

BODY_SIZE = 1024 * 1024  # more than one socket write: the client reads it over several chunks


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve("tests.e2e.apps.after_response:app", tmp_path_factory.mktemp("after_response")) as server:
        yield server


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
        yield client


async def test_an_event_emitted_by_lifespan_startup_is_handled(server: Server) -> None:
    await server.wait_for_record("startup handler ran")


async def test_the_response_does_not_wait_for_handlers(server: Server, client: httpx.AsyncClient) -> None:
    response = await client.post("/slow/a", params={"size": BODY_SIZE})

    # The client holds the whole response while both handlers are blocked on a gate nobody opened.
    assert response.status_code == 200
    assert len(response.json()["padding"]) == BODY_SIZE
    await server.wait_for_record("async handler a started")
    await server.wait_for_record("sync handler a started")
    assert "async handler a done" not in server.record
    assert "sync handler a done" not in server.record

    server.open_gate("a")
    await server.wait_for_record("async handler a done")
    await server.wait_for_record("sync handler a done")


async def test_streaming_handlers_start_after_the_last_chunk(
    server: Server, client: httpx.AsyncClient
) -> None:
    async with client.stream("GET", "/stream/s") as response:
        chunks = response.aiter_raw()
        received = b""
        while b"chunk-1\n" not in received:
            received += await anext(chunks)
        # Two events were emitted already (before the response and after chunk 1); the response is
        # still open, so neither may have been handled.
        assert [line for line in server.record if line.startswith("stream handler s")] == []
        server.open_gate("s-stream")
        async for chunk in chunks:
            received += chunk
    assert received == b"chunk-1\nchunk-2\n"

    await server.wait_for_record("stream handler s before")
    await server.wait_for_record("stream handler s mid-stream")
    lines = server.record
    exhausted = index_of(lines, "stream s exhausted")  # written after the last chunk was sent
    assert (
        exhausted
        < index_of(lines, "stream handler s before")
        < index_of(lines, "stream handler s mid-stream")
    )


async def test_a_task_emitting_after_the_response_is_handled(
    server: Server, client: httpx.AsyncClient
) -> None:
    response = await client.post("/background/b")
    assert response.status_code == 200

    server.open_gate("b-task")  # the task emits only now, after the response has been received
    await server.wait_for_record("late handler b")
    lines = server.record
    assert index_of(lines, "task b emitting") < index_of(lines, "late handler b")


def test_server_log_is_clean(server: Server) -> None:
    # Runs last in this module (pytest keeps file order): nothing above made tidings complain.
    assert "ERROR" not in server.log
    assert "Traceback" not in server.log
