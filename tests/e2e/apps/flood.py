"""A process that floods a bus on a durable log; tests/e2e/test_crash.py kills it with SIGKILL.

The log is SQLite (``$FLOOD_LOG``) or, with ``$FLOOD_PG_SCHEMA`` set, PostgreSQL (``$FLOOD_PG_DSN``).

``python -m tests.e2e.apps.flood emit``: emits 10,000 ``order.paid`` events in chunks, printing
``recorded N`` once the first N are durable (``bus.flush()``), while the handlers work through them.
``python -m tests.e2e.apps.flood resume``: starts the bus on the same log, waits until the log holds
nothing pending, prints ``idle`` and exits.

Two handlers: ``audit.count`` is at-least-once (it appends each order number to a file, so a
redelivery shows up as a duplicate line); ``billing.charge`` is idempotent (the inbox and the charge
commit in one SQLite transaction, so no order is charged twice).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading

from tidings import Event, EventBus, Limits
from tidings.store import SQLiteStore, inbox
from tidings.store.postgres import PostgresStore

TOTAL = 10_000
CHUNK = 250

LOG = os.environ["FLOOD_LOG"]
APP_DB = os.environ["FLOOD_APP_DB"]
HANDLED = os.open(os.environ["FLOOD_HANDLED"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

store: SQLiteStore | PostgresStore
if os.environ.get("FLOOD_PG_SCHEMA"):
    store = PostgresStore(os.environ["FLOOD_PG_DSN"], schema=os.environ["FLOOD_PG_SCHEMA"])
else:
    store = SQLiteStore(LOG)
bus = EventBus(store=store, resubmit_after=0.5, limits=Limits(max_threads=2))
_local = threading.local()


def _app_db() -> sqlite3.Connection:
    db: sqlite3.Connection | None = getattr(_local, "db", None)
    if db is None:
        db = _local.db = sqlite3.connect(APP_DB, timeout=30)
        db.execute("PRAGMA synchronous=NORMAL")  # WAL (set below): durable against a killed process
    return db


@bus.on("order.paid", name="audit.count")
async def count(event: Event) -> None:
    os.write(HANDLED, f"{event.payload['n']}\n".encode())  # one write(2): whole lines survive SIGKILL


@bus.on("order.paid", name="billing.charge")
def charge(event: Event) -> None:
    db = _app_db()
    try:
        if inbox.record_once(db, event, "billing.charge"):
            db.execute("INSERT INTO charges (n) VALUES (?)", (event.payload["n"],))
        db.commit()
    except BaseException:
        db.rollback()
        raise


async def emit() -> None:
    async with bus:
        for start in range(0, TOTAL, CHUNK):
            for n in range(start, start + CHUNK):
                bus.emit("order.paid", {"n": n})
            await bus.flush()
            print(f"recorded {start + CHUNK}", flush=True)
        print("emitted all", flush=True)
        await asyncio.Event().wait()  # until killed


async def resume() -> None:
    async with bus:
        async with asyncio.timeout(120):
            # the log is written by another thread: its count, polled under a deadline, is the signal
            while await store.pending_count():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await bus.drain()
    print("idle", flush=True)


if __name__ == "__main__":
    with sqlite3.connect(APP_DB) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE IF NOT EXISTS charges (n INTEGER NOT NULL)")
        inbox.create_table(setup)
    asyncio.run(emit() if sys.argv[1] == "emit" else resume())
