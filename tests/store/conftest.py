"""What the tests of the durable logs share: a factory of store objects on one log, SQLite or PostgreSQL,
and a way to alter a row behind the store's back."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tidings.store import SQLiteStore
from tidings.store.postgres import PostgresStore

from ..conftest import POSTGRES_DSN

DurableStore = SQLiteStore | PostgresStore
Log = Callable[[], DurableStore]  # a new store object on the same log, as a restarted process makes


@pytest.fixture(params=["sqlite", "postgres"])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Log:
    if request.param == "sqlite":
        return lambda: SQLiteStore(tmp_path / "log.db")
    schema: str = request.getfixturevalue("pg_schema")
    return lambda: PostgresStore(POSTGRES_DSN, schema=schema)


async def overwrite_payload(store: DurableStore, event_id: str, payload: str) -> None:
    """What a version that did not escape wrote for a user's marker-shaped dict (or a hand edit)."""
    if isinstance(store, SQLiteStore):
        with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as connection:
            connection.execute(
                "UPDATE tidings_deliveries SET payload = ? WHERE event_id = ?", (payload, event_id)
            )
        return
    connection = await asyncpg.connect(POSTGRES_DSN)
    try:
        await connection.execute(
            f"UPDATE {store.deliveries_table} SET payload = $1 WHERE event_id = $2", payload, event_id
        )
    finally:
        await connection.close()
