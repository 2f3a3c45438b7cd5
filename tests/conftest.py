"""Shared fixtures: an event loop backend per test, and a recorder that waits on conditions, not sleeps."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import asyncpg
import pytest

import tidings
from tidings._core.dispatcher import live_buses, unregister_running
from tidings.store import _rows
from tidings.store.codec import decode_event

# The demo shop keeps its event log in a file: the tests' goes to a directory of their own.
if "SHOP_EVENT_LOG" not in os.environ:
    _shop_dir = tempfile.mkdtemp(prefix="tidings-shop-")
    atexit.register(shutil.rmtree, _shop_dir, ignore_errors=True)
    os.environ["SHOP_EVENT_LOG"] = os.path.join(_shop_dir, "events.db")


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"debug": True}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    backend: tuple[str, dict[str, Any]] = request.param
    return backend


class Recorder:
    """Collects what handlers saw, from any thread, and lets a test wait for it under a deadline."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def add(self, item: Any) -> None:
        with self._lock:
            self.items.append(item)
            waiters = list(self._waiters)
        for loop, changed in waiters:
            loop.call_soon_threadsafe(changed.set)

    async def wait_for(self, condition: Callable[[list[Any]], bool], timeout: float = 5.0) -> list[Any]:
        """Wait until ``condition(items)`` holds; fail the test with what was seen if it never does."""
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(timeout):
                while True:
                    changed = asyncio.Event()
                    with self._lock:
                        if condition(self.items):
                            return list(self.items)
                        self._waiters.append((loop, changed))
                    try:
                        await changed.wait()
                    finally:
                        with self._lock:
                            self._waiters.remove((loop, changed))
        except TimeoutError:
            pytest.fail(f"condition not met within {timeout}s; recorded: {self.items!r}")

    async def wait_count(self, count: int, timeout: float = 5.0) -> list[Any]:
        return await self.wait_for(lambda items: len(items) >= count, timeout)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


class Records(logging.Handler):
    """Hands every record of the ``tidings`` logger to a recorder, so a test can wait for one."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(logging.DEBUG)
        self.recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        self.recorder.add(record)

    async def wait_for(self, text: str) -> logging.LogRecord:
        def found(items: list[Any]) -> bool:
            return any(text in record.getMessage() for record in items)

        items = await self.recorder.wait_for(found)
        record: logging.LogRecord = next(r for r in items if text in r.getMessage())
        return record


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records(Recorder())
    logger = logging.getLogger("tidings")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The event ids of the rows the stores decode (every row they read back is decoded)."""
    seen: list[str] = []
    real = decode_event

    def counting(event_id: str, *row: Any) -> tidings.Event:
        seen.append(event_id)
        return real(event_id, *row)

    monkeypatch.setattr(_rows, "decode_event", counting)
    return seen


@pytest.fixture
def failures() -> list[tidings.HandlerError]:
    return []


@pytest.fixture
def bus(failures: list[tidings.HandlerError]) -> tidings.EventBus:
    return tidings.EventBus(on_failure=failures.append, name="test")


@pytest.fixture(autouse=True)
def no_bus_left_running() -> Iterator[None]:
    """Each test closes the buses it started (``async with bus``, a lifespan) or lets their loop close."""
    yield
    leaked = live_buses()
    for bus in leaked:
        unregister_running(bus)  # keep the next tests independent of this failure
    assert not leaked, f"test left running buses: {leaked}"


# -- PostgreSQL: the machine's real server, a schema of its own per test ------------------------------

POSTGRES_DSN = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


async def _execute_async(sql: str) -> None:
    connection = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _execute(sql: str) -> None:
    # on a thread of its own: the test's event loop may be running in this one already
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _execute_async(sql)).result()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A schema name no other test uses, dropped afterwards. Skips without a server (fails under CI).

    A plain fixture (its SQL runs on a thread and loop of its own), so that parametrised async
    fixtures can ask for it by name.
    """
    try:
        _execute("SELECT 1")
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs PostgreSQL at {POSTGRES_DSN} (../shared/scripts/services-up): {exc}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_DSN} (set TIDINGS_TEST_POSTGRES): {exc}")
    schema = f"tidings_test_{uuid.uuid4().hex[:12]}"
    yield schema
    _execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
