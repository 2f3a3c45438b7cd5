"""What the tests of the durable logs share: a factory of store objects on one log, SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
