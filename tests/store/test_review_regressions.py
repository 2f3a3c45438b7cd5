"""Regressions from the review of the durable log: each of these lost, doubled or hung something."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tidings import (
    Event,
    EventBus,
    HandlerCancelledError,
    HandlerError,
    RetryPolicy,
    StoreError,
    TidingsMiddleware,
)
from tidings.integrations.sqlalchemy import Outbox
from tidings.store import SQLiteStore
from tidings.store.postgres import PostgresStore

from ..conftest import POSTGRES_DSN, Recorder, Records

pytestmark = pytest.mark.anyio

LEASE = 0.2  # resubmit_after in the lease tests below: the relay looks at the log every 0.05 s


class ClaimWatch:
    """Spies on a store's ``claim()``, so that a long handler can wait, with a deadline, until the
    relay has looked for deliveries whose lease ran out well after its own lease would have."""

    def __init__(self, store: SQLiteStore) -> None:
        self._waiters: list[tuple[float, threading.Event | asyncio.Event]] = []
        self._lock = threading.Lock()
        claim = store.claim

        async def watched(*args: Any, **kwargs: Any) -> Any:
            claimed = await claim(*args, **kwargs)  # (on the loop: an asyncio.Event may be set here)
            now = time.monotonic()
            with self._lock:
                for moment, reached in self._waiters:
                    if now > moment:
                        reached.set()
            return claimed

        store.claim = watched  # type: ignore[method-assign]

    def _after(self, leases: int, reached: threading.Event | asyncio.Event) -> None:
        with self._lock:
            self._waiters.append((time.monotonic() + leases * LEASE, reached))

    def wait_in_thread(self, leases: int) -> None:
        """Block until a claim has come back ``leases`` leases from now."""
        reached = threading.Event()
        self._after(leases, reached)
        assert reached.wait(10), "the relay stopped looking at the log"

    async def wait(self, leases: int) -> None:
        """Wait until a claim has come back ``leases`` leases from now."""
        reached = asyncio.Event()
        self._after(leases, reached)
        with anyio.fail_after(10):
            await reached.wait()


async def test_a_parent_stays_in_the_log_until_the_events_it_emitted_are_recorded(
    tmp_path: Path, recorder: Recorder
) -> None:
    bus = EventBus(store=SQLiteStore(tmp_path / "log.db"), handler_timeout=None)
    store = bus.store
    assert isinstance(store, SQLiteStore)
    sibling_may_finish = threading.Event()

    @bus.on("order.paid", name="a.notify")
    async def notify(event: Event) -> None:
        bus.emit("invoice.send", event.payload)

    @bus.on("order.paid", name="b.slow")
    def slow(event: Event) -> None:
        recorder.add("slow started")
        sibling_may_finish.wait(10)

    @bus.on("invoice.send", name="c.invoice")
    async def invoice(event: Event) -> None:
        recorder.add("invoiced")

    async with bus:
        bus.emit("order.paid", {"order": 1})
        await recorder.wait_count(1)
        await asyncio.sleep(0.05)
        await store.flush()
        # invoice.send is not in the log yet, so a.notify, which emitted it, must still be
        assert await store.pending_count() == 2
        sibling_may_finish.set()
        await recorder.wait_count(2)
        await bus.drain()
        await store.flush()
        assert await store.pending_count() == 0


async def test_a_call_failing_after_shutdown_arms_no_retry_and_is_reported_once(
    failures: list[HandlerError], records: Records
) -> None:
    release = threading.Event()
    bus = EventBus(
        on_failure=failures.append, drain_timeout=0.05, retry=RetryPolicy(max_attempts=3, backoff=0.01)
    )

    @bus.on("x", name="late")
    def late(event: Event) -> None:
        release.wait(10)
        raise ValueError("too late")

    async with bus:
        bus.emit("x")
        await asyncio.sleep(0.01)
    release.set()  # the bus is closed; the handler fails now
    logged = await records.wait_for("late raised ValueError after it was reported as unfinished")
    assert logged.exc_info is not None  # with its traceback
    assert bus._runner.retries == set()
    # the drain bound reported it, once; its failure after that is only logged
    assert [(type(f), f.retry_in) for f in failures] == [(HandlerCancelledError, None)]


async def test_a_finished_call_waiting_for_a_slow_sibling_keeps_its_lease(tmp_path: Path) -> None:
    runs: dict[str, int] = {"fast": 0, "slow": 0}
    store = SQLiteStore(tmp_path / "log.db")
    watch = ClaimWatch(store)
    bus = EventBus(store=store, resubmit_after=LEASE, handler_timeout=None)

    @bus.on("x", name="fast")
    async def fast(event: Event) -> None:
        runs["fast"] += 1

    @bus.on("x", name="slow")
    def slow(event: Event) -> None:
        runs["slow"] += 1
        watch.wait_in_thread(leases=4)  # runs on while the relay claims, four leases on

    async with bus:
        bus.emit("x")
        await bus.flush()
        await bus.drain()
    assert runs == {"fast": 1, "slow": 1}


async def test_a_replay_without_resubmission_still_renews_its_lease(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    runs: list[str] = []
    failing = EventBus(store=SQLiteStore(path))

    @failing.on("x", name="work")
    async def fails(event: Event) -> None:
        raise ValueError("first")

    async with failing:
        failing.emit("x")
        await failing.drain()

    watch: ClaimWatch | None = None  # on the app's log: only its relay claims

    def make(who: str) -> EventBus:
        bus = EventBus(store=SQLiteStore(path), resubmit_after=LEASE)

        @bus.on("x", name="work")
        async def work(event: Event) -> None:
            runs.append(who)
            if who == "cli":  # (a run in the app is the failure, and shows in `runs`)
                assert watch is not None
                await watch.wait(leases=4)  # runs on while the app's relay claims, four leases on

        return bus

    cli, app = make("cli"), make("app")
    assert isinstance(app.store, SQLiteStore)
    watch = ClaimWatch(app.store)
    await cli.start(resubmit=False)
    async with app:  # a running app with a relay, on the same log
        result = await cli.dead_letters.replay(all=True)
        assert len(result.succeeded) == 1
        await cli.aclose()
        await app.drain()
    assert runs == ["cli"]


async def test_an_outbox_event_waiting_for_its_response_keeps_its_lease(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    store = SQLiteStore(path)
    watch = ClaimWatch(store)
    bus = EventBus(store=store, resubmit_after=LEASE)
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")
    runs: list[int] = []

    @bus.on("user.created", name="mail.welcome")
    async def welcome(event: Event) -> None:
        runs.append(1)

    async def create_user(request: Request) -> PlainTextResponse:
        with Session(engine) as session, session.begin():
            outbox.emit(session, "user.created", {"user": 1})
        await watch.wait(leases=4)  # the request goes on for four leases after its commit
        return PlainTextResponse("created", status_code=201)

    app = TidingsMiddleware(Starlette(routes=[Route("/users", create_user, methods=["POST"])]), bus=bus)
    async with bus:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.post("/users")).status_code == 201
        await bus.drain()
    assert runs == [1]
    engine.dispose()


async def test_flush_raises_when_the_log_refused_the_events(tmp_path: Path) -> None:
    bus = EventBus(store=SQLiteStore(tmp_path / "log.db"))

    @bus.on("x")
    async def handler(event: Event) -> None: ...

    async def refuse(*args: Any, **kwargs: Any) -> dict[str, str]:
        raise StoreError("database is locked")

    async with bus:
        bus._runner.store.record = refuse  # type: ignore[method-assign]
        bus.emit("x")
        with pytest.raises(StoreError, match="refused 1 job"):
            await bus.flush()


async def test_closing_a_postgres_log_that_stopped_answering_is_bounded(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostgresStore(POSTGRES_DSN, schema=pg_schema, close_timeout=0.2)
    await store.open()

    async def hangs() -> None:
        await asyncio.Event().wait()

    store.flush = hangs  # type: ignore[method-assign]
    async with asyncio.timeout(5):
        await store.aclose()
    assert "did not answer within 0.2s while closing" in caplog.text


async def test_closing_a_postgres_log_mid_batch_settles_the_batch_it_cut_off(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostgresStore(POSTGRES_DSN, schema=pg_schema, close_timeout=0.2)
    await store.open()
    started = asyncio.Event()

    async def hangs(connection: Any) -> None:  # a statement that outlasts the close bound by far
        started.set()
        await connection.execute("SELECT pg_sleep(10)")

    awaited = asyncio.ensure_future(store._call(hangs, "write a slow row"))
    store.complete([("01J0000000000000000000000", "audit")])  # in the same batch, nobody awaits it
    await started.wait()
    store.complete([("01J0000000000000000000001", "audit"), ("01J0000000000000000000002", "audit")])
    async with asyncio.timeout(10):
        await store.aclose()
        with pytest.raises(StoreError, match="could not write a slow row: the log closed while writing it"):
            await awaited  # settled, not left waiting for a writer that is gone
    # each says what it was, the one cut off mid-transaction and the one still queued
    assert "could not complete 1 deliveries: the log closed while writing it" in caplog.text
    assert "could not complete 2 deliveries: the log closed before it was written" in caplog.text


async def test_the_postgres_writer_survives_a_reconnect_that_fails(pg_schema: str) -> None:
    store = PostgresStore(POSTGRES_DSN, schema=pg_schema)
    await store.open()
    real_connected = store._connected
    calls = 0

    async def second_connect_fails() -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError("connection refused")
        return await real_connected()

    async def broken(connection: Any) -> None:
        await connection.execute("SELECT * FROM no_such_table")

    store._connected = second_connect_fails  # type: ignore[method-assign]
    good = store._call(lambda connection: connection.fetchval("SELECT 1"), "select one")
    bad = store._call(broken, "break the batch")
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results)  # settled, not hung
    store._connected = real_connected  # type: ignore[method-assign]
    assert await store.pending_count() == 0  # the writer is still alive
    await store.aclose()


async def test_an_outbox_event_belongs_to_the_outermost_transaction(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "app.db"
    bus = EventBus(store=SQLiteStore(path))
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")

    @bus.on("n", name="audit")
    async def audit(event: Event) -> None:
        recorder.add(event.payload)

    async with bus:
        with Session(engine) as session:
            session.begin()
            with session.begin_nested():
                outbox.emit(session, "n", "rolled back outside")
            session.rollback()  # the savepoint's release was not a commit
        with Session(engine) as session:
            session.begin()
            with session.begin_nested():
                outbox.emit(session, "n", "committed")
            session.commit()
        await recorder.wait_count(1)
        await bus.drain()
    assert recorder.items == ["committed"]
    engine.dispose()


async def test_a_handler_under_two_matching_patterns_runs_once(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("order.*", "order.placed")
    async def audit(event: Event) -> None:
        recorder.add(event.name)

    async with bus:
        bus.emit("order.placed")
        await bus.drain()
    assert recorder.items == ["order.placed"]


async def test_a_committed_outbox_event_survives_a_request_that_fails_under_the_drop_policy(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "app.db"
    bus = EventBus(store=SQLiteStore(path), request_errors="drop")
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")

    @bus.on("*", name="audit")
    async def audit(event: Event) -> None:
        recorder.add(event.name)

    async def failing_app(scope: Any, receive: Any, send: Any) -> None:
        # a bare ASGI app that raises before any response: what "drop" is about
        with Session(engine) as session, session.begin():
            outbox.emit(session, "user.created", {"user": 1})  # committed
        bus.emit("user.mentioned")  # the request's own event: dropped with its failure
        raise RuntimeError("after the commit, before the response")

    app = TidingsMiddleware(failing_app, bus=bus)
    async with bus:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/users")).status_code == 500
        await recorder.wait_count(1)
        await bus.drain()
        assert bus._runner.released == {}  # recorded by its job: no lease renewed for ever
    assert recorder.items == ["user.created"]
    engine.dispose()


async def test_committed_outbox_events_nobody_here_handles_are_not_kept_for_renewal(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    bus = EventBus(store=SQLiteStore(path))
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")
    async with bus:
        with Session(engine) as session, session.begin():
            for n in range(10):
                outbox.emit(session, "unhandled.here", n)
        await bus.drain()
        assert bus._runner.released == {}
    engine.dispose()


async def test_a_sqlite_log_serves_reads_and_a_second_start_after_it_was_closed(
    tmp_path: Path, recorder: Recorder
) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    bus = EventBus(store=store)

    @bus.on("x", name="h")
    async def handler(event: Event) -> None:
        recorder.add(await store.pending_count())  # recorded before it runs
        if event.payload == "fail":
            raise RuntimeError("boom")

    async with bus:
        bus.emit("x", "fail")
        await bus.drain()
    assert [d.handler for d in await bus.dead_letters.list()] == ["h"]  # a read after close
    async with bus:  # the same store object, started again
        bus.emit("x", "ok")
        await recorder.wait_count(2)
    assert recorder.items == [1, 1]


async def test_flush_raises_when_a_payload_is_refused_by_the_log(tmp_path: Path) -> None:
    bus = EventBus(store=SQLiteStore(tmp_path / "log.db", max_payload_bytes=10))

    @bus.on("x")
    async def handler(event: Event) -> None: ...

    async with bus:
        bus.emit("x", "far more than ten bytes of payload")
        with pytest.raises(StoreError, match="over the event log's limit of 10"):
            await bus.flush()
