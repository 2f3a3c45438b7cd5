"""A plain ``def`` handler past its timeout cannot be interrupted, but nothing else waits for it.

Its thread keeps the call; the job's other sync calls go on in another thread, the job ends (so a
request's task and its concurrency slot are free), drain waits for the call within its bound and
reports it if it is still running then, and a durable log keeps it leased, then completes it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import threading
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tidings import (
    DrainTimeoutError,
    Event,
    EventBus,
    HandlerTimeoutError,
    Limits,
    RetryPolicy,
    TidingsMiddleware,
    emit,
)
from tidings.store import SQLiteStore

from ..conftest import Recorder

pytestmark = pytest.mark.anyio


def hanging_bus(recorder: Recorder, failures: Recorder, release: threading.Event, **options: Any) -> EventBus:
    """A bus whose first sync handler of "job" blocks until ``release``; a second one records."""
    bus = EventBus(on_failure=failures.add, **options)

    @bus.on("job", timeout=0.05, name="hangs")
    def hangs(event: Event) -> None:
        release.wait(10)
        recorder.add(("hangs returned", event.payload))

    @bus.on("job", name="after")
    def after(event: Event) -> None:
        recorder.add(("after", event.payload))

    return bus


async def test_the_calls_behind_a_hung_one_run_and_its_job_ends(recorder: Recorder) -> None:
    release = threading.Event()
    failures = Recorder()
    bus = hanging_bus(recorder, failures, release, limits=Limits(max_concurrency=1))

    @bus.on("later")
    async def later(event: Event) -> None:  # needs the only concurrency slot
        recorder.add("later")

    async with bus:
        bus.emit("job", 1)
        await recorder.wait_count(1)
        (timeout,) = await failures.wait_count(1)
        assert isinstance(timeout, HandlerTimeoutError) and timeout.handler == "hangs"
        assert "the other handlers go on without it" in str(timeout)
        assert recorder.items == [("after", 1)]  # ran in another thread, while "hangs" still runs
        bus.emit("later")  # the hung call's job ended: its slot is free
        await recorder.wait_count(2)
        assert recorder.items == [("after", 1), "later"]
        assert bus._runner.jobs == set()
        assert bus._runner.in_flight() == []  # in memory: no lease to renew
        release.set()
        await bus.drain()  # waits for the call left behind...
        assert recorder.items[-1] == ("hangs returned", 1)  # ...until it returned
        assert bus._runner.left_behind == {}
    assert len(failures.items) == 1  # reported once, at its timeout; returning late is no failure


async def test_a_request_does_not_wait_for_a_hung_sync_handler(recorder: Recorder) -> None:
    release = threading.Event()
    failures = Recorder()
    bus = hanging_bus(recorder, failures, release)

    async def endpoint(request: Request) -> Response:
        emit("job", "request")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)], middleware=[Middleware(TidingsMiddleware, bus=bus)])
    async with bus:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/")).text == "ok"  # returns once the request's task is done
        assert recorder.items == [("after", "request")]
        assert [type(f) for f in failures.items] == [HandlerTimeoutError]
        release.set()
        await recorder.wait_count(2)


async def test_drain_reports_a_call_still_running_when_its_bound_runs_out(recorder: Recorder) -> None:
    release = threading.Event()
    failures = Recorder()
    bus = hanging_bus(recorder, failures, release)
    try:
        async with bus:
            bus.emit("job", 2)
            await failures.wait_count(1)
            with pytest.raises(DrainTimeoutError) as raised:
                await bus.drain(0.1)
            assert [(p.handler, p.event.payload) for p in raised.value.pending] == [("hangs", 2)]
            assert bus._runner.left_behind == {}  # reported once; drain does not wait for it again
            await bus.drain(0.1)
    finally:
        release.set()
    assert recorder.items[0] == ("after", 2)
    assert [type(f).__name__ for f in failures.items] == ["HandlerTimeoutError", "HandlerCancelledError"]


async def test_a_durable_log_keeps_the_call_leased_then_completes_it(recorder: Recorder) -> None:
    release = threading.Event()
    failures = Recorder()
    path = os.path.join(tempfile.mkdtemp(), "events.db")
    bus = hanging_bus(recorder, failures, release, store=SQLiteStore(path))
    async with bus:
        bus.emit("job", 3)
        await failures.wait_count(1)
        await recorder.wait_count(1)
        # its lease is renewed, so no relay takes it over while it runs on
        assert "hangs" in {handler for _, handler in bus._runner.in_flight()}
        release.set()
        await bus.drain()
        await bus.flush()
        assert bus._runner.in_flight() == []
    # nothing left for a restart to run again: the call that returned late was completed (deleted)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute(f"SELECT count(*) FROM {SQLiteStore.deliveries_table}").fetchone() == (0,)
    assert sorted(recorder.items) == [("after", 3), ("hangs returned", 3)]


async def test_a_hung_call_that_then_fails_is_retried_as_any_failure(recorder: Recorder) -> None:
    release = threading.Event()
    failures = Recorder()
    attempts: list[int] = []
    bus = EventBus(on_failure=failures.add)

    @bus.on("job", timeout=0.05, retry=RetryPolicy(max_attempts=2, backoff=0.01, jitter=False))
    def hangs_then_fails(event: Event) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            release.wait(10)
            raise ConnectionError("gave up")
        recorder.add("second attempt")

    async with bus:
        bus.emit("job")
        await failures.wait_count(1)  # its timeout
        release.set()
        await recorder.wait_count(1)
    timed_out, failed = failures.items
    assert isinstance(timed_out, HandlerTimeoutError) and timed_out.retry_in is None
    assert "ConnectionError: gave up" in str(failed) and failed.retry_in is not None  # then retried
