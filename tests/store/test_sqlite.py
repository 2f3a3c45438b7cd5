"""The SQLite log's own cases: durability across instances, refusals, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from tidings import ConfigurationError, Event, StoreError
from tidings.store import SQLiteStore, inbox

pytestmark = pytest.mark.anyio


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def test_what_one_instance_recorded_another_claims(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    first = SQLiteStore(path)
    await first.open()
    await first.record([(Event("a", 1), "h")], lease=0)
    await first.aclose()
    await first.aclose()  # idempotent
    second = SQLiteStore(path)
    await second.open()
    [delivery] = await second.claim(limit=10, lease=60)
    assert delivery.event.payload == 1
    await second.aclose()


async def test_payloads_are_json_with_common_types_and_never_pickle(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    payload = {
        "point": Point(1, 2),
        "when": dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC),
        "day": dt.date(2026, 11, 23),
        "id": uuid.UUID(int=1),
        "price": Decimal("9.99"),
        "tags": {"a"},
        "color": Color.RED,
    }
    await store.record([(Event("a", payload), "h")], lease=0)
    [delivery] = await store.claim(limit=1, lease=60)
    assert delivery.event.payload == {
        "point": {"x": 1, "y": 2},
        "when": "2026-11-23T12:00:00+00:00",
        "day": "2026-11-23",
        "id": "00000000-0000-0000-0000-000000000001",
        "price": "9.99",
        "tags": ["a"],
        "color": "red",
    }
    await store.aclose()


async def test_unserialisable_and_oversized_payloads_are_refused_by_id(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db", max_payload_bytes=100)
    good, bad, big = Event("a", 1), Event("a", object()), Event("a", "x" * 200)
    refused = await store.record([(good, "h"), (bad, "h"), (big, "h")], lease=0)
    assert set(refused) == {bad.id, big.id}
    assert "is not JSON-serialisable" in refused[bad.id]
    assert "over the event log's limit of 100" in refused[big.id]
    assert [d.event.id for d in await store.claim(limit=10, lease=60)] == [good.id]
    await store.aclose()


async def test_a_path_that_is_not_a_database_fails_clearly(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)  # a directory
    with pytest.raises(StoreError, match="could not open"):
        await store.open()
    with pytest.raises(StoreError):
        await store.dead_letters()
    await store.aclose()


async def test_a_failing_write_is_logged_and_the_others_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()

    def broken(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO no_such_table VALUES (1)")

    store._submit(broken, "write something impossible")
    await store.record([(Event("a", 1), "h")], lease=0)
    assert len(await store.claim(limit=10, lease=60)) == 1
    assert "could not write something impossible: no such table" in caplog.text
    await store.aclose()


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="MemoryStore"):
        SQLiteStore(":memory:")
    with pytest.raises(ConfigurationError, match="synchronous"):
        SQLiteStore("x.db", synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_payload_bytes"):
        SQLiteStore("x.db", max_payload_bytes=0)
    assert "closed" in repr(SQLiteStore("x.db"))


def test_the_inbox_records_a_pair_once_and_rolls_back_with_the_work(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        inbox.create_table(db)
    event = Event("a")
    db = sqlite3.connect(path)
    assert inbox.record_once(db, event, "h")
    db.rollback()  # the work failed: the pair goes with it
    assert inbox.record_once(db, event.id, "h")
    db.commit()
    assert not inbox.record_once(db, event, "h")
    assert inbox.record_once(db, event, "other")
    db.close()


def test_stores_by_url() -> None:
    from tidings import EventBus
    from tidings.store import MemoryStore, store_from_url
    from tidings.store.postgres import PostgresStore

    assert isinstance(store_from_url("memory://"), MemoryStore)
    relative = store_from_url("sqlite:///events.db")
    assert isinstance(relative, SQLiteStore)
    assert relative.path == "events.db"
    absolute = store_from_url("sqlite:////var/lib/app/events.db")
    assert isinstance(absolute, SQLiteStore)
    assert absolute.path == "/var/lib/app/events.db"
    pg = store_from_url("postgresql://app@db:5432/app?schema=events&sslmode=disable")
    assert isinstance(pg, PostgresStore)
    assert (pg.schema, pg.dsn) == ("events", "postgresql://app@db:5432/app?sslmode=disable")
    assert isinstance(EventBus(store="sqlite:///x.db").store, SQLiteStore)
    for bad in ("sqlite://", "sqlite://host/x.db", "redis://localhost"):
        with pytest.raises(ConfigurationError):
            store_from_url(bad)


def test_a_bad_store_url_is_reported_without_its_password() -> None:
    from tidings.store import store_from_url

    for bad in ("postgresq://app:s3cret@db/app", "sqlite://app:s3cret@host/x.db"):
        with pytest.raises(ConfigurationError) as caught:
            store_from_url(bad)
        assert "s3cret" not in str(caught.value)
        assert "app:***@" in str(caught.value)
    with pytest.raises(ConfigurationError, match="the store URL cannot be read: Invalid IPv6 URL") as caught:
        store_from_url("postgresql://app:s3cret@[::1/app")  # a ValueError from urlsplit before
    assert "s3cret" not in str(caught.value) and caught.value.__cause__ is None


async def test_listing_dead_letters_does_not_lock_out_the_writes_of_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tidings.store import sqlite as sqlite_module
    from tidings.store._rows import listed_letters
    from tidings.store.base import DeadLetter

    app = SQLiteStore(tmp_path / "log.db", busy_timeout=0)  # a write lock held elsewhere fails it at once
    cli = SQLiteStore(tmp_path / "log.db")
    await app.open()
    await cli.open()
    app.bury([DeadLetter(Event("a", 1), "h", 1, "E: x", "", DeadLetter.now())])
    await app.flush()
    reading, release = threading.Event(), threading.Event()

    def held(rows: Sequence[Sequence[Any]]) -> list[DeadLetter]:  # a long listing, in mid-read
        reading.set()
        release.wait(10)
        return listed_letters(rows, log=True)

    monkeypatch.setattr(sqlite_module, "listing", lambda: held)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(cli.dead_letters)
            await anyio.to_thread.run_sync(reading.wait, 10)
            try:
                assert await app.record([(Event("b", 2), "h")], lease=60) == {}
            finally:
                release.set()
    finally:
        await app.aclose()
        await cli.aclose()


def test_the_inbox_refuses_an_autocommit_connection_outside_a_transaction(tmp_path: Path) -> None:
    # there the pair would commit alone, before the work: work that then failed would be skipped
    # when the event is delivered again
    event = Event("order.paid")
    db = sqlite3.connect(tmp_path / "app.db", isolation_level=None)  # autocommit: no implicit BEGIN
    inbox.create_table(db)
    db.execute("CREATE TABLE charges (n INTEGER)")
    with pytest.raises(ConfigurationError, match="autocommit"):
        inbox.record_once(db, event, "billing.charge")
    db.execute("BEGIN")  # a transaction of its own: the pair goes with the work
    assert inbox.record_once(db, event, "billing.charge")
    db.execute("INSERT INTO charges VALUES (1)")
    db.execute("ROLLBACK")  # the work failed
    db.execute("BEGIN")
    assert inbox.record_once(db, event, "billing.charge")  # so the next delivery does it
    db.execute("COMMIT")
    db.close()


async def test_a_batch_that_cannot_take_the_write_lock_fails_at_once_not_once_per_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Tried again one by one, each write would wait out busy_timeout in turn: a writer (and a
    # closing app) held up that many times over while another process holds the lock.
    path = tmp_path / "log.db"
    store = SQLiteStore(path, busy_timeout=0.2)
    began: list[str] = []
    connect = store._connect

    def traced() -> sqlite3.Connection:
        connection = connect()
        connection.set_trace_callback(lambda sql: began.append(sql) if sql.startswith("BEGIN") else None)
        return connection

    store._connect = traced  # type: ignore[method-assign]
    await store.open()
    entered, gate = threading.Event(), threading.Event()

    def hold(connection: sqlite3.Connection) -> None:  # keeps the writer busy while writes queue up
        entered.set()
        assert gate.wait(10)

    holder = asyncio.ensure_future(store._call(hold, "hold the writer", reads_only=True))
    assert await anyio.to_thread.run_sync(entered.wait, 10)
    before = len(began)
    for n in range(5):  # one batch, queued behind the writer's current one...
        store.complete([(f"01J00000000000000000000{n:03d}", "audit")])
    flushing = asyncio.ensure_future(store.flush())
    await asyncio.sleep(0)  # ...with the flush in it
    assert store._queue.qsize() == 6
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process takes the write lock, and keeps it
    try:
        gate.set()
        await holder
        with pytest.raises(StoreError, match="could not flush: database is locked"):
            await flushing
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert began[before:] == ["BEGIN IMMEDIATE"]  # tried once for the batch, then failed as one
    assert caplog.text.count("could not complete 1 deliveries: database is locked") == 5
    assert await store.pending_count() == 0  # the log works again once the lock is let go
    await store.aclose()


class _RollbackFails(sqlite3.Connection):
    """A connection whose ROLLBACK fails, as on a disk error."""

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "ROLLBACK":
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)


async def test_a_rollback_that_fails_costs_the_writer_its_connection_not_its_life(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_connect: Callable[..., sqlite3.Connection] = sqlite3.connect
    connections: list[sqlite3.Connection] = []

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:  # the writer's first one is broken
        if not connections:
            kwargs["factory"] = _RollbackFails
        connection = real_connect(*args, **kwargs)
        connections.append(connection)
        return connection

    def broken(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO no_such_table VALUES (1)")  # fails: the batch rolls back

    monkeypatch.setattr(sqlite3, "connect", connect)
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    with anyio.fail_after(10):
        with pytest.raises(StoreError, match="could not break the batch: disk I/O error"):
            await store._call(broken, "break the batch")
        # the writer lives on, on a new connection: later calls are answered (they used to wait forever)
        assert await store.record([(Event("a", 1), "h")], lease=60) == {}
        assert await store.pending_count() == 1
        await store.aclose()
    assert [type(connection) for connection in connections] == [_RollbackFails, sqlite3.Connection]


class _ExitsWhenDumped:
    def model_dump(self, **options: Any) -> Any:
        raise SystemExit(3)


async def test_a_payload_that_calls_sys_exit_in_the_writer_thread_fails_its_write_not_the_writer(
    tmp_path: Path,
) -> None:
    # The writer thread encodes payloads. SystemExit there ends the thread, not the process: it
    # used to, and every later call of the log (a closing app's flush among them) waited forever.
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    with anyio.fail_after(10):
        with pytest.raises(StoreError, match="could not record 2 deliveries: SystemExit: 3"):
            await store.record([(Event("a", 1), "h"), (Event("a", _ExitsWhenDumped()), "h")], lease=60)
        assert await store.record([(Event("a", 2), "h")], lease=60) == {}  # the writer goes on
        assert await store.pending_count() == 1
        await store.aclose()


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


async def test_a_failure_whose_str_raises_is_reported_and_the_writer_goes_on(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()

    def fails(connection: sqlite3.Connection) -> None:
        raise _Unprintable

    with anyio.fail_after(10):
        with pytest.raises(
            StoreError, match=r"could not fail oddly: _Unprintable: <its str\(\) raised RuntimeError>"
        ):
            await store._call(fails, "fail oddly")
        assert await store.record([(Event("a", 1), "h")], lease=60) == {}
        assert await store.pending_count() == 1
        await store.aclose()
