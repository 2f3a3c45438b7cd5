"""Every record tidings logs about an event or a handler names them, in words and in ``extra`` fields."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import tidings
from tidings import Event, EventBus, HandlerError, RetryPolicy, TidingsMiddleware, emit
from tidings.observability import LOG_FIELDS, EventContextFilter
from tidings.store import DeadLetter, MemoryStore, SQLiteStore

from ..conftest import Recorder, Records

pytestmark = pytest.mark.anyio


def fields(record: logging.LogRecord) -> tuple[object, object, object]:
    event, event_id, handler = (getattr(record, name) for name in LOG_FIELDS)
    return event, event_id, handler


def says(record: logging.LogRecord, *parts: str) -> bool:
    message = record.getMessage()
    return all(part in message for part in parts)


# -- handler calls ----------------------------------------------------------------------------------


async def test_a_failed_call_and_its_retry_name_the_event_its_id_and_the_handler(records: Records) -> None:
    bus = EventBus(retry=RetryPolicy(max_attempts=2, backoff=0.01, jitter=0))

    @bus.on("invoice.due", name="billing.send")
    async def send(event: Event) -> None:
        raise ConnectionError("mail server down")

    async with bus:
        await bus.emit_now("invoice.due")
        retrying = await records.wait_for("retrying in")
        dead = await records.wait_for("now a dead letter")
    for record in (retrying, dead):
        name, event_id, handler = fields(record)
        assert (name, handler) == ("invoice.due", "billing.send")
        assert isinstance(event_id, str) and len(event_id) == 26
        assert says(record, "invoice.due", event_id, "billing.send")


async def test_a_timed_out_async_call_names_them(records: Records) -> None:
    bus = EventBus()

    @bus.on("slow", name="hangs", timeout=0.05)
    async def hangs(event: Event) -> None:
        await asyncio.Event().wait()

    async with bus:
        bus.emit("slow")
        record = await records.wait_for("timed out")
    assert fields(record)[::2] == ("slow", "hangs")
    assert says(record, "'slow'", str(fields(record)[1]), "hangs")


async def test_a_sync_call_past_its_timeout_names_them(records: Records) -> None:
    bus = EventBus()
    release = threading.Event()

    @bus.on("slow", name="blocks", timeout=0.05)
    def blocks(event: Event) -> None:
        release.wait(5)

    async with bus:
        bus.emit("slow")
        record = await records.wait_for("has run past its timeout")
        release.set()
    assert fields(record)[::2] == ("slow", "blocks")
    assert says(record, "'slow'", str(fields(record)[1]), "blocks")


async def test_an_on_failure_hook_that_raises_names_them(records: Records) -> None:
    def hook(error: HandlerError) -> None:
        raise RuntimeError("hook bug")

    bus = EventBus(on_failure=hook)
    bus.on("a", name="broken")(lambda event: 1 / 0)
    async with bus:
        bus.emit("a")
        record = await records.wait_for("the on_failure hook raised")
    assert fields(record)[::2] == ("a", "broken")
    assert says(record, "'a'", str(fields(record)[1]))


async def test_a_tap_that_raises_names_the_event(records: Records) -> None:
    bus = EventBus()
    bus.tap(lambda event: 1 / 0)
    bus.emit("a")
    record = await records.wait_for("a tap of bus")
    name, event_id, handler = fields(record)
    assert (name, handler) == ("a", None)
    assert says(record, "'a'", str(event_id))
    await bus.aclose()


# -- dropped events ---------------------------------------------------------------------------------


async def test_an_event_emitted_after_the_bus_closed_names_the_event(records: Records) -> None:
    bus = EventBus()
    async with bus:
        pass
    bus.emit("late")
    record = await records.wait_for("was dropped because the bus is closed")
    assert fields(record) == ("late", None, None)  # never handed to a handler: it has no id
    assert says(record, "'late'")


async def test_an_event_with_no_bus_to_go_to_names_the_event(records: Records) -> None:
    def in_a_plain_thread() -> None:
        emit("orphan")

    thread = threading.Thread(target=in_a_plain_thread)
    thread.start()
    thread.join()
    record = await records.wait_for("no tidings bus is running")
    assert fields(record) == ("orphan", None, None)


async def test_a_failed_requests_dropped_events_are_named_one_by_one(records: Records) -> None:
    bus = EventBus(request_errors="drop")
    bus.on("*")(lambda event: None)

    async def fails(request: Request) -> PlainTextResponse:
        emit("user.created")
        emit("user.welcomed")
        raise RuntimeError("boom")

    # inside Starlette's error middleware, which sends the 500 after the app raised
    app = Starlette(routes=[Route("/", fails)], middleware=[Middleware(TidingsMiddleware, bus=bus)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with bus, httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/")).status_code == 500
    dropped = [r for r in records.recorder.items if "of a request was dropped" in r.getMessage()]
    assert [fields(r) for r in dropped] == [("user.created", None, None), ("user.welcomed", None, None)]


# -- the store ---------------------------------------------------------------------------------------


async def test_an_event_the_log_refuses_names_the_event_and_its_id(records: Records, tmp_path: Path) -> None:
    bus = EventBus(store=SQLiteStore(tmp_path / "log.db"))
    bus.on("a")(lambda event: None)
    async with bus:
        bus.emit("a", object())
        record = await records.wait_for("it is handled now, but not durably")
    name, event_id, handler = fields(record)
    assert (name, handler) == ("a", None)
    assert says(record, "'a'", str(event_id))


async def test_a_delivery_whose_handler_is_gone_names_all_three(records: Records, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    event = Event("report", {"month": 11})
    await store.record([(event, "reports.old")], lease=0.0)
    await store.aclose()

    bus = EventBus(store=SQLiteStore(tmp_path / "log.db"), resubmit_after=0.2)
    bus.on("report", name="reports.new")(lambda event: None)
    async with bus:
        record = await records.wait_for("no handler named")
    assert fields(record) == ("report", event.id, "reports.old")
    assert says(record, "'report'", event.id, "'reports.old'")


async def test_a_dead_letter_replay_with_no_handler_names_all_three(records: Records) -> None:
    bus = EventBus()
    event = Event("invoice.due")
    bus.store.bury([DeadLetter(event, "billing.gone", 1, "ValueError: x", "", DeadLetter.now())])
    async with bus:
        await bus.dead_letters.replay(all=True)
    record = await records.wait_for("not replayed")
    assert fields(record) == ("invoice.due", event.id, "billing.gone")
    assert says(record, "'invoice.due'", event.id, "'billing.gone'")


async def test_a_dead_letter_the_memory_store_drops_names_all_three(records: Records) -> None:
    bus = EventBus(store=MemoryStore(max_dead_letters=1))
    bus.on("a", name="broken")(lambda event: 1 / 0)
    async with bus:
        await bus.emit_now("a", 1)
        await bus.emit_now("a", 2)
        await bus.drain()
    record = await records.wait_for("the in-memory store keeps at most 1")
    name, event_id, handler = fields(record)
    assert (name, handler) == ("a", "broken")
    assert says(record, "'a'", str(event_id), "broken")


async def test_an_outbox_event_of_a_rolled_back_transaction_names_the_event(
    records: Records, tmp_path: Path
) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from tidings.integrations.sqlalchemy import Outbox

    path = tmp_path / "shop.db"
    bus = EventBus(store=SQLiteStore(path))
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")
    async with bus:
        with Session(engine) as session, session.begin():
            event = outbox.emit(session, "order.placed", {"order": 7})
            session.rollback()
    engine.dispose()
    record = await records.wait_for("of a rolled-back transaction was discarded")
    assert fields(record) == ("order.placed", event.id, None)


# -- records your code logs inside handlers -------------------------------------------------------------


def database() -> str:  # a FastAPI dependency, at module level: the annotations are strings here
    return "db"


@pytest.fixture
def shop_log() -> Iterator[tuple[logging.Logger, Recorder]]:
    recorder = Recorder()
    handler = Records(recorder)
    handler.addFilter(EventContextFilter())
    logger = logging.getLogger("tests.shop")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, recorder
    logger.removeHandler(handler)


async def test_the_filter_names_the_handler_call_a_record_was_logged_in(
    shop_log: tuple[logging.Logger, Recorder],
) -> None:
    log, seen = shop_log
    bus = EventBus()
    ids: dict[str, str] = {}

    @bus.on("order.paid", name="mail.receipt")
    async def receipt(event: Event) -> None:
        ids["async"] = event.id
        log.info("async handler")

    @bus.on("order.paid", name="ledger.book")
    def book(event: Event) -> None:
        ids["sync"] = event.id
        log.info("sync handler")

    @bus.on("order.paid", name="search.index", batch=True)
    async def index(events: list[Event]) -> None:
        log.info("batch handler")

    async with bus:
        await bus.emit_now("order.paid")
        log.info("outside")
    by_text = {record.getMessage(): fields(record) for record in seen.items}
    assert by_text == {
        "async handler": ("order.paid", ids["async"], "mail.receipt"),
        "sync handler": ("order.paid", ids["sync"], "ledger.book"),
        "batch handler": ("order.paid", None, "search.index"),
        "outside": (None, None, None),
    }


async def test_the_filter_does_not_credit_a_handler_with_a_request_tasks_records(
    shop_log: tuple[logging.Logger, Recorder],
) -> None:
    log, seen = shop_log
    bus = EventBus()
    go = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def background() -> None:  # started by the request; shares its context (and so its job)
        await go.wait()
        log.info("background task")

    async def index(request: Request) -> PlainTextResponse:
        tasks.add(asyncio.create_task(background()))
        emit("a")
        return PlainTextResponse("ok")

    @bus.on("a", name="waits")
    async def waits(event: Event) -> None:
        go.set()
        await seen.wait_for(lambda items: any(r.getMessage() == "background task" for r in items))
        log.info("handler")

    app = TidingsMiddleware(Starlette(routes=[Route("/", index)]), bus=bus)
    async with bus, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.get("/")).status_code == 200
    await asyncio.gather(*tasks)
    by_text = {record.getMessage(): fields(record)[::2] for record in seen.items}
    assert by_text == {"background task": (None, None), "handler": ("a", "waits")}


def test_the_filter_keeps_the_fields_a_record_has() -> None:
    record = logging.LogRecord("tidings", logging.ERROR, __file__, 1, "x", None, None)
    record.__dict__.update(tidings_event="a", tidings_event_id="01", tidings_handler="h")
    assert EventContextFilter().filter(record)
    assert fields(record) == ("a", "01", "h")
    assert tidings.observability.__all__ == ["LOG_FIELDS", "EventContextFilter"]


async def test_the_filter_names_a_plain_def_handler_with_dependencies(
    shop_log: tuple[logging.Logger, Recorder],
) -> None:
    log, seen = shop_log
    bus = EventBus()

    @bus.on("order.paid", name="ledger.book")
    def book(event: Event) -> None:  # the job's own sync hop
        log.info("plain handler")

    @bus.on("order.paid", name="mail.receipt")
    def receipt(event: Event, db: Annotated[str, Depends(database)]) -> None:  # a thread hop of its own
        log.info("handler with dependencies")

    async with bus:
        assert await bus.emit_now("order.paid") == ()
    by_text = {record.getMessage(): fields(record)[::2] for record in seen.items}
    assert by_text == {
        "plain handler": ("order.paid", "ledger.book"),
        "handler with dependencies": ("order.paid", "mail.receipt"),
    }


a_started = threading.Event()
b_logged = threading.Event()


def logging_database() -> str:  # a plain def dependency: FastAPI runs it in its thread pool
    assert a_started.wait(5), "the sync handler did not start"
    logging.getLogger("tests.shop").info("dependency opens the db")
    b_logged.set()
    return "db"


async def test_the_filter_names_the_handler_of_a_dependency_run_in_fastapis_thread_pool(
    shop_log: tuple[logging.Logger, Recorder],
) -> None:
    log, seen = shop_log
    bus = EventBus()
    a_started.clear()
    b_logged.clear()

    @bus.on("order.paid", name="ledger.book")
    def book(event: Event) -> None:  # runs in the job's worker thread meanwhile
        a_started.set()
        log.info("plain handler")
        assert b_logged.wait(5), "the dependency did not log"

    @bus.on("order.paid", name="mail.receipt")
    async def receipt(event: Event, db: Annotated[str, Depends(logging_database)]) -> None:
        log.info("async handler")

    async with bus:
        assert await bus.emit_now("order.paid") == ()
    by_text = {record.getMessage(): fields(record)[::2] for record in seen.items}
    assert by_text == {
        "plain handler": ("order.paid", "ledger.book"),
        "dependency opens the db": ("order.paid", "mail.receipt"),
        "async handler": ("order.paid", "mail.receipt"),
    }
