"""FastAPI dependencies in event handlers, with real FastAPI apps behind TidingsMiddleware.

No ``from __future__ import annotations`` here on purpose: dependencies defined inside a test are
read from the handlers' live annotations, as FastAPI reads an endpoint's. The string-annotation
path is tested explicitly below.

These tests run against the FastAPI in the environment; ``docs/fastapi.md`` says how the oldest
and newest supported FastAPI are tested with them.
"""

import asyncio
import contextlib
import gc
import inspect
import logging
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import pydantic
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Header, Query, Request, Security
from fastapi.security import SecurityScopes
from starlette.responses import Response
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from tidings import (
    ConfigurationError,
    DrainTimeoutError,
    Event,
    EventBus,
    HandlerError,
    HandlerTimeoutError,
    Limits,
    RetryPolicy,
    TidingsMiddleware,
    emit,
)
from tidings._core.runner import Runner, _ThreadedCall
from tidings.store import SQLiteStore
from tidings.testing import settle

from ..conftest import Recorder, Records
from ..take_over import MOMENTS, TakeOverRace

pytestmark = pytest.mark.anyio

# Depends(..., scope="function" | "request") exists since FastAPI 0.121
HAS_DEPENDENCY_SCOPES = "scope" in inspect.signature(Depends).parameters


def make_app(bus: EventBus) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.post("/emit/{name}")
    async def emit_endpoint(name: str) -> dict[str, str]:
        emit(name, {"user_id": 7, "email": "ann@example.com"})
        return {"emitted": name}

    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def post(app: FastAPI, *names: str) -> None:
    async with client(app) as http:
        for name in names:
            response = await http.post(f"/emit/{name}")
            assert response.status_code == 200, response.text


def hangs_with_a_background_task(bus: EventBus, release: threading.Event, task: Callable[[], Any]) -> None:
    """Register ``hangs`` for "slow": a plain def handler that runs past its timeout of 0.05s until
    ``release``, whose dependency adds ``task`` to its background tasks."""

    async def notifier(tasks: BackgroundTasks) -> str:
        tasks.add_task(task)
        return "notifier"

    @bus.on("slow", timeout=0.05, name="hangs")
    def hangs(n: Annotated[str, Depends(notifier)]) -> None:
        assert release.wait(5)


# -- module-level dependencies, for the string-annotation tests --------------------------------------


async def module_db() -> str:
    return "module-db"


ModuleDb = Annotated[str, Depends(module_db)]


# -- declaring dependencies ------------------------------------------------------------------------


async def test_depends_default_and_annotated_forms(bus: EventBus, recorder: Recorder) -> None:
    async def get_db() -> str:
        return "db"

    def get_settings() -> dict[str, str]:
        return {"env": "test"}

    Db = Annotated[str, Depends(get_db)]

    @bus.on("user.created")
    async def by_default(event: Event, db: str = Depends(get_db)) -> None:
        recorder.add(("default", event.name, db))

    @bus.on("user.created")
    async def by_annotated(
        event: Event,
        db: Annotated[str, Depends(get_db)],
        settings: Annotated[dict[str, str], Depends(get_settings)],
    ) -> None:
        recorder.add(("annotated", event.name, db, settings["env"]))

    @bus.on("user.created")
    async def by_alias(db: Db) -> None:  # a reusable Annotated alias, the FastAPI docs' way
        recorder.add(("alias", db))

    @bus.on("user.created")
    async def by_string(db: "ModuleDb") -> None:  # resolved from the module, like FastAPI does
        recorder.add(("string", db))

    app = make_app(bus)
    async with bus:
        await post(app, "user.created")
        items = await recorder.wait_count(4)
    assert sorted(items) == sorted(
        [
            ("default", "user.created", "db"),
            ("annotated", "user.created", "db", "test"),
            ("alias", "db"),
            ("string", "module-db"),
        ]
    )


async def test_sub_dependencies_and_one_cache_per_run(bus: EventBus, recorder: Recorder) -> None:
    calls: list[int] = []

    async def counter() -> int:
        calls.append(1)
        return len(calls)

    def uncached() -> int:
        calls.append(1)
        return len(calls)

    async def first(n: Annotated[int, Depends(counter)]) -> str:
        return f"first:{n}"

    def second(n: Annotated[int, Depends(counter)], f: Annotated[str, Depends(first)]) -> str:
        return f"second:{n}:{f}"

    @bus.on("tick")
    async def handler(
        a: Annotated[str, Depends(first)],
        b: Annotated[str, Depends(second)],
        n: Annotated[int, Depends(counter)],
    ) -> None:
        recorder.add((a, b, n))

    app = make_app(bus)
    async with bus:
        await post(app, "tick", "tick")
        items = await recorder.wait_count(2)
    # counter ran once per run though three dependencies ask for it; the second run got a fresh one
    assert items == [("first:1", "second:1:first:1", 1), ("first:2", "second:2:first:2", 2)]

    calls.clear()

    @bus.on("tock")
    async def not_cached(
        x: Annotated[int, Depends(uncached, use_cache=False)],
        y: Annotated[int, Depends(uncached, use_cache=False)],
    ) -> None:
        recorder.add((x, y))

    async with bus:
        await post(app, "tock")
        items = await recorder.wait_count(3)
    assert items[2] == (1, 2)


async def test_each_handler_of_an_event_gets_its_own_run(bus: EventBus, recorder: Recorder) -> None:
    made: list[object] = []

    async def resource() -> object:
        made.append(object())
        return made[-1]

    @bus.on("user.created")
    async def one(r: Annotated[object, Depends(resource)]) -> None:
        recorder.add(("one", r))

    @bus.on("user.created")
    async def two(r: Annotated[object, Depends(resource)]) -> None:
        recorder.add(("two", r))

    async with bus:
        await post(make_app(bus), "user.created")
        items = await recorder.wait_count(2)
    assert len(made) == 2
    assert {id(r) for _, r in items} == {id(m) for m in made}


# -- yield dependencies ------------------------------------------------------------------------------


async def test_yield_dependencies_close_after_the_handler(bus: EventBus, recorder: Recorder) -> None:
    async def session() -> AsyncIterator[str]:
        recorder.add("session.open")
        yield "session"
        recorder.add("session.close")

    def connection(s: Annotated[str, Depends(session)]) -> Iterator[str]:  # a sync generator
        recorder.add("connection.open")
        yield f"connection({s})"
        recorder.add("connection.close")

    @bus.on("order.placed")
    async def handler(conn: Annotated[str, Depends(connection)]) -> None:
        recorder.add(f"handler with {conn}")

    async with bus:
        await post(make_app(bus), "order.placed")
        items = await recorder.wait_count(5)
    assert items == [
        "session.open",
        "connection.open",
        "handler with connection(session)",
        "connection.close",
        "session.close",
    ]


async def test_yield_dependencies_close_when_the_handler_raises_and_it_is_reported(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError]
) -> None:
    broken = True

    async def session() -> AsyncIterator[str]:
        recorder.add("open")
        try:
            yield "session"
        except RuntimeError as exc:
            recorder.add(f"rollback after {exc}")
            raise
        finally:
            recorder.add("close")

    @bus.on("order.placed", name="billing.charge")
    async def charge(event: Event, s: Annotated[str, Depends(session)]) -> None:
        recorder.add("charge")
        if broken:
            raise RuntimeError("card declined")

    @bus.on("order.placed")
    async def other(event: Event) -> None:
        recorder.add("other ran")

    async with bus:
        await post(make_app(bus), "order.placed")
        items = await recorder.wait_count(5)
        assert items[:4] == ["open", "charge", "rollback after card declined", "close"]
        assert "other ran" in items
        [failure] = failures
        assert failure.handler == "billing.charge"
        assert isinstance(failure.__cause__, RuntimeError)
        [letter] = await bus.dead_letters.list()
        assert letter.handler == "billing.charge"
        # a replay solves the dependencies afresh
        broken = False
        result = await bus.dead_letters.replay(all=True)
        assert len(result.succeeded) == 1
    assert recorder.items[-3:] == ["open", "charge", "close"]


async def test_a_yield_dependency_cannot_swallow_the_handlers_failure(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError]
) -> None:
    async def careless() -> AsyncIterator[str]:
        try:
            yield "session"
        except RuntimeError as exc:  # and no raise: FastAPI's docs say to re-raise
            recorder.add(f"caught {exc}")

    @bus.on("x", name="careless.handler")
    async def handler(s: Annotated[str, Depends(careless)]) -> None:
        raise RuntimeError("boom")

    async with bus:
        await post(make_app(bus), "x")
    assert recorder.items == ["caught boom"]
    [failure] = failures
    assert failure.handler == "careless.handler"
    assert isinstance(failure.__cause__, RuntimeError)


@pytest.mark.skipif(not HAS_DEPENDENCY_SCOPES, reason="Depends(scope=...) needs FastAPI 0.121+")
async def test_dependency_scopes_both_close_after_the_handler(bus: EventBus, recorder: Recorder) -> None:
    def scoped(scope: Literal["function", "request"]) -> Any:
        async def dependency() -> AsyncIterator[str]:
            yield scope
            recorder.add(f"{scope}.close")

        return Depends(dependency, scope=scope)  # type: ignore[call-arg,unused-ignore]  # 0.121+

    @bus.on("x")
    async def handler(f: Annotated[str, scoped("function")], r: Annotated[str, scoped("request")]) -> None:
        recorder.add(f"handler {f} {r}")

    async with bus:
        await post(make_app(bus), "x")
        items = await recorder.wait_count(3)
    assert items[0] == "handler function request"
    assert sorted(items[1:]) == ["function.close", "request.close"]


async def test_a_timed_out_handler_still_closes_its_dependencies(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError]
) -> None:
    async def session() -> AsyncIterator[str]:
        try:
            yield "session"
        finally:
            recorder.add("close")

    @bus.on("slow", timeout=0.1)
    async def hangs(s: Annotated[str, Depends(session)]) -> None:
        recorder.add("started")
        await asyncio.Event().wait()

    async with bus:
        await post(make_app(bus), "slow")
        await recorder.wait_count(2)
    assert recorder.items == ["started", "close"]
    [failure] = failures
    assert isinstance(failure, HandlerTimeoutError)


async def test_a_plain_def_handler_with_dependencies_past_its_timeout_that_returns_is_no_dead_letter(
    recorder: Recorder,
) -> None:
    # README: a plain def handler past its timeout "keeps its worker thread until it returns", and is
    # "completed if it returns"; docs/fastapi.md: the same for one with dependencies, whose
    # dependencies close when the timeout fires. A call that returned must not also be a dead letter
    # (a replay would run it a second time).
    failures = Recorder()
    returned = Recorder()
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="test")

    async def session() -> AsyncIterator[str]:
        try:
            yield "session"
        finally:
            recorder.add("closed")

    @bus.on("slow", timeout=0.05)
    def hangs(s: Annotated[str, Depends(session)]) -> None:
        assert release.wait(5)
        emit("slow.done")  # after it was left behind: handled all the same
        returned.add(s)

    @bus.on("slow")
    async def next_one(event: Event) -> None:
        recorder.add("next")

    @bus.on("slow.done")
    async def done(event: Event) -> None:
        recorder.add("done")

    async with bus:
        bus.emit("slow", 1)
        [timeout] = await failures.wait_count(1)  # past its timeout, and left to run on
        await recorder.wait_count(2)
        assert sorted(recorder.items) == ["closed", "next"]  # its dependencies closed; the job went on
        assert bus._runner.jobs == set()
        release.set()
        await returned.wait_count(1)
        await recorder.wait_count(3)
        await bus.drain()
        letters = await bus.dead_letters.list()
    assert not letters, [failure.dead_letters for failure in failures.items]
    assert isinstance(timeout, HandlerTimeoutError)
    assert "keeps its worker thread until it returns" in str(timeout)
    assert (timeout.retry_in, timeout.dead_letters) == (None, ())  # not its outcome: that comes later
    assert len(failures.items) == 1  # returning late is no failure
    assert recorder.items[-1] == "done"


async def test_a_plain_def_handler_with_dependencies_that_fails_after_its_timeout_is_retried() -> None:
    failures = Recorder()
    attempts: list[int] = []
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="test")

    async def session() -> str:
        return "session"

    @bus.on("slow", timeout=0.05, retry=RetryPolicy(max_attempts=2, backoff=0.01, jitter=False))
    def hangs(s: Annotated[str, Depends(session)]) -> None:
        attempts.append(1)
        assert release.wait(5)
        raise ConnectionError(f"attempt {len(attempts)}")

    async with bus:
        bus.emit("slow")
        await failures.wait_count(1)
        release.set()  # the second attempt does not wait
        await failures.wait_count(3)
        await bus.drain()
        letters = await bus.dead_letters.list()
    past, first, last = failures.items
    assert isinstance(past, HandlerTimeoutError) and past.attempt == 1
    assert (type(first.__cause__), first.attempt, first.retry_in is not None) == (ConnectionError, 1, True)
    assert (str(last.__cause__), last.attempt, last.retry_in) == ("attempt 2", 2, None)
    assert [(letter.handler, letter.attempts) for letter in letters] == [(last.handler, 2)]
    assert len(attempts) == 2


async def test_a_durable_log_keeps_a_plain_def_handler_with_dependencies_leased_past_its_timeout(
    recorder: Recorder, tmp_path: Path
) -> None:
    failures = Recorder()
    release = threading.Event()
    path = tmp_path / "events.db"
    bus = EventBus(on_failure=failures.add, name="test", store=SQLiteStore(path))

    async def session() -> str:
        return "session"

    @bus.on("slow", timeout=0.05, name="hangs")
    def hangs(s: Annotated[str, Depends(session)]) -> None:
        assert release.wait(5)
        emit("slow.done")

    @bus.on("slow.done")
    async def done(event: Event) -> None:
        recorder.add("done")

    async with bus:
        bus.emit("slow")
        await failures.wait_count(1)
        # its lease is renewed, so no relay takes it over while it runs on
        assert [handler for _, handler in bus._runner.in_flight()] == ["hangs"]
        release.set()
        await recorder.wait_count(1)
        await bus.drain()
        await bus.flush()
        assert bus._runner.in_flight() == []
    # nothing left for a restart to run again: it was completed once what it emitted was recorded
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute(f"SELECT count(*) FROM {SQLiteStore.deliveries_table}").fetchone() == (0,)


async def test_drain_reports_a_plain_def_handler_with_dependencies_still_running_past_its_timeout() -> None:
    failures = Recorder()
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="test")

    async def session() -> str:
        return "session"

    @bus.on("slow", timeout=0.05, name="hangs")
    def hangs(s: Annotated[str, Depends(session)]) -> None:
        assert release.wait(5)

    try:
        async with bus:
            bus.emit("slow", 2)
            await failures.wait_count(1)
            with pytest.raises(DrainTimeoutError) as raised:
                await bus.drain(0.1)
            assert [(p.handler, p.event.payload) for p in raised.value.pending] == [("hangs", 2)]
            assert bus._runner.left_behind == {}
    finally:
        release.set()
    assert [type(f).__name__ for f in failures.items] == ["HandlerTimeoutError", "HandlerCancelledError"]


@pytest.mark.parametrize("ends", ["returns", "raises"])
async def test_a_plain_def_handler_with_dependencies_that_ended_as_its_timeout_came_ends_as_it_did(
    ends: str, recorder: Recorder
) -> None:
    # Its thread ended it, but the loop was busy: the watchdog's timeout reached the call before
    # its end did. How it ended stands: no timeout is reported, and it is not run again.
    failures = Recorder()
    bus = EventBus(on_failure=failures.add, name="test")
    loop = asyncio.get_running_loop()

    async def session() -> str:
        return "session"

    def seen_by_the_watchdog() -> bool:
        return any(job.seen is not None and job.seen is job.current for job in bus._runner.jobs)

    @bus.on("slow", timeout=0.05)
    def ends_late(s: Annotated[str, Depends(session)]) -> None:
        deadline = time.monotonic() + 5
        while not seen_by_the_watchdog():  # so that its next look finds the call past its timeout
            assert time.monotonic() < deadline
            time.sleep(0.001)
        # the loop is busy past the timeout; this thread's end is queued for it meanwhile
        loop.call_soon_threadsafe(time.sleep, 0.2)
        recorder.add("ended")
        if ends == "raises":
            raise ValueError("its own failure")

    async with bus:
        bus.emit("slow")
        await recorder.wait_count(1)
        await bus.drain()
    if ends == "returns":
        assert failures.items == []
    else:
        [failure] = failures.items
        assert type(failure) is HandlerError and isinstance(failure.__cause__, ValueError)
    assert recorder.items == ["ended"]


async def test_drain_cut_off_while_a_left_behind_calls_dependencies_close_reports_it_once() -> None:
    failures = Recorder()
    release = threading.Event()
    closing = asyncio.Event()
    bus = EventBus(on_failure=failures.add, name="test")

    async def session() -> AsyncIterator[str]:
        try:
            yield "session"
        finally:
            await closing.wait()  # an async close (a database session's): the job awaits it

    @bus.on("slow", timeout=0.05, name="hangs")
    def hangs(s: Annotated[str, Depends(session)]) -> None:
        assert release.wait(5)

    try:
        async with bus:
            bus.emit("slow", 1)
            await failures.wait_count(1)  # left behind, its dependency closing
            assert [handler for _, handler in bus._runner.in_flight()] == []  # in memory: no lease
            with pytest.raises(DrainTimeoutError) as raised:
                await bus.drain(0.1)
            closing.set()
    finally:
        release.set()
    assert [(p.handler, p.event.payload) for p in raised.value.pending] == [("hangs", 1)]
    assert [type(f).__name__ for f in failures.items] == ["HandlerTimeoutError", "HandlerCancelledError"]


async def test_the_background_tasks_of_a_left_behind_call_run_when_its_thread_returns() -> None:
    failures = Recorder()
    ran = Recorder()
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="test")

    async def notifier(tasks: BackgroundTasks) -> str:
        tasks.add_task(ran.add, "background task")
        return "notifier"

    @bus.on("slow", timeout=0.05, name="hangs")
    def hangs(n: Annotated[str, Depends(notifier)]) -> None:
        assert release.wait(5)
        ran.add("returned")

    async with bus:
        bus.emit("slow", 1)
        await failures.wait_count(1)
        release.set()
        await bus.drain()  # waits for them: the call is left behind until they ran
        assert ran.items == ["returned", "background task"]
        letters = await bus.dead_letters.list()
    assert len(failures.items) == 1 and letters == []


async def test_what_the_background_tasks_of_a_left_behind_call_emit_is_recorded_before_it_is_completed(
    tmp_path: Path,
) -> None:
    # Its job has ended by the time its thread returns: what its background task emits is the
    # call's all the same, and the durable log holds it before the call leaves the log.
    failures = Recorder()
    seen = Recorder()
    release = threading.Event()
    order: list[tuple[str, list[str]]] = []
    store = SQLiteStore(tmp_path / "events.db")
    real_record, real_complete = store.record, store.complete

    async def record(deliveries: Any, *, lease: float) -> Any:
        refused = await real_record(deliveries, lease=lease)
        order.append(("recorded", sorted(handler for _, handler in deliveries)))
        return refused

    def complete(deliveries: Any) -> None:
        order.append(("completed", sorted(handler for _, handler in deliveries)))
        real_complete(deliveries)

    store.record = record  # type: ignore[method-assign]
    store.complete = complete  # type: ignore[method-assign]
    bus = EventBus(on_failure=failures.add, name="test", store=store)

    def notify() -> None:  # a plain def background task: in FastAPI's thread pool
        emit("mail.sent")

    hangs_with_a_background_task(bus, release, notify)

    @bus.on("mail.sent", name="on_mail")
    async def on_mail(event: Event) -> None:
        seen.add(event.name)

    async with bus:
        bus.emit("slow")
        await failures.wait_count(1)  # left behind past its timeout
        deadline = time.monotonic() + 5
        while bus._runner.jobs:  # its job ends without it
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        release.set()
        await seen.wait_count(1)
        await bus.drain()
    recorded = next(
        i for i, (what, handlers) in enumerate(order) if what == "recorded" and "on_mail" in handlers
    )
    completed = next(
        i for i, (what, handlers) in enumerate(order) if what == "completed" and "hangs" in handlers
    )
    assert recorded < completed, order


@pytest.mark.parametrize("moment", MOMENTS)
async def test_what_a_plain_def_handler_with_dependencies_emits_as_its_timeout_comes_is_recorded_first(
    moment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The call's emit races Runner._thread_call_cancelled: whoever the event ends up with, the log
    # holds it before the call leaves the log, and it runs once. "returning": the call ended as
    # its timeout came, so the timeout is taken back and the call ends as it did.
    race = TakeOverRace(moment, tmp_path / "events.db")
    bus = race.bus
    race.wrap_take_over("_thread_call_cancelled")
    end = _ThreadedCall.end

    def ended(threaded: _ThreadedCall, outcome: Any, failure: BaseException | None) -> bool:
        left = end(threaded, outcome, failure)
        race.returned.set()
        return left

    monkeypatch.setattr(_ThreadedCall, "end", ended)

    async def session() -> str:
        return "session"

    @bus.on("slow", timeout=0.05, name="hangs")
    def hangs(s: Annotated[str, Depends(session)]) -> None:
        race.emit_child()

    async with bus:
        await post(make_app(bus), "slow")
        if moment != "returning":
            await race.failures.wait_count(1)
        await race.run_out()
    race.check("hangs")
    timeouts = [] if moment == "returning" else [HandlerTimeoutError]
    assert [type(failure) for failure in race.failures.items] == timeouts


async def test_a_failing_background_task_of_a_left_behind_call_fails_the_call() -> None:
    failures = Recorder()
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="test")

    def fails() -> None:
        raise ConnectionError("the mail server is down")

    hangs_with_a_background_task(bus, release, fails)

    async with bus:
        bus.emit("slow", 1)
        await failures.wait_count(1)
        release.set()
        await failures.wait_count(2)
        await bus.drain()
        [letter] = await bus.dead_letters.list()
    assert isinstance(failures.items[1].__cause__, ConnectionError)
    assert letter.handler == "hangs" and "the mail server is down" in letter.error


async def test_a_failing_clean_up_of_a_left_behind_call_is_logged(records: Records) -> None:
    failures = Recorder()
    returned = Recorder()
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="test")

    async def session() -> AsyncIterator[str]:
        try:
            yield "session"
        finally:
            raise RuntimeError("the session failed to close")

    @bus.on("slow", timeout=0.05, name="hangs")
    def hangs(s: Annotated[str, Depends(session)]) -> None:
        assert release.wait(5)
        returned.add("returned")

    async with bus:
        bus.emit("slow", 1)
        logged = await records.wait_for("what ran after it was left behind past its timeout raised")
        release.set()
        await returned.wait_count(1)
        await bus.drain()
        letters = await bus.dead_letters.list()
    assert "RuntimeError: the session failed to close" in logged.getMessage()
    assert logged.exc_info is not None and logged.levelno == logging.ERROR
    assert len(failures.items) == 1 and letters == []  # its outcome is its thread's: it returned


async def test_drain_cut_off_while_the_background_tasks_of_a_left_behind_call_run_cancels_them(
    records: Records,
) -> None:
    # Its thread returned; its background task runs on the loop when the drain bound runs out.
    # The call is reported unfinished once, with what that task emitted so far; the task is
    # cancelled by the cut-off, and that cancellation is ours, not a failure of the handler's.
    failures = Recorder()
    ran = Recorder()
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="test", drain_timeout=0)

    async def notify() -> None:
        emit("mail.queued", 1)
        ran.add("background task")
        try:
            await asyncio.Event().wait()  # a mail server that never answers
        except asyncio.CancelledError:
            ran.add("cancelled")
            raise

    hangs_with_a_background_task(bus, release, notify)

    @bus.on("mail.queued", name="on_mail")
    async def on_mail(event: Event) -> None:
        ran.add("on_mail")

    try:
        async with bus:
            bus.emit("slow", 1)
            await failures.wait_count(1)  # left behind past its timeout
            release.set()
            await ran.wait_count(1)  # its thread returned; its background task runs
            call, emitted = bus._pending_work()  # (what settle, or the exit report, would say)
            assert call.endswith("past its timeout, its thread returned, the rest of the call still running")
            assert emitted.startswith("on_mail <- mail.queued (")
            with pytest.raises(DrainTimeoutError) as raised:
                await bus.drain(0)
            await ran.wait_count(2)
            assert bus._pending_work() == []
    finally:
        release.set()
    assert [(p.handler, p.event.name) for p in raised.value.pending] == [
        ("hangs", "slow"),
        ("on_mail", "mail.queued"),
    ]
    assert ran.items == ["background task", "cancelled"]
    assert [(type(f).__name__, f.handler) for f in failures.items] == [
        ("HandlerTimeoutError", "hangs"),
        ("HandlerCancelledError", "hangs"),
        ("HandlerCancelledError", "on_mail"),
    ]
    assert bus._runner.rests == set()
    logged = [record.getMessage() for record in records.recorder.items]
    assert not [message for message in logged if "after it was reported as unfinished" in message], logged
    assert not [message for message in logged if "was dropped" in message], logged


@pytest.mark.parametrize("waiter", ["drain", "settle"])
async def test_the_background_tasks_of_a_left_behind_call_wait_in_a_drain_for_the_rest_not_for_the_call(
    waiter: str,
) -> None:
    # As a handler's own drain does not wait for its own job, the background tasks of a call left
    # behind past its timeout, part of that call, do not wait for the call: only for other work.
    failures = Recorder()
    ran = Recorder()
    release = threading.Event()
    other_may_end = asyncio.Event()
    bus = EventBus(on_failure=failures.add, name="test")

    async def notify() -> None:
        emit("mail.queued", 1)  # the call's: handled once the call ends
        ran.add("draining")
        if waiter == "drain":
            await bus.drain(5)
        else:
            await settle(bus, timeout=5)
        ran.add("drained")

    hangs_with_a_background_task(bus, release, notify)

    @bus.on("other", name="other")
    async def other(event: Event) -> None:
        ran.add("other started")
        await other_may_end.wait()
        ran.add("other ended")

    @bus.on("mail.queued", name="on_mail")
    async def on_mail(event: Event) -> None:
        ran.add("on_mail")

    try:
        async with bus:
            bus.emit("slow", 1)
            await failures.wait_count(1)  # left behind past its timeout
            bus.emit("other")
            await ran.wait_count(1)
            release.set()
            await ran.wait_count(2)  # its thread returned; its background task waits for "other"
            other_may_end.set()
            await ran.wait_count(5, timeout=4)  # before the bound of 5 s: it did not wait for itself
            await bus.drain()
            letters = await bus.dead_letters.list()
    finally:
        release.set()
    assert ran.items == ["other started", "draining", "other ended", "drained", "on_mail"]
    assert [(type(f).__name__, f.handler) for f in failures.items] == [("HandlerTimeoutError", "hangs")]
    assert letters == []


async def test_a_drain_cut_off_in_the_background_tasks_of_a_left_behind_call_cuts_off_the_rest_only() -> None:
    # The cut-off of a drain those tasks run cancels and reports the other work, not the call
    # they are part of (as a handler's drain cuts off every job but its own): the call ends as it does.
    failures = Recorder()
    ran = Recorder()
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="test")

    async def notify() -> None:
        try:
            await bus.drain(0.1)
        except DrainTimeoutError as exc:
            ran.add([(p.handler, p.event.name) for p in exc.pending])
        ran.add("background task ended")

    hangs_with_a_background_task(bus, release, notify)

    @bus.on("other", name="other")
    async def other(event: Event) -> None:
        ran.add("other started")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ran.add("other cancelled")
            raise

    try:
        async with bus:
            bus.emit("slow", 1)
            await failures.wait_count(1)  # left behind past its timeout
            bus.emit("other")
            await ran.wait_count(1)
            release.set()
            await ran.wait_count(4)
            await bus.drain()
            letters = await bus.dead_letters.list()
    finally:
        release.set()
    assert ran.items == ["other started", "other cancelled", [("other", "other")], "background task ended"]
    assert [(type(f).__name__, f.handler) for f in failures.items] == [
        ("HandlerTimeoutError", "hangs"),
        ("HandlerCancelledError", "other"),
    ]
    assert letters == []  # the call returned, and its background task too: it succeeded


async def test_a_call_that_ended_as_its_timeout_came_has_a_timeout_of_its_own_for_what_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its thread ended it as the timeout came (the race of the test above): the timeout is taken
    # back, and its background task, well within the timeout, is not cut off by the old one.
    taken_back: list[bool] = []
    settle_cancelled = Runner._thread_call_cancelled

    moments: list[tuple[str, float]] = []

    def spy(self: Runner, *args: Any) -> bool:
        taken_back.append(settle_cancelled(self, *args))
        moments.append(("taken back", time.monotonic()))
        return taken_back[-1]

    monkeypatch.setattr(Runner, "_thread_call_cancelled", spy)
    failures = Recorder()
    bodies = Recorder()
    loop = asyncio.get_running_loop()
    bus = EventBus(on_failure=failures.add, name="test")

    def seen_by_the_watchdog() -> bool:
        return any(job.seen is not None and job.seen is job.current for job in bus._runner.jobs)

    sent = asyncio.Event()

    async def send_mail() -> None:
        # until the watchdog has looked at the call again: the old window would have ended it then
        runner = bus._runner
        tick = runner._watch_handle
        deadline = time.monotonic() + 5
        while runner._watch_handle is tick:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        moments.append(("sent", time.monotonic()))
        sent.set()

    async def notifier(tasks: BackgroundTasks) -> str:
        tasks.add_task(send_mail)
        return "notifier"

    @bus.on("slow", timeout=0.4)  # one attempt: the take-back, if any, is its
    def ends_late(n: Annotated[str, Depends(notifier)]) -> None:
        deadline = time.monotonic() + 5
        while not seen_by_the_watchdog():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        loop.call_soon_threadsafe(time.sleep, 0.6)  # the loop is busy past the timeout
        bodies.add("body")

    async with bus:
        bus.emit("slow")
        await bodies.wait_count(1)
        await bus.drain()
    if not taken_back:
        # Its end reached it before the timeout did (the asyncio loop, at times): then the loop's
        # stall counts against the call's timeout (its background task is cut off), as for any
        # call, which is not what this is about.
        pytest.skip("the thread's end came first: no timeout to take back")
    assert taken_back == [True]
    assert sent.is_set()
    start = moments[0][1]
    assert failures.items == [] and bodies.items == ["body"], (
        [(what, round(at - start, 3)) for what, at in moments],
        [(type(f).__name__, f.attempt, round(f.event.timestamp_ns / 1e9, 3)) for f in failures.items],
        bodies.items,
    )


async def test_a_plain_def_handler_with_dependencies_that_waited_for_a_thread_past_its_timeout_never_runs(
    recorder: Recorder,
) -> None:
    # Its timeout came while it waited for a worker thread: it is a timeout like an async call's
    # (retried here), and the queued run it gave up never starts once the thread is free.
    failures = Recorder()
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="test", limits=Limits(max_threads=1))

    @bus.on("busy")
    def holds_the_thread(event: Event) -> None:
        assert release.wait(5)
        recorder.add("busy")

    async def session() -> str:
        return "session"

    @bus.on("queued", timeout=0.05, retry=RetryPolicy(max_attempts=2, backoff=0.01, jitter=False))
    def queued(s: Annotated[str, Depends(session)]) -> None:
        recorder.add("queued")

    async with bus:
        bus.emit("busy")
        bus.emit("queued")
        [timeout] = await failures.wait_count(1)
        release.set()
        await recorder.wait_count(2)  # its retry runs once the thread is free; the given-up run never
        await bus.drain()
    assert isinstance(timeout, HandlerTimeoutError)
    assert "was cancelled" in str(timeout) and timeout.retry_in is not None
    assert sorted(recorder.items) == ["busy", "queued"]


# -- threads: sync dependencies and sync handlers --------------------------------------------------


async def test_async_dependencies_run_on_the_loop_and_sync_ones_in_threads(
    bus: EventBus, recorder: Recorder
) -> None:
    loop_thread = threading.get_ident()

    async def on_loop() -> int:
        return threading.get_ident()

    def in_thread() -> int:
        return threading.get_ident()

    def sync_generator() -> Iterator[int]:
        yield threading.get_ident()

    @bus.on("x")
    async def handler(
        a: Annotated[int, Depends(on_loop)],
        s: Annotated[int, Depends(in_thread)],
        g: Annotated[int, Depends(sync_generator)],
    ) -> None:
        recorder.add((a, s, g, threading.get_ident()))

    async with bus:
        await post(make_app(bus), "x")
        [(a, s, g, handler_thread)] = await recorder.wait_count(1)
    assert a == loop_thread and handler_thread == loop_thread
    assert s != loop_thread and g != loop_thread  # FastAPI's thread pool, as for endpoints


async def test_sync_handlers_with_dependencies_run_off_the_loop_and_can_emit(
    bus: EventBus, recorder: Recorder
) -> None:
    loop_thread = threading.get_ident()
    closed = threading.Event()

    async def session() -> AsyncIterator[str]:
        yield "session"
        closed.set()

    @bus.on("user.created")
    def handler(user_id: int, s: Annotated[str, Depends(session)]) -> None:
        assert not closed.is_set()
        recorder.add(("sync handler", user_id, s, threading.get_ident() != loop_thread))
        emit("welcome.sent", user_id)  # chains, from the handler's thread

    @bus.on("welcome.sent")
    async def chained(event: Event) -> None:
        recorder.add(("chained", event.payload))

    async with bus:
        await post(make_app(bus), "user.created")
        items = await recorder.wait_count(2)
    assert items == [("sync handler", 7, "session", True), ("chained", 7)]
    assert closed.is_set()


async def test_callable_objects_with_dependencies(bus: EventBus, recorder: Recorder) -> None:
    async def get_db() -> str:
        return "db"

    class Handler:
        async def __call__(self, event: Event, db: Annotated[str, Depends(get_db)]) -> None:
            recorder.add((event.name, db))

    bus.subscribe(Handler(), "x", name="object.handler")
    async with bus:
        await post(make_app(bus), "x")
        assert await recorder.wait_count(1) == [("x", "db")]


# -- overrides ---------------------------------------------------------------------------------------


async def test_dependency_overrides_are_honoured_also_when_set_after_the_app_started(
    bus: EventBus, recorder: Recorder
) -> None:
    async def get_db() -> str:
        return "real-db"

    async def get_repo(db: Annotated[str, Depends(get_db)]) -> str:
        return f"repo({db})"

    @bus.on("user.created")
    async def handler(repo: Annotated[str, Depends(get_repo)]) -> None:
        recorder.add(repo)

    app = make_app(bus)
    async with bus:
        await post(app, "user.created")
        app.dependency_overrides[get_db] = lambda: "fake-db"  # a sub-dependency, after start
        await post(app, "user.created")
        app.dependency_overrides[get_repo] = lambda: "fake-repo"
        await post(app, "user.created")
        app.dependency_overrides.clear()
        await post(app, "user.created")
        items = await recorder.wait_count(4)
    assert items == ["repo(real-db)", "repo(fake-db)", "fake-repo", "repo(real-db)"]


# Starlette < 0.37's TestClient uses httpx's deprecated app= shortcut (the oldest FastAPI tested)
@pytest.mark.filterwarnings("ignore:The 'app' shortcut is now deprecated:DeprecationWarning")
def test_overrides_with_testclient_as_tests_write_them(recorder: Recorder) -> None:
    bus = EventBus(name="testclient")

    async def get_db() -> AsyncIterator[str]:
        yield "postgres"

    @bus.on("user.created")
    async def handler(user_id: int, db: Annotated[str, Depends(get_db)]) -> None:
        recorder.add((user_id, db))

    app = make_app(bus)

    async def fake_db() -> AsyncIterator[str]:
        yield "sqlite-in-memory"

    app.dependency_overrides[get_db] = fake_db
    with TestClient(app) as http:  # runs the lifespan: the bus starts and drains with the app
        assert http.post("/emit/user.created").status_code == 200
        assert recorder.items == [(7, "sqlite-in-memory")]  # handled before post() returned


def test_dependencies_see_the_state_the_lifespan_yielded(recorder: Recorder) -> None:
    bus = EventBus(name="lifespan-state")

    async def pool(request: Request) -> tuple[str, bool]:
        touched = hasattr(request.state, "touched")
        request.state.touched = True  # a copy per run: the next run does not see it
        return str(request.state.pool), touched

    @bus.on("user.created")
    async def handler(user_id: int, db: Annotated[tuple[str, bool], Depends(pool)]) -> None:
        recorder.add((user_id, db))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"pool": "pool-1"}

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.post("/emit")
    async def emit_endpoint(request: Request) -> dict[str, bool]:
        emit("user.created", {"user_id": 7})
        return {"touched": hasattr(request.state, "touched")}

    with TestClient(app) as http:
        assert http.post("/emit").json() == {"touched": False}
        assert http.post("/emit").json() == {"touched": False}
    assert recorder.items == [(7, ("pool-1", False)), (7, ("pool-1", False))]
    assert bus.lifespan_state is None  # the ended lifespan's state is not kept for later runs


@pytest.mark.parametrize("wrapped", ["add_middleware", "by_hand"])
def test_each_app_the_bus_serves_in_turn_gets_its_own_overrides(recorder: Recorder, wrapped: str) -> None:
    # one bus at module level, an app factory per test: the usual shape of a test suite
    bus = EventBus(name="next-app")

    def source() -> str:
        return "real"

    @bus.on("user.created")
    async def handler(user_id: int, origin: Annotated[str, Depends(source)]) -> None:
        recorder.add(origin)

    def make(origin: str) -> Any:
        app = FastAPI()
        if wrapped == "add_middleware":
            app.add_middleware(TidingsMiddleware, bus=bus)
        app.dependency_overrides[source] = lambda: origin

        @app.post("/emit")
        async def emit_endpoint() -> None:
            emit("user.created", {"user_id": 1})

        return app if wrapped == "add_middleware" else TidingsMiddleware(app, bus=bus)

    with TestClient(make("first")) as http:
        assert http.post("/emit").status_code == 200
    # no lifespan from here on: each test client's request starts the bus, and names its app
    assert TestClient(make("second")).post("/emit").status_code == 200
    assert TestClient(make("third")).post("/emit").status_code == 200
    with TestClient(make("fourth")) as http:
        assert http.post("/emit").status_code == 200
    assert recorder.items == ["first", "second", "third", "fourth"]


# -- failures ----------------------------------------------------------------------------------------


async def test_a_failing_dependency_fails_its_handler_only(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError]
) -> None:
    async def broken() -> str:
        raise ConnectionError("database down")

    @bus.on("user.created", name="needs.db")
    async def needs_db(db: Annotated[str, Depends(broken)]) -> None:
        recorder.add("needs_db ran")  # pragma: no cover - never reached

    @bus.on("user.created")
    async def plain(user_id: int) -> None:
        recorder.add(("plain", user_id))

    async with bus:
        await post(make_app(bus), "user.created")
        await recorder.wait_count(1)
    assert recorder.items == [("plain", 7)]
    [failure] = failures
    assert failure.handler == "needs.db"
    assert isinstance(failure.__cause__, ConnectionError)


async def test_an_override_with_an_unsatisfiable_parameter_fails_the_handler(
    bus: EventBus, failures: list[HandlerError]
) -> None:
    async def get_user() -> str:
        return "ann"

    @bus.on("x", name="needs.user")
    async def handler(user: Annotated[str, Depends(get_user)]) -> None: ...

    def needs_query(token: int = Query(...)) -> str:  # pragma: no cover - never called
        return "never"

    app = make_app(bus)
    app.dependency_overrides[get_user] = needs_query
    async with bus:
        await post(app, "x")
    [failure] = failures
    assert failure.handler == "needs.user"
    assert "could not be solved" in str(failure)


# -- what dependencies receive ----------------------------------------------------------------------


async def test_a_dependency_asking_for_the_request_gets_the_app(bus: EventBus, recorder: Recorder) -> None:
    async def app_state(request: Request) -> tuple[Any, str, str]:
        return request.app, request.app.state.greeting, request.scope["tidings.event"].name

    @bus.on("user.created")
    async def handler(state: Annotated[tuple[Any, str, str], Depends(app_state)]) -> None:
        recorder.add(state)

    app = make_app(bus)
    app.state.greeting = "hello"
    async with bus:
        await post(app, "user.created")
        [(seen_app, greeting, name)] = await recorder.wait_count(1)
    assert seen_app is app
    assert (greeting, name) == ("hello", "user.created")


async def test_background_tasks_of_dependencies_run_before_the_cleanup(
    bus: EventBus, recorder: Recorder
) -> None:
    async def session() -> AsyncIterator[str]:
        yield "session"
        recorder.add("close")

    async def notifier(tasks: BackgroundTasks, s: Annotated[str, Depends(session)]) -> str:
        tasks.add_task(recorder.add, "background task")
        return "notifier"

    @bus.on("x")
    async def handler(n: Annotated[str, Depends(notifier)]) -> None:
        recorder.add("handler")

    async with bus:
        await post(make_app(bus), "x")
        assert await recorder.wait_count(3) == ["handler", "background task", "close"]


async def test_security_dependencies_get_their_scopes(bus: EventBus, recorder: Recorder) -> None:
    async def principal(scopes: SecurityScopes) -> list[str]:
        return scopes.scopes

    @bus.on("x")
    async def handler(scopes: Annotated[list[str], Security(principal, scopes=["mail:send"])]) -> None:
        recorder.add(scopes)

    async with bus:
        await post(make_app(bus), "x")
        assert await recorder.wait_count(1) == [["mail:send"]]


async def test_dependencies_beside_typed_events_and_fields(bus: EventBus, recorder: Recorder) -> None:
    @dataclass
    class UserCreated:
        __event_name__ = "user.registered"
        user_id: int
        email: str

    async def get_db() -> str:
        return "db"

    @bus.on(UserCreated)
    async def typed(user: UserCreated, db: Annotated[str, Depends(get_db)]) -> None:
        recorder.add(("typed", user.user_id, db))

    @bus.on(UserCreated)
    async def fields(db: Annotated[str, Depends(get_db)], email: str, user_id: int) -> None:
        recorder.add(("fields", email, user_id, db))

    @bus.on("payment.processed")
    async def arguments(payment_id: str, db: Annotated[str, Depends(get_db)], amount: float) -> None:
        recorder.add(("arguments", payment_id, amount, db))

    app = FastAPI()
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.post("/register")
    async def register() -> None:
        emit(UserCreated(user_id=1, email="ann@example.com"))

    async with bus:
        async with client(app) as http:
            assert (await http.post("/register")).status_code == 200
        assert not await bus.emit_now("payment.processed", "p-1", 9.99)
        items = await recorder.wait_count(3)
    assert sorted(items) == sorted(
        [
            ("typed", 1, "db"),
            ("fields", "ann@example.com", 1, "db"),
            ("arguments", "p-1", 9.99, "db"),
        ]
    )


# -- without the middleware --------------------------------------------------------------------------


async def test_a_bus_without_an_app_solves_dependencies_without_overrides(recorder: Recorder) -> None:
    bus = EventBus(name="script")

    async def get_db() -> AsyncIterator[str]:
        yield "db"
        recorder.add("closed")

    async def app_of(request: Request) -> Any:
        return request.app

    @bus.on("report.requested")
    async def handler(db: Annotated[str, Depends(get_db)], app: Annotated[Any, Depends(app_of)]) -> None:
        recorder.add((db, app))

    async with bus:  # a script: no app, no middleware
        assert bus.app is None
        assert not await bus.emit_now("report.requested")
        assert recorder.items == [("db", None), "closed"]

        # an app set by hand brings its overrides
        app = FastAPI()
        app.dependency_overrides[get_db] = lambda: "override"
        bus.app = app
        assert not await bus.emit_now("report.requested")
    assert recorder.items[-1] == ("override", app)


# -- bad declarations fail at registration ---------------------------------------------------------


@pytest.mark.parametrize(
    ("requires", "message"),
    [
        pytest.param("query", "outer -> needs_query requires the query parameter 'page'", id="query"),
        pytest.param("header", "outer -> needs_header requires the header 'authorization'", id="header"),
        pytest.param("websocket", "outer -> needs_websocket asks for a WebSocket", id="websocket"),
    ],
)
def test_dependencies_that_need_a_real_request_fail_at_registration(requires: str, message: str) -> None:
    bus = EventBus()

    def needs_query(page: int = Query(...)) -> int:  # pragma: no cover - never called
        return page

    def needs_header(authorization: str = Header()) -> str:  # pragma: no cover - never called
        return authorization

    def needs_websocket(ws: WebSocket) -> WebSocket:  # pragma: no cover - never called
        return ws

    dependency = {"query": needs_query, "header": needs_header, "websocket": needs_websocket}[requires]

    async def outer(value: Annotated[Any, Depends(dependency)]) -> Any:  # pragma: no cover
        return value

    with pytest.raises(ConfigurationError) as caught:

        @bus.on("x", name="bad")
        async def handler(v: Annotated[Any, Depends(outer)]) -> None: ...

    assert str(caught.value).startswith("handler bad: dependency ")
    assert message in str(caught.value)
    assert len(bus.registry) == 0


def test_optional_request_parameters_are_fine() -> None:
    bus = EventBus()

    def paginate(page: int = 1, x_tenant: str | None = Header(None)) -> int:
        return page

    @bus.on("x")
    async def handler(page: Annotated[int, Depends(paginate)]) -> None: ...

    assert len(bus.registry) == 1


def test_unresolvable_dependency_annotations_fail_at_registration() -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError, match="cannot be resolved"):

        @bus.on("x")
        async def handler(db: "Annotated[Session, Depends(get_db)]") -> None: ...  # type: ignore[name-defined]  # noqa: F821


@pytest.mark.parametrize("annotation", [Request, WebSocket, BackgroundTasks, SecurityScopes, Response])
def test_a_request_object_taken_by_the_handler_itself_fails_at_registration(annotation: type) -> None:
    # FastAPI fills them for a dependency that asks; as the handler's own parameter they were read
    # as a payload field, and every call failed
    bus = EventBus()

    async def handler(event: Event, thing: Any) -> None: ...

    handler.__annotations__["thing"] = annotation
    with pytest.raises(ConfigurationError, match=f"takes thing: {annotation.__qualname__}, which handlers"):
        bus.subscribe(handler, "x")
    bus.subscribe(handler, "x", bind="arguments")  # the emit's arguments fill it: whatever it is


async def test_a_request_object_that_is_a_field_of_the_event_is_the_handlers_to_take() -> None:
    class ResponseSent(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
        response: Response
        path: str

    bus = EventBus()
    seen: list[tuple[int, str]] = []

    @bus.on(ResponseSent)
    async def handler(response: Response, path: str) -> None:
        seen.append((response.status_code, path))

    async with bus:
        assert await bus.emit_now(ResponseSent(response=Response(status_code=201), path="/x")) == ()
    assert seen == [(201, "/x")]


def test_a_dependency_fastapi_rejects_fails_at_registration() -> None:
    bus = EventBus()

    class NotAField:
        pass

    def weird(value: NotAField) -> None:  # pragma: no cover - never called
        return None

    with pytest.raises(ConfigurationError, match="FastAPI cannot use"):

        @bus.on("x")
        async def handler(w: Annotated[None, Depends(weird)]) -> None: ...


def test_positional_only_parameters_after_a_dependency_fail_at_registration() -> None:
    bus = EventBus()

    async def get_db() -> str:  # pragma: no cover - never called
        return "db"

    with pytest.raises(ConfigurationError, match="positional-only"):

        @bus.on("x")
        async def handler(db: Annotated[str, Depends(get_db)], amount: float, /) -> None: ...


async def _never_opened() -> str:  # pragma: no cover - a registration that names it is refused
    return "db"


class _HandleWithDependency:
    async def handle(self, event: Event, db: str = Depends(_never_opened)) -> None: ...


class _HandleManyWithDependency:
    async def handle_many(self, events: list[Event], db: Annotated[str, Depends(_never_opened)]) -> None: ...


async def _batch_with_dependency(events: list[Event], db: Annotated[str, Depends(_never_opened)]) -> None: ...


async def _batch_with_unresolvable_dependency(
    events: list[Event],
    db: "Annotated[Session, Depends(get_db)]",  # type: ignore[name-defined]  # noqa: F821
) -> None: ...


@pytest.mark.parametrize(
    ("handler", "batch", "what"),
    [
        pytest.param(_batch_with_dependency, True, "a batch handler declares", id="batch"),
        pytest.param(_batch_with_unresolvable_dependency, True, "a batch handler declares", id="batch-text"),
        pytest.param(_HandleWithDependency(), False, "its handle() declares", id="handle"),
        pytest.param(_HandleManyWithDependency(), False, "its handle_many() declares", id="handle_many"),
    ],
)
def test_dependencies_where_none_are_solved_fail_at_registration(
    handler: object, batch: bool, what: str
) -> None:
    # Only handler functions taking one event get their dependencies solved: these were accepted, then
    # called with the Depends marker itself, or without the argument at every event.
    bus = EventBus()
    message = f"handler bad: {what} FastAPI dependencies ('db')"
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        bus.subscribe(handler, "x", batch=batch, name="bad")
    assert len(bus.registry) == 0


def test_handler_objects_and_batch_handlers_without_dependencies_register() -> None:
    bus = EventBus()

    class Forwarder:
        async def handle_many(self, events: list[Event], limit: int = 10) -> None: ...

    async def batch(events: list[Event]) -> None: ...

    bus.subscribe(Forwarder(), "x")
    bus.on("x", batch=True)(batch)
    assert len(bus.registry) == 2


def test_the_background_tasks_of_a_left_behind_call_on_a_loop_that_closed_are_reported_on_the_next() -> None:
    # The bus was never closed and its loop closed (by hand, as a test's) while the call's
    # background task ran there: that task can never end. The next loop the bus starts on reports
    # the call unfinished, with what it emitted, rather than wait for it (a drain would wait out
    # its bound, then fail on cancelling a task of a closed loop).
    failures = Recorder()
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="test")
    running = asyncio.Event()

    async def notify() -> None:
        emit("mail.queued")
        running.set()
        await asyncio.Event().wait()  # a mail server that never answers

    hangs_with_a_background_task(bus, release, notify)

    @bus.on("mail.queued", name="on_mail")
    async def on_mail(event: Event) -> None:  # pragma: no cover - its event is reported, never run
        failures.add("on_mail ran")

    async def first() -> None:
        await bus.start()
        bus.emit("slow", 1)
        await failures.wait_count(1)  # left behind past its timeout
        release.set()
        await asyncio.wait_for(running.wait(), 5)  # its thread returned; its background task runs

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(first())
    finally:
        loop.close()  # with the background task still pending there
    [rest] = bus._runner.rests

    async def second() -> None:
        await bus.start()
        await bus.drain(0)  # nothing is left that could finish: no cut-off
        await bus.aclose()

    asyncio.run(second())
    assert [(type(f).__name__, f.handler) for f in failures.items] == [
        ("HandlerTimeoutError", "hangs"),
        ("HandlerCancelledError", "hangs"),
        ("HandlerCancelledError", "on_mail"),
    ]
    assert "its event loop closed before it finished" in str(failures.items[1])
    assert bus._runner.left_behind == {} and bus._runner.rests == set()
    assert not rest.done()  # (it never ends: collected here, where asyncio's report of it is captured)
    del rest
    gc.collect()
