"""The transactional outbox: committed events are handled once, rolled-back ones never."""

from __future__ import annotations

import asyncio
import threading
import time as clock
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel
from sqlalchemy import Engine, create_engine, text
from sqlalchemy import event as sa_event
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.orm.session import JoinTransactionMode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tidings import (
    BusStateError,
    ConfigurationError,
    DrainTimeoutError,
    Event,
    EventBus,
    EventValidationError,
    SerializationError,
    TidingsMiddleware,
)
from tidings.integrations import sqlalchemy as outbox_module
from tidings.integrations.sqlalchemy import Outbox, arecord_once, record_once
from tidings.store import SQLiteStore
from tidings.store.postgres import PostgresStore

from ..conftest import POSTGRES_DSN, Recorder, Records

pytestmark = pytest.mark.anyio


def sqlite_bus(path: Path, **options: Any) -> EventBus:
    return EventBus(store=SQLiteStore(path), **options)


@pytest.fixture
def audited(tmp_path: Path, recorder: Recorder) -> Iterator[tuple[EventBus, Outbox, Engine]]:
    """A bus on a SQLite log, its :func:`audited_outbox`, and an engine on the log's database."""
    path = tmp_path / "app.db"
    bus = sqlite_bus(path)
    outbox = audited_outbox(bus, recorder)
    engine = create_engine(f"sqlite:///{path}")
    yield bus, outbox, engine
    engine.dispose()


def audited_outbox(bus: EventBus, recorder: Recorder) -> Outbox:
    """An outbox for ``bus``, whose handler "audit" gives ``recorder`` the payload of every event."""

    @bus.on("*", name="audit")
    async def audit(event: Event) -> None:
        recorder.add(event.payload)

    return Outbox(bus)


class NotesBase(DeclarativeBase):
    pass


class Note(NotesBase):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)


@dataclass
class Held:
    """A bus on a SQLite log whose handler "audit" gives ``recorder`` the payload of every "n"
    event and returns once ``released`` is set (a delivery's row goes once handled: this keeps the
    rows until the log is checked), its outbox, and an engine on the log's database with ``notes``."""

    path: Path
    bus: EventBus
    outbox: Outbox
    engine: Engine
    released: asyncio.Event


@pytest.fixture
def held(tmp_path: Path, recorder: Recorder) -> Iterator[Held]:
    path = tmp_path / "app.db"
    bus = sqlite_bus(path)
    released = asyncio.Event()

    @bus.on("n", name="audit")
    async def audit(event: Event) -> None:
        recorder.add(event.payload)
        await released.wait()

    engine = create_engine(f"sqlite:///{path}")
    NotesBase.metadata.create_all(engine)
    yield Held(path, bus, Outbox(bus), engine, released)
    engine.dispose()


@dataclass
class OrderPlaced:
    __event_name__ = "order.placed"
    order_id: int
    total: float


class InvoiceDue(BaseModel):  # no __event_name__: named after its class
    invoice: int


async def test_a_committed_event_is_handled_once_with_its_id_and_a_rolled_back_one_never(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "app.db"
    bus = sqlite_bus(path)
    outbox = Outbox(bus)

    @bus.on("order.*", name="orders.audit")
    async def audit(event: Event) -> None:
        recorder.add((event.name, event.id, event.payload))

    engine = create_engine(f"sqlite:///{path}")
    async with bus:
        with Session(engine) as session, session.begin():
            session.execute(text("CREATE TABLE orders (id INTEGER)"))
        with Session(engine) as session, session.begin():
            session.execute(text("INSERT INTO orders VALUES (1)"))
            placed = outbox.emit(session, "order.placed", {"order": 1})
        with Session(engine) as session:
            session.execute(text("INSERT INTO orders VALUES (2)"))
            outbox.emit(session, "order.placed", {"order": 2})
            session.rollback()
        with Session(engine) as session:
            session.begin()
            outbox.emit(session, "order.placed", {"order": 3})  # closed without a commit
        with Session(engine) as session, pytest.raises(BusStateError, match=r"session.begin\(\) first"):
            outbox.emit(session, "order.placed", {"order": 4})  # no transaction to belong to
        await recorder.wait_count(1)
        await bus.drain()
        await bus.store.flush()
        assert await bus.store.pending_count() == 0  # type: ignore[attr-defined]
    assert recorder.items == [("order.placed", placed.id, {"order": 1})]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id FROM orders")).scalars().all() == [1]
    engine.dispose()


async def test_out_of_order_commits_deliver_exactly_the_committed_events(
    audited: tuple[EventBus, Outbox, Engine], recorder: Recorder
) -> None:
    bus, outbox, engine = audited
    async with bus:
        first, second, third = Session(engine), Session(engine), Session(engine)
        for session in (first, second, third):
            session.begin()
        outbox.emit(first, "n", 1)
        outbox.emit(second, "n", 2)
        outbox.emit(third, "n", 3)
        second.commit()  # committed before the one that emitted first
        third.rollback()
        first.commit()
        for session in (first, second, third):
            session.close()
        await recorder.wait_count(2)
        await bus.drain()
    assert sorted(recorder.items) == [1, 2]


async def test_a_process_dying_between_commit_and_release_loses_nothing(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "app.db"
    dying = sqlite_bus(path, resubmit_after=0.2)
    outbox = Outbox(dying)
    dying.subscribe(lambda event: None, "invoice.due", name="billing.send")
    outbox._release = lambda session: None  # type: ignore[method-assign]  # the process dies here
    engine = create_engine(f"sqlite:///{path}")
    async with dying:
        with Session(engine) as session, session.begin():
            outbox.emit(session, "invoice.due", {"invoice": 9})

    restarted = sqlite_bus(path, resubmit_after=0.2)

    @restarted.on("invoice.due", name="billing.send")
    async def send(event: Event) -> None:
        recorder.add(event.payload)

    async with restarted:
        await recorder.wait_count(1)
    assert recorder.items == [{"invoice": 9}]  # from the log: JSON, as recorded in the transaction
    engine.dispose()


async def test_inside_a_request_the_handlers_run_after_the_response(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "app.db"
    bus = sqlite_bus(path)
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")
    returned: list[bool] = []

    @bus.on("user.created", name="mail.welcome")
    async def welcome(event: Event) -> None:
        recorder.add(("handled", bool(returned)))

    async def create_user(request: Request) -> PlainTextResponse:
        with Session(engine) as session, session.begin():
            outbox.emit(session, "user.created", {"user": 1})
        await asyncio.sleep(0)  # a chance for anything released too early to run
        returned.append(True)
        return PlainTextResponse("created", status_code=201)

    app = TidingsMiddleware(Starlette(routes=[Route("/users", create_user, methods=["POST"])]), bus=bus)
    async with bus:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.post("/users")).status_code == 201
        await recorder.wait_count(1)
    assert recorder.items == [("handled", True)]
    engine.dispose()


async def test_an_unserialisable_payload_raises_in_the_caller_and_the_outbox_needs_a_sql_log(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigurationError, match="SQLiteStore or PostgresStore"):
        Outbox(EventBus())
    path = tmp_path / "app.db"
    bus = sqlite_bus(path)
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")
    async with bus:
        with Session(engine) as session, session.begin():
            with pytest.raises(SerializationError, match="cannot be written"):
                outbox.emit(session, "x", object())
            with pytest.raises(TypeError):
                outbox.emit(session, 42, None)
    engine.dispose()


async def test_typed_events_and_schemas_go_through_the_outbox_as_through_emit(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "app.db"
    bus = sqlite_bus(path)
    outbox = Outbox(bus)

    @bus.on(OrderPlaced, name="orders.audit")  # also the schema of "order.placed"
    async def audit(order: OrderPlaced, event: Event) -> None:
        recorder.add((event.name, event.id, order))

    engine = create_engine(f"sqlite:///{path}")
    async with bus:
        with Session(engine) as session, session.begin():
            typed = outbox.emit(session, OrderPlaced(order_id=1, total=9.5))
            by_name = outbox.emit(session, "order.placed", {"order_id": "2", "total": 3})
            with pytest.raises(TypeError, match="takes no payload"):
                outbox.emit(session, OrderPlaced(order_id=3, total=1.0), {"order_id": 3})
        assert (typed.name, by_name.name) == ("order.placed", "order.placed")
        assert by_name.payload == OrderPlaced(order_id=2, total=3.0)  # coerced, as emit() does
        with Session(engine) as session, session.begin():
            session.execute(text("CREATE TABLE orders (id INTEGER)"))
            with pytest.raises(EventValidationError) as raised:
                outbox.emit(session, "order.placed", {"order_id": "not a number", "total": 1})
            assert raised.value.event_name == "order.placed"
        # no await since the commit: nothing can have been handled (and deleted) yet
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT event_id FROM tidings_deliveries")).all()
        assert sorted(row[0] for row in rows) == sorted([typed.id, by_name.id])
        await recorder.wait_count(2)
        await bus.drain()
    assert recorder.items == [
        ("order.placed", typed.id, OrderPlaced(order_id=1, total=9.5)),
        ("order.placed", by_name.id, OrderPlaced(order_id=2, total=3.0)),
    ]
    engine.dispose()


@pytest.fixture
async def pg_async_engine(pg_schema: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(POSTGRES_DSN.replace("postgresql://", "postgresql+asyncpg://"))
    yield engine
    await engine.dispose()


@pytest.fixture
def pg_engine(pg_schema: str, pg_async_engine: AsyncEngine) -> tuple[str, Callable[[], AsyncSession]]:
    return pg_schema, lambda: AsyncSession(pg_async_engine)


async def test_async_sessions_on_postgres(
    pg_engine: tuple[str, Callable[[], AsyncSession]], recorder: Recorder
) -> None:
    schema, new_session = pg_engine
    bus = EventBus(store=PostgresStore(POSTGRES_DSN, schema=schema))
    outbox = audited_outbox(bus, recorder)

    async with bus:
        async with new_session() as first, new_session() as second, new_session() as third:
            for session in (first, second, third):
                await session.begin()
            outbox.emit(first, "n", 1)
            outbox.emit(second, "n", 2)
            outbox.emit(third, "n", 3)
            await second.commit()
            await third.rollback()
            await first.commit()
        await recorder.wait_count(2)
        await bus.drain()
        await bus.store.flush()
        assert await bus.store.pending_count() == 0  # type: ignore[attr-defined]
    assert sorted(recorder.items) == [1, 2]


async def test_typed_events_through_the_outbox_on_postgres(
    pg_engine: tuple[str, Callable[[], AsyncSession]], recorder: Recorder
) -> None:
    schema, new_session = pg_engine
    bus = EventBus(store=PostgresStore(POSTGRES_DSN, schema=schema))
    outbox = Outbox(bus)
    counted = asyncio.Event()  # a delivery's row is deleted once handled: hold them until counted

    @bus.on(InvoiceDue, name="billing.send")
    async def send(invoice: InvoiceDue, event: Event) -> None:
        await counted.wait()
        recorder.add((event.name, invoice))

    async with bus:
        async with new_session() as session:
            async with session.begin():
                outbox.emit(session, InvoiceDue(invoice=1))
                outbox.emit(session, "InvoiceDue", {"invoice": "2"})
            async with session.begin():
                with pytest.raises(EventValidationError):
                    outbox.emit(session, "InvoiceDue", {"invoice": "two"})
            written = await session.scalar(text(f'SELECT count(*) FROM "{schema}".tidings_deliveries'))
        counted.set()
        await recorder.wait_count(2)
        await bus.drain()
    assert written == 2  # the invalid event's transaction committed, without it
    assert sorted(recorder.items, key=repr) == [
        ("InvoiceDue", InvoiceDue(invoice=1)),
        ("InvoiceDue", InvoiceDue(invoice=2)),
    ]


async def test_the_inbox_through_sqlalchemy_records_once_and_rolls_back_with_the_work(
    pg_engine: tuple[str, Callable[[], AsyncSession]], tmp_path: Path
) -> None:
    schema, new_session = pg_engine
    store = PostgresStore(POSTGRES_DSN, schema=schema)
    await store.open()  # creates the schema's tidings_inbox
    await store.aclose()
    event = Event("order.paid")
    async with new_session() as session:
        async with session.begin():
            assert await arecord_once(session, event, "billing.charge", schema=schema)
            await session.rollback()  # the work failed: its inbox row goes with it
        async with session.begin():
            assert await arecord_once(session, event, "billing.charge", schema=schema)
        async with session.begin():
            assert not await arecord_once(session, event.id, "billing.charge", schema=schema)
            assert await arecord_once(session, event, "mail.receipt", schema=schema)

    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    SQLiteStore(tmp_path / "app.db")._connect().close()  # the SQLite log's tables, inbox included
    with Session(engine) as sync_session, sync_session.begin():
        assert record_once(sync_session, event, "billing.charge")
        assert not record_once(sync_session, event, "billing.charge")
    with pytest.raises(ConfigurationError, match="plain SQL identifier"):
        record_once(Session(engine), event, "x", schema="bad; drop")
    engine.dispose()


async def test_events_emitted_by_the_commits_own_flush_or_in_a_savepoint_left_open_are_handled(
    audited: tuple[EventBus, Outbox, Engine], recorder: Recorder, records: Records
) -> None:
    bus, outbox, engine = audited

    with Session(engine) as session, session.begin():
        session.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY)"))

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)

    def placed(mapper: Any, connection: Any, order: Order) -> None:  # an ORM event: fires in a flush
        session = Session.object_session(order)
        assert session is not None
        outbox.emit(session, "order.placed", order.id)

    sa_event.listen(Order, "after_insert", placed)
    async with bus:
        with Session(engine) as session, session.begin():
            session.add(Order(id=1))  # flushed by the commit
        with Session(engine) as session, session.begin():
            session.add(Order(id=4))
            session.flush()  # before the commit: staged, written by the commit
        with Session(engine) as session, session.begin():
            session.begin_nested()  # still open when the block commits: released with it
            session.add(Order(id=2))
            outbox.emit(session, "order.noted", 2)
        with Session(engine) as session, session.begin():
            session.begin_nested()
            session.begin_nested()
            outbox.emit(session, "order.noted", 3)
            session.get_transaction().commit()  # type: ignore[union-attr]
        await recorder.wait_count(5)
        await bus.drain()
    assert sorted(recorder.items) == [1, 2, 2, 3, 4]
    assert not [r for r in records.recorder.items if "discarded" in r.getMessage()]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id FROM orders ORDER BY id")).scalars().all() == [1, 2, 4]


async def test_a_rolled_back_savepoint_discards_the_events_emitted_in_it(
    audited: tuple[EventBus, Outbox, Engine], recorder: Recorder
) -> None:
    bus, outbox, engine = audited
    async with bus:
        with Session(engine) as session, session.begin():
            outbox.emit(session, "n", "before")
            failed = session.begin_nested()
            outbox.emit(session, "n", "in the failed savepoint")
            failed.rollback()
            with session.begin_nested():
                outbox.emit(session, "n", "in a released savepoint")
            outer = session.begin_nested()
            with session.begin_nested():
                outbox.emit(session, "n", "released, then its enclosing savepoint rolled back")
            outer.rollback()
            outbox.emit(session, "n", "after")
        await recorder.wait_count(3)
        await bus.drain()
        await bus.store.flush()
        assert await bus.store.pending_count() == 0  # type: ignore[attr-defined]
    assert sorted(recorder.items) == ["after", "before", "in a released savepoint"]


async def test_events_a_rolled_back_savepoint_wrote_but_did_not_emit_are_in_the_log_at_the_commit(
    held: Held, recorder: Recorder
) -> None:
    # A savepoint's release writes every staged event, the enclosing transaction's too. Rows then
    # rolled back (the savepoint's own flush failing at its release, an enclosing savepoint rolled
    # back) were still counted as written: the outer commit wrote nothing again, the events were
    # handled from memory only, and a crash before that lost them (no row in the log).
    bus, outbox, engine = held.bus, held.outbox, held.engine

    def create_unless_there(session: Session, note: Note) -> bool:  # "get or create", by a savepoint
        try:
            with session.begin_nested():
                outbox.emit(session, "n", "in the failed savepoint")
                session.add(note)
        except IntegrityError:
            return False
        return True

    async with bus:
        try:
            with Session(engine) as session, session.begin():
                session.add(Note(id=1))
                session.flush()
                outbox.emit(session, "n", "before a get-or-create")
                assert not create_unless_there(session, Note(id=1))  # its flush at the release fails
                outbox.emit(session, "n", "before an attempt given up")
                attempt = session.begin_nested()
                outbox.emit(session, "n", "in the attempt")
                with session.begin_nested():  # released: writes every staged event
                    outbox.emit(session, "n", "in a step of the attempt")
                attempt.rollback()  # the outer transaction goes on, and commits
            with engine.connect() as connection:
                events = connection.execute(text("SELECT event_id FROM tidings_deliveries"))
                logged = len(events.all())
                notes = connection.execute(text("SELECT count(*) FROM notes")).scalar()
        finally:
            held.released.set()
        await recorder.wait_count(2)
        await bus.drain()
    assert (logged, notes) == (2, 1)
    assert sorted(recorder.items) == ["before a get-or-create", "before an attempt given up"]


async def test_events_whose_write_at_a_savepoints_release_failed_are_written_by_the_next_commit(
    tmp_path: Path,
) -> None:
    # The failed write had taken the events off the staged list: the enclosing transaction's,
    # whose release had nothing to roll back, were then lost from it
    path = tmp_path / "app.db"
    bus = sqlite_bus(path)
    bus.subscribe(lambda event: None, "n", name="audit")
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")
    await bus.store.open()  # its table; the bus is not started, so nothing handles (and deletes) the rows
    try:
        refuse_writes_while_flagged(engine)
        with Session(engine) as session, session.begin():
            outer = outbox.emit(session, "n", "outer")
            session.execute(text("INSERT INTO refusing VALUES (1)"))
            with pytest.raises(IntegrityError, match="refused"), session.begin_nested():
                outbox.emit(session, "n", "in the savepoint")
            session.execute(text("DELETE FROM refusing"))
        with engine.connect() as connection:
            written = connection.execute(text("SELECT event_id FROM tidings_deliveries"))
            logged: list[str] = list(written.scalars())
    finally:
        await bus.store.aclose()
        engine.dispose()
    assert logged == [outer.id]


@pytest.mark.parametrize("mode", ["conditional_savepoint", "create_savepoint", "rollback_only"])
async def test_a_session_joined_to_an_outer_transaction_releases_nothing_before_that_commits(
    pg_schema: str, pg_async_engine: AsyncEngine, recorder: Recorder, mode: JoinTransactionMode
) -> None:
    # PostgreSQL: pysqlite's own transaction handling breaks savepoints unless the app works around it
    bus = EventBus(store=PostgresStore(POSTGRES_DSN, schema=pg_schema), resubmit_after=0.2)
    outbox = audited_outbox(bus, recorder)  # what the outer commit made durable runs from the log
    async with bus:
        for outcome in ("rolled back", "committed"):
            async with pg_async_engine.connect() as connection:
                outer = await connection.begin()
                async with AsyncSession(bind=connection, join_transaction_mode=mode) as session:
                    await session.begin()
                    outbox.emit(session, "n", outcome)
                    await session.commit()  # not the commit that makes the rows durable
                if outcome == "committed":
                    await outer.commit()
                else:
                    await outer.rollback()
        await recorder.wait_count(1)
        await bus.drain()
    assert recorder.items == ["committed"]


async def test_an_emit_into_a_transaction_that_has_committed_raises(
    audited: tuple[EventBus, Outbox, Engine], recorder: Recorder
) -> None:
    bus, outbox, engine = audited
    raised: list[Exception] = []

    def emit_too_late(session: Session) -> None:  # an after_commit hook: nothing can join it now
        try:
            outbox.emit(session, "n", "too late")
        except BusStateError as exc:
            raised.append(exc)

    async with bus:
        with Session(engine) as session:
            sa_event.listen(session, "after_commit", emit_too_late)
            session.begin()
            outbox.emit(session, "n", "in time")
            session.commit()
        await recorder.wait_count(1)
        await bus.drain()
    assert recorder.items == ["in time"]
    assert len(raised) == 1
    assert "has committed or failed" in str(raised[0])


async def test_sessions_committed_in_threads_while_the_relay_renews_leases(
    audited: tuple[EventBus, Outbox, Engine], recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus, outbox, engine = audited

    def commit_in_a_thread(payload: int) -> None:  # a sync endpoint's session, in the thread pool
        def commit() -> None:
            with Session(engine) as session, session.begin():
                outbox.emit(session, "n", payload)

        thread = threading.Thread(target=commit)
        thread.start()
        thread.join()

    class Registry:  # the runner's, whose resolve() lets a thread commit as the renewal runs
        def resolve(self, name: str) -> Any:
            if not committed:
                committed.append(2)
                commit_in_a_thread(2)  # it releases its event as the renewal reads the released ones
            return bus.registry.resolve(name)

    committed: list[int] = []
    async with bus:
        commit_in_a_thread(1)  # released from the thread: it waits for the loop to take it
        monkeypatch.setattr(bus._runner, "registry", Registry())
        in_flight = bus._runner.in_flight()  # what the relay's next tick renews
        monkeypatch.undo()
        assert in_flight
        await recorder.wait_count(2)
        await bus.drain()
    assert sorted(recorder.items) == [1, 2]


async def test_committed_events_a_drain_cut_off_run_from_the_log_while_the_bus_keeps_running(
    tmp_path: Path, recorder: Recorder
) -> None:
    path = tmp_path / "app.db"
    bus = sqlite_bus(path, resubmit_after=0.3)
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")
    committed: list[Event] = []

    @bus.on("order.paid", name="billing.invoice")
    async def invoice(event: Event) -> None:
        if not committed:  # its first run commits, then hangs until the drain cuts it off
            with Session(engine) as session, session.begin():
                committed.append(outbox.emit(session, "invoice.due", event.payload))
            recorder.add(("invoice", event.id))
            await asyncio.Event().wait()
        recorder.add(("invoice", event.id))

    @bus.on("invoice.due", name="mail.send")
    async def send(event: Event) -> None:
        recorder.add(("send", event.id))

    async with bus:
        bus.emit("order.paid", {"order": 1})
        (_, paid), *_ = await recorder.wait_count(1)
        # released into the job's buffer, which the cut-off reports: still leased by the outbox
        with pytest.raises(DrainTimeoutError) as cut:
            await bus.drain(0)
        due = committed[0]
        assert {(p.handler, p.event.id) for p in cut.value.pending} == {
            ("billing.invoice", paid),
            ("mail.send", due.id),
        }
        # neither is renewed any more: their leases run out and the relay runs both again
        await recorder.wait_for(lambda items: ("send", due.id) in items and len(items) == 3)
        await bus.drain()
        await bus.store.flush()
        assert await bus.store.pending_count() == 0  # type: ignore[attr-defined]
        assert bus._runner.released == {}
    assert sorted(recorder.items) == [("invoice", paid), ("invoice", paid), ("send", due.id)]
    engine.dispose()


SECRET = "4111-1111-1111-1111 cvv 737"


def formatted(exc: BaseException) -> str:
    """Everything a log handler writes about ``exc``: the traceback, its chain, the messages."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


async def test_a_failed_outbox_write_fails_the_commit_without_the_payloads_in_the_error(
    tmp_path: Path, records: Records
) -> None:
    path = tmp_path / "app.db"
    bus = sqlite_bus(path)  # never started: the event log's table is missing, its INSERT fails
    bus.subscribe(lambda event: None, "card.saved", name="vault.audit")
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")
    with Session(engine) as session, session.begin():
        session.execute(text("CREATE TABLE cards (id INTEGER)"))
    with Session(engine) as session:
        session.begin()
        session.execute(text("INSERT INTO cards VALUES (1)"))
        saved = [outbox.emit(session, "card.saved", {"card": SECRET, "n": n}) for n in range(4)]
        with pytest.raises(OperationalError, match="no such table") as raised:  # as any failed statement
            session.commit()
        session.rollback()  # the commit failed: the transaction must be rolled back, as ever
        session.execute(text("INSERT INTO cards VALUES (2)"))  # and the session goes on
        session.commit()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id FROM cards")).scalars().all() == [2]
    engine.dispose()
    error = raised.value
    assert SECRET not in formatted(error)
    assert SECRET not in repr(error.params)
    assert "INSERT INTO tidings_deliveries" in str(error)  # the statement and the driver's error stay
    assert f"'card.saved' ({saved[0].id})" in str(error) and "and 1 more" in str(error)
    assert not [record for record in records.recorder.items if SECRET in record.getMessage()]


async def test_a_failed_outbox_write_on_postgres_keeps_the_payloads_out_of_the_error(
    pg_schema: str, pg_async_engine: AsyncEngine
) -> None:
    bus = EventBus(store=PostgresStore(POSTGRES_DSN, schema=pg_schema))  # never opened: no table
    bus.subscribe(lambda event: None, "card.saved", name="vault.audit")
    outbox = Outbox(bus)
    async with AsyncSession(pg_async_engine) as session:
        with pytest.raises(ProgrammingError, match="does not exist") as raised:
            async with session.begin():
                outbox.emit(session, "card.saved", {"card": SECRET})
        assert not session.in_transaction()  # rolled back by the block, as any failed commit is
    assert SECRET not in formatted(raised.value)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_constraint_the_outbox_write_violates_on_postgres_keeps_the_failing_row_out_of_the_error(
    pg_schema: str, records: Records, driver: str
) -> None:
    # PostgreSQL's DETAIL of a violated CHECK (or NOT NULL) constraint is the failing row, payload
    # and headers included: asyncpg's error adds it to its text, psycopg's message holds it
    store = PostgresStore(POSTGRES_DSN, schema=pg_schema)
    bus = EventBus(store=store)  # never started: nothing handles (and deletes) a row
    bus.subscribe(lambda event: None, "card.saved", name="vault.audit")
    outbox = Outbox(bus)
    await store.open()
    await store.aclose()
    engine = create_async_engine(POSTGRES_DSN.replace("postgresql://", f"postgresql+{driver}://"))
    try:
        async with engine.begin() as connection:  # a rule of the database's owner that the row breaks
            await connection.execute(
                text(
                    f'ALTER TABLE "{pg_schema}".tidings_deliveries '
                    "ADD CONSTRAINT short_payloads CHECK (length(payload) < 10)"
                )
            )
        async with AsyncSession(engine) as session:
            with pytest.raises(IntegrityError) as raised:
                async with session.begin():
                    outbox.emit(session, "card.saved", {"card": SECRET})
            assert not session.in_transaction()  # rolled back by the block, as any failed commit is
            logged = await session.scalar(text(f'SELECT count(*) FROM "{pg_schema}".tidings_deliveries'))
    finally:
        await engine.dispose()
    error = raised.value
    assert logged == 0
    assert SECRET not in formatted(error)
    assert 'violates check constraint "short_payloads"' in str(error)  # what failed, and where
    assert getattr(error.orig, "sqlstate", None) == "23514"  # what code handling the failure reads
    assert not [record for record in records.recorder.items if SECRET in record.getMessage()]


class Declined(Exception):
    """An error of the app's own, with a ``detail`` for its response, as web frameworks' have."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


@pytest.mark.parametrize("driver", ["sqlite", "postgresql+psycopg"])
def test_a_failed_outbox_write_leaves_the_exception_being_handled_as_it_was(
    tmp_path: Path, pg_schema: str, driver: str
) -> None:
    # A commit in an except block: a sync driver's error has the exception being handled as its
    # context. Hiding the database's detail went on along it into the app's own exception: its
    # message was cut to its first line, its detail replaced, for the app's handler to read.
    if driver == "sqlite":
        bus = sqlite_bus(tmp_path / "app.db")  # never started: the log's table is missing
        url = f"sqlite:///{tmp_path / 'app.db'}"
    else:
        bus = EventBus(store=PostgresStore(POSTGRES_DSN, schema=pg_schema))  # never opened: no table
        url = POSTGRES_DSN.replace("postgresql://", f"{driver}://")
    bus.subscribe(lambda event: None, "payment.failed", name="billing.notify")
    outbox = Outbox(bus)
    engine = create_engine(url)
    declined = Declined("card declined\nissuer: do not honour", "try another card")

    def pay() -> None:
        try:
            raise declined
        except Declined:
            with Session(engine) as session, session.begin():
                outbox.emit(session, "payment.failed", {"card": SECRET})

    try:
        with pytest.raises(DBAPIError) as raised:
            pay()
    finally:
        engine.dispose()
    driver_error = raised.value.__cause__
    assert driver_error is not None and driver_error.__context__ is declined  # raised while handling it
    assert declined.args == ("card declined\nissuer: do not honour",)
    assert declined.detail == "try another card"
    assert SECRET not in formatted(raised.value)


async def test_deliveries_written_before_the_outer_commit_are_leased_from_that_commit(
    held: Held, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows a savepoint's release (or a flush after one) writes are in the log once the outer
    # transaction commits, maybe long after: leased from the write, they would be free for any
    # instance to take the moment they commit, while this one runs them (a duplicate delivery).
    bus, outbox, engine = held.bus, held.outbox, held.engine
    earlier = 0.0  # how long before the commit the outbox's clock says the work happens
    monkeypatch.setattr(outbox_module, "time", lambda: clock.time() - earlier)
    other = SQLiteStore(held.path)  # another instance on the same log
    async with bus:
        await other.open()
        try:
            with Session(engine) as session, session.begin():
                earlier = 2 * bus.resubmit_after  # the transaction stays open for two leases
                with session.begin_nested():
                    outbox.emit(session, "n", "in a released savepoint")
                outbox.emit(session, "n", "staged before a flush after the savepoint")
                session.add(Note(id=1))
                session.flush()
                with session.begin_nested():  # one with no event: nothing to write at its release
                    session.add(Note(id=2))
                session.begin_nested()  # left open: the block's commit commits it on its way
                outbox.emit(session, "n", "in the savepoint open at the commit")
                earlier = 0.0
                committing = clock.time()
            assert await other.claim(limit=10, lease=bus.resubmit_after) == []  # nothing free to take
            with engine.connect() as connection:
                leased = text("SELECT lease_until FROM tidings_deliveries")
                leases: list[float] = list(connection.execute(leased).scalars())
            assert len(leases) == 3
            assert all(lease >= committing + bus.resubmit_after for lease in leases)
        finally:
            held.released.set()
            await other.aclose()
        await recorder.wait_count(3)
        await bus.drain()
    assert sorted(recorder.items) == [
        "in a released savepoint",
        "in the savepoint open at the commit",
        "staged before a flush after the savepoint",
    ]


def statements_on_the_log(engine: Engine) -> list[str]:
    """The first word of each statement ``engine`` runs on the log's table, from now on."""
    seen: list[str] = []

    @sa_event.listens_for(engine, "before_cursor_execute")
    def record(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "tidings_deliveries" in statement:
            seen.append(statement.split()[0])

    return seen


def unhandled_outbox(path: Path) -> Outbox:
    """An outbox on a bus, never started, with a handler "audit" for "n", on a log at ``path``."""
    SQLiteStore(path)._connect().close()  # the log's table
    bus = sqlite_bus(path)
    bus.subscribe(lambda event: None, "n", name="audit")
    return Outbox(bus)


def test_a_savepoint_whose_commit_fails_leaves_no_commit_under_way(tmp_path: Path) -> None:
    # Its before_commit counted a commit under way, and the after_commit that uncounts it never
    # came: for the rest of the transaction every flush wrote what was staged at once, leased from
    # then, and every savepoint's release leased again all the rows written (quadratic work).
    outbox = unhandled_outbox(tmp_path / "app.db")
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    NotesBase.metadata.create_all(engine)
    statements = statements_on_the_log(engine)
    with Session(engine) as session, session.begin():
        session.add(Note(id=1))
        session.flush()
        failed = session.begin_nested()
        session.add(Note(id=1))  # a duplicate: the flush at the release fails
        with pytest.raises(IntegrityError):
            failed.commit()
        failed.rollback()
        outbox.emit(session, "n", "outer")
        session.add(Note(id=2))
        session.flush()  # no commit under way: leaves the event to the commit
        written_early = list(statements)
        for n in range(3):
            with session.begin_nested():  # each release writes its own, and leases nothing again
                outbox.emit(session, "n", n)
        at_releases = list(statements)
    engine.dispose()
    assert written_early == []
    assert at_releases == ["INSERT"] * 3
    assert statements[3:] == ["UPDATE"]  # the commit: leased once again, from it


def refuse_writes_while_flagged(engine: Engine, statement: str = "INSERT") -> None:
    """The log's table (on SQLite) refuses ``statement`` (INSERT, UPDATE) while the table
    ``refusing`` has a row: SQLite aborts the statement only, so the transaction, and its
    savepoint, can go on."""
    with Session(engine) as session, session.begin():
        session.execute(text("CREATE TABLE refusing (flag INTEGER)"))
        session.execute(
            text(
                f"CREATE TRIGGER refuse BEFORE {statement} ON tidings_deliveries "
                "WHEN EXISTS (SELECT 1 FROM refusing) BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        )


def test_a_savepoint_whose_outbox_write_fails_then_commits_leaves_no_commit_under_way(tmp_path: Path) -> None:
    # The write failed inside before_commit, which had counted a commit under way: no after_commit
    # and no rollback came to uncount it, the savepoint staying open (SQLite aborts the statement
    # only). Committed again, it uncounted one of the two: every later savepoint's release leased
    # all the rows written again, for the rest of the transaction.
    outbox = unhandled_outbox(tmp_path / "app.db")
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    refuse_writes_while_flagged(engine)
    statements = statements_on_the_log(engine)
    with Session(engine) as session, session.begin():
        session.execute(text("INSERT INTO refusing VALUES (1)"))
        savepoint = session.begin_nested()
        outbox.emit(session, "n", "in the savepoint")
        with pytest.raises(IntegrityError, match="refused"):
            savepoint.commit()
        session.execute(text("DELETE FROM refusing"))
        savepoint.commit()  # tried again: written now
        for n in range(3):
            with session.begin_nested():  # each release writes its own, and leases nothing again
                outbox.emit(session, "n", n)
        at_releases = list(statements)
    at_commit = statements[len(at_releases) :]
    with engine.connect() as connection:
        logged = connection.execute(text("SELECT count(*) FROM tidings_deliveries")).scalar()
    engine.dispose()
    assert at_releases == ["INSERT"] * 5  # the refused one, the one tried again, one per release
    assert at_commit == ["UPDATE"]  # leased once again, from the commit
    assert logged == 4


def test_an_outer_commit_failing_at_its_savepoints_outbox_write_leaves_no_commit_under_way(
    tmp_path: Path,
) -> None:
    # The outer transaction's commit, a savepoint open, counts a commit under way (its
    # before_commit, which writes), then commits the savepoint, whose before_commit leases the rows
    # again. That failing, it uncounted its own commit, not the outer one, which failed with it:
    # counted still while the transaction went on (SQLite aborts the statement only), it made every
    # later savepoint's release lease all the rows written again.
    outbox = unhandled_outbox(tmp_path / "app.db")
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    refuse_writes_while_flagged(engine, "UPDATE")
    statements = statements_on_the_log(engine)
    with Session(engine) as session:
        outer = session.begin()
        session.execute(text("INSERT INTO refusing VALUES (1)"))
        savepoint = session.begin_nested()
        outbox.emit(session, "n", "in the savepoint")
        with pytest.raises(IntegrityError, match="refused"):
            outer.commit()  # written; then the savepoint's commit, its lease again refused
        session.execute(text("DELETE FROM refusing"))
        savepoint.commit()  # no commit under way: nothing to lease again
        for n in range(3):
            with session.begin_nested():  # each release writes its own, and leases nothing again
                outbox.emit(session, "n", n)
        at_releases = list(statements)
        outer.commit()
    at_commit = statements[len(at_releases) :]
    with engine.connect() as connection:
        logged = connection.execute(text("SELECT count(*) FROM tidings_deliveries")).scalar()
    engine.dispose()
    assert at_releases == ["INSERT", "UPDATE"] + ["INSERT"] * 3  # written, the refused lease, the releases
    assert at_commit == ["UPDATE"]  # leased once again, from the commit
    assert logged == 4


async def test_events_of_savepoints_whose_commit_failed_are_never_handled_and_nothing_stays_behind(
    audited: tuple[EventBus, Outbox, Engine], recorder: Recorder
) -> None:
    bus, outbox, engine = audited
    NotesBase.metadata.create_all(engine)
    async with bus:
        refuse_writes_while_flagged(engine)
        with Session(engine) as session:
            with session.begin():
                outbox.emit(session, "n", "before")
                session.execute(text("INSERT INTO refusing VALUES (1)"))
                with pytest.raises(IntegrityError, match="refused"), session.begin_nested():
                    outbox.emit(session, "n", "in the savepoint whose write failed")
                session.execute(text("DELETE FROM refusing"))
                session.add(Note(id=1))
                session.flush()
                failed = session.begin_nested()
                outbox.emit(session, "n", "in the savepoint whose flush failed")
                session.add(Note(id=1))
                with pytest.raises(IntegrityError, match="UNIQUE"):
                    failed.commit()
                failed.rollback()
                outbox.emit(session, "n", "after")
            left = [key for key in session.info if key.startswith("tidings")]
        await recorder.wait_count(2)
        await bus.drain()
        await bus.store.flush()
        assert await bus.store.pending_count() == 0  # type: ignore[attr-defined]
    assert sorted(recorder.items) == ["after", "before"]
    assert left == []


@pytest.mark.parametrize("commit", ["block", "session"])
def test_the_outer_commit_with_savepoints_open_leases_again_once(tmp_path: Path, commit: str) -> None:
    # The block's end commits the outer transaction first (its before_commit, while the innermost
    # savepoint is current), then each savepoint: each of theirs leased every row again;
    # session.commit() commits the savepoints first, innermost first, then the outer transaction
    outbox = unhandled_outbox(tmp_path / "app.db")
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    statements = statements_on_the_log(engine)
    with Session(engine) as session:
        session.begin()
        with session.begin_nested():
            outbox.emit(session, "n", "released")
        session.begin_nested()
        outbox.emit(session, "n", "open")
        session.begin_nested()
        outbox.emit(session, "n", "open inside it")
        if commit == "block":
            session.get_transaction().commit()  # type: ignore[union-attr]
        else:
            session.commit()
    with engine.connect() as connection:
        logged = connection.execute(text("SELECT count(*) FROM tidings_deliveries")).scalar()
    engine.dispose()
    assert statements.count("UPDATE") == 1
    assert logged == 3


async def test_a_released_savepoints_deliveries_are_leased_from_the_outer_commit_on_postgres(
    pg_schema: str, pg_async_engine: AsyncEngine
) -> None:
    bus = EventBus(store=PostgresStore(POSTGRES_DSN, schema=pg_schema))
    bus.subscribe(lambda event: None, "n", name="audit")
    outbox = Outbox(bus)
    table = f'"{pg_schema}".tidings_deliveries'
    await bus.store.open()  # its table; the bus is not started, so nothing handles (and deletes) the rows
    try:
        async with AsyncSession(pg_async_engine) as session:
            async with session.begin():
                async with session.begin_nested():
                    outbox.emit(session, "n", 1)
                now = "extract(epoch from clock_timestamp())::float8"  # the clock the lease is on
                released = await session.scalar(text(f"SELECT {now}"))
            leased = await session.scalar(text(f"SELECT lease_until FROM {table}"))
    finally:
        await bus.store.aclose()
    assert leased >= released + bus.resubmit_after


def driver_in_autocommit(engine: Engine) -> None:
    """Each new connection of ``engine`` has its SQLite driver (pysqlite, aiosqlite) in autocommit."""

    @sa_event.listens_for(engine, "connect")
    def autocommit(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None


def begin_explicitly(engine: Engine) -> None:
    """SQLAlchemy's recipe for SQLite savepoints: pysqlite in autocommit, each BEGIN emitted by us."""
    driver_in_autocommit(engine)

    @sa_event.listens_for(engine, "begin")
    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


async def test_the_inbox_through_sqlalchemy_refuses_a_connection_that_commits_each_statement(
    tmp_path: Path, pg_schema: str, pg_async_engine: AsyncEngine
) -> None:
    # There the pair would commit alone, before the work: a delivery whose work then failed would
    # have it skipped by the next one. Nothing is recorded then, so the next delivery does the work.
    path = tmp_path / "app.db"
    SQLiteStore(path)._connect().close()  # the SQLite log's tables, inbox included
    event = Event("order.paid")
    autocommit = create_engine(f"sqlite:///{path}", isolation_level="AUTOCOMMIT")
    with (
        Session(autocommit) as session,
        session.begin(),
        pytest.raises(ConfigurationError, match="autocommit"),
    ):
        record_once(session, event, "billing.charge")
    with autocommit.connect() as connection, pytest.raises(ConfigurationError, match="autocommit"):
        record_once(connection, event, "billing.charge")
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as connection:
        per_connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(ConfigurationError, match="autocommit"):
            record_once(per_connection, event, "billing.charge")
    explicit = create_engine(f"sqlite:///{path}")
    begin_explicitly(explicit)  # pysqlite in autocommit, but in a transaction: accepted
    with Session(explicit) as session, session.begin():
        assert record_once(session, event, "billing.charge")
        session.rollback()  # the work failed: the pair goes with it
    with Session(engine) as session, session.begin():
        assert record_once(session, event, "billing.charge")  # the next delivery does the work
    for each in (autocommit, engine, explicit):
        each.dispose()

    store = PostgresStore(POSTGRES_DSN, schema=pg_schema)
    await store.open()  # creates the schema's tidings_inbox
    await store.aclose()
    pg_autocommit = pg_async_engine.execution_options(isolation_level="AUTOCOMMIT")
    async with AsyncSession(pg_autocommit) as async_session, async_session.begin():
        with pytest.raises(ConfigurationError, match="autocommit"):
            await arecord_once(async_session, event, "billing.charge", schema=pg_schema)
    async with pg_async_engine.connect() as async_connection:
        assert await arecord_once(async_connection, event, "billing.charge", schema=pg_schema)
        await async_connection.rollback()
    async with pg_async_engine.begin() as async_connection:
        assert await arecord_once(async_connection, event, "billing.charge", schema=pg_schema)


@pytest.mark.parametrize("set_by", ["connect_args", "connect_event"])
async def test_the_inbox_on_aiosqlite_refuses_the_drivers_own_autocommit_and_takes_its_default(
    tmp_path: Path, set_by: str
) -> None:
    # aiosqlite's connection reads isolation_level and in_transaction from its sqlite3 one, so the
    # driver's own autocommit (isolation_level=None, no BEGIN run) is seen as pysqlite's is
    path = tmp_path / "app.db"
    SQLiteStore(path)._connect().close()  # the SQLite log's tables, inbox included
    event = Event("order.paid")
    url = f"sqlite+aiosqlite:///{path}"
    if set_by == "connect_args":  # handed to sqlite3.connect() by aiosqlite
        autocommit = create_async_engine(url, connect_args={"isolation_level": None})
    else:  # set on SQLAlchemy's adapter, which sets it on aiosqlite's thread
        autocommit = create_async_engine(url)
        driver_in_autocommit(autocommit.sync_engine)
    default = create_async_engine(url)  # the driver's default: a BEGIN before the insert
    count = text("SELECT count(*) FROM tidings_inbox")
    try:
        async with AsyncSession(autocommit) as session, session.begin():
            with pytest.raises(ConfigurationError, match="autocommit"):
                await arecord_once(session, event, "billing.charge")
        async with autocommit.connect() as connection:
            with pytest.raises(ConfigurationError, match="autocommit"):
                await arecord_once(connection, event, "billing.charge")
            assert await connection.scalar(count) == 0  # nothing committed on its own
        async with AsyncSession(default) as session:
            async with session.begin():
                assert await arecord_once(session, event, "billing.charge")
                await session.rollback()  # the work failed: the pair goes with it
            assert await session.scalar(count) == 0
            await session.rollback()
            async with session.begin():
                assert await arecord_once(session, event, "billing.charge")  # the next delivery's
            async with session.begin():
                assert not await arecord_once(session, event, "billing.charge")
    finally:
        await autocommit.dispose()
        await default.dispose()


@asynccontextmanager
async def autocommit_inbox(
    driver: str, tmp_path: Path, pg_schema: str
) -> AsyncIterator[tuple[AsyncEngine, str | None, str]]:
    """An engine in autocommit (``isolation_level="AUTOCOMMIT"``) on ``driver``'s database with
    the log's inbox (SQLite in ``tmp_path``, or PostgreSQL), the schema to give record_once, and
    the inbox table's name."""
    schema: str | None = None
    if driver.startswith("sqlite"):
        path = tmp_path / "app.db"
        SQLiteStore(path)._connect().close()  # the SQLite log's tables, inbox included
        url = f"{driver}:///{path}"
    else:
        store = PostgresStore(POSTGRES_DSN, schema=pg_schema)
        await store.open()  # creates the schema's tidings_inbox
        await store.aclose()
        url, schema = POSTGRES_DSN.replace("postgresql://", f"{driver}://"), pg_schema
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        yield engine, schema, f'"{schema}".tidings_inbox' if schema else "tidings_inbox"
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", ["sqlite+aiosqlite", "postgresql+asyncpg", "postgresql+psycopg"])
async def test_a_refused_record_once_leaves_the_callers_connection_and_session_as_they_were(
    tmp_path: Path, pg_schema: str, driver: str
) -> None:
    # The refusal came after the transaction it had begun (the check reads the connection in one):
    # the caller's connection was left begun, its own begin() then raising "already begun"
    event = Event("order.paid")
    async with autocommit_inbox(driver, tmp_path, pg_schema) as (engine, schema, table):
        async with engine.connect() as connection:
            with pytest.raises(ConfigurationError, match="autocommit"):
                await arecord_once(connection, event, "billing.charge", schema=schema)
            assert not connection.in_transaction()
            async with connection.begin():  # begun by the caller: still theirs after the refusal
                with pytest.raises(ConfigurationError, match="autocommit"):
                    await arecord_once(connection, event, "billing.charge", schema=schema)
                assert connection.in_transaction()
        async with AsyncSession(engine) as session:
            with pytest.raises(ConfigurationError, match="autocommit"):
                await arecord_once(session, event, "billing.charge", schema=schema)
            assert not session.in_transaction()
            async with session.begin():
                with pytest.raises(ConfigurationError, match="autocommit"):
                    await arecord_once(session, event, "billing.charge", schema=schema)
                assert session.in_transaction()
                assert await session.scalar(text(f"SELECT count(*) FROM {table}")) == 0  # nothing recorded


@pytest.mark.parametrize("mode", ["conditional_savepoint", "rollback_only"])
@pytest.mark.parametrize("driver", ["sqlite+aiosqlite", "postgresql+asyncpg", "postgresql+psycopg"])
async def test_a_refused_record_once_leaves_the_transaction_a_session_joined_to_the_caller(
    tmp_path: Path, pg_schema: str, driver: str, mode: JoinTransactionMode
) -> None:
    # A session that joins a transaction begun on its connection (conditional_savepoint, the
    # default, joins one with no savepoint as rollback_only) rolls it back with its own. Refused,
    # record_once rolled back the session's transaction it had begun, and the caller's with it: the
    # caller's commit then raised "This transaction is inactive".
    event = Event("order.paid")
    async with (
        autocommit_inbox(driver, tmp_path, pg_schema) as (engine, schema, table),
        engine.connect() as connection,
    ):
        transaction = await connection.begin()
        async with AsyncSession(bind=connection, join_transaction_mode=mode) as session:
            with pytest.raises(ConfigurationError, match="autocommit"):
                await arecord_once(session, event, "billing.charge", schema=schema)
            assert not session.in_transaction()  # what it began is ended
            assert transaction.is_active  # what the caller began is the caller's
            async with session.begin():  # the session begins again, as before the call
                recorded = await session.scalar(text(f"SELECT count(*) FROM {table}"))
        await transaction.commit()
    assert recorded == 0


async def test_the_inbox_through_sqlalchemy_on_aiosqlite_and_on_a_connection_that_begins_at_it(
    tmp_path: Path,
) -> None:
    # aiosqlite's DBAPI connection (SQLAlchemy's adapter) has no in_transaction: the check read it
    # there and raised AttributeError, on the savepoint recipe and on an AUTOCOMMIT engine alike
    path = tmp_path / "app.db"
    SQLiteStore(path)._connect().close()  # the SQLite log's tables, inbox included
    event = Event("order.paid")
    explicit = create_async_engine(f"sqlite+aiosqlite:///{path}")
    begin_explicitly(explicit.sync_engine)  # the recipe, on aiosqlite
    autocommit = create_async_engine(f"sqlite+aiosqlite:///{path}", isolation_level="AUTOCOMMIT")
    try:
        async with AsyncSession(explicit) as session, session.begin():
            assert await arecord_once(session, event, "billing.charge")
            await session.rollback()  # the work failed: the pair goes with it
        async with AsyncSession(autocommit) as session, session.begin():
            with pytest.raises(ConfigurationError, match="autocommit"):
                await arecord_once(session, event, "billing.charge")
        async with explicit.connect() as connection:
            assert await arecord_once(connection, event, "billing.charge")  # the first statement
            await connection.rollback()
        async with explicit.connect() as connection:
            assert await connection.scalar(text("SELECT count(*) FROM tidings_inbox")) == 0
    finally:
        await explicit.dispose()
        await autocommit.dispose()
    # Commit as you go: the insert, the first statement, would autobegin and so run inside the
    # recipe's BEGIN; it was refused, the driver showing no transaction before it
    engine = create_engine(f"sqlite:///{path}")
    begin_explicitly(engine)
    with engine.connect() as connection:
        assert record_once(connection, event, "billing.charge")
        connection.rollback()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM tidings_inbox")).scalar() == 0
        assert record_once(connection, event, "billing.charge")
        connection.commit()
        assert not record_once(connection, event, "billing.charge")
    engine.dispose()
