"""The PostgreSQL event log: several app instances share one log, each delivery run by one at a time.

Why asyncpg directly, not SQLAlchemy: the log's statements are few and fixed, asyncpg is the fastest
asyncio driver and pipelines ``executemany``, and it adds one dependency instead of two. (The
transactional outbox, which must write in *your* SQLAlchemy transaction, is where SQLAlchemy belongs.)

Claims use ``FOR UPDATE SKIP LOCKED``: two instances asking at once never get the same delivery, and
neither waits for the other. Leases are reckoned in the database's clock, so instances whose clocks
disagree still agree on when a lease has run out.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

from ..exceptions import ConfigurationError, StoreError
from ._rows import (
    COLUMNS,
    NAME_COLUMNS,
    NOT_REVIVED,
    chosen_keys,
    claimed_deliveries,
    dead_letter_rows,
    delivery_rows,
    letter_keys,
    listing,
    read_letter,
    selected_rows,
    unreadable_letters,
)
from .base import DeadLetter, Delivery, UnreadableLetter
from .codec import DEFAULT_MAX_PAYLOAD_BYTES

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    import asyncpg

    from .._core.envelope import Event

    Run: TypeAlias = Callable[[asyncpg.Connection], Awaitable[Any]]

__all__ = ["PostgresStore"]

logger = logging.getLogger("tidings")

_Letter = TypeVar("_Letter", DeadLetter, UnreadableLetter)
_NOW: Final = "extract(epoch from clock_timestamp())"
_MAX_BATCH: Final = 2000
_BY_KEY: Final = "(event_id, handler) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
"""Rows whose (event id, handler) is among the keys given as two arrays ($1, $2): one statement."""
_IDENTIFIER: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _schema_sql(table: str, inbox: str, index: str) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    event_id     text             NOT NULL,
    handler      text             NOT NULL,
    name         text             NOT NULL,
    payload      text             NOT NULL,
    headers      text             NOT NULL,
    timestamp_ns bigint           NOT NULL,
    status       text             NOT NULL DEFAULT 'pending',
    attempts     integer          NOT NULL DEFAULT 0,
    lease_until  double precision NOT NULL,
    error        text,
    traceback    text,
    failed_at    double precision,
    PRIMARY KEY (event_id, handler)
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (status, lease_until);
CREATE TABLE IF NOT EXISTS {inbox} (
    event_id text             NOT NULL,
    handler  text             NOT NULL,
    done_at  double precision NOT NULL,
    PRIMARY KEY (event_id, handler)
);
"""


class _Op:
    __slots__ = ("future", "run", "what")

    def __init__(self, run: Run, what: str, future: asyncio.Future[Any] | None) -> None:
        self.run = run
        self.what = what
        self.future = future


class PostgresStore:
    """A durable event log in PostgreSQL, shared by every instance of the app.

    Needs the ``postgres`` extra (``pip install "tidings[postgres]"``, which brings asyncpg).

    Writes are queued and committed together by one writer task, as with
    :class:`~tidings.store.SQLiteStore`; reads and claims use the same connection.

    Args:
        dsn: a libpq connection string or URL, e.g. ``"postgresql://app@db/app"``.
        schema: the schema to keep the tables in (created if missing); ``None`` uses the
            connection's search path.
        max_payload_bytes: larger payloads are refused (:class:`~tidings.SerializationError`); the
            event is still handled, but not durably.
        connect_timeout: seconds to wait for the server when connecting.
        command_timeout: seconds one statement may take before it fails (the server stopped
            answering).
        close_timeout: seconds closing waits for queued writes to commit; past it each one not
            committed fails (logged, or raised to whoever awaits it, as ``StoreError``), the one
            being written included, and the connection is dropped, so a server that stopped
            answering cannot hold up the app's shutdown.

    Example:
        >>> from tidings import EventBus
        >>> from tidings.store.postgres import PostgresStore
        >>> bus = EventBus(store=PostgresStore("postgresql://app@127.0.0.1/app"))
    """

    durable = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        close_timeout: float = 5.0,
    ) -> None:
        try:
            import asyncpg  # noqa: F401 - fail here, with the hint, not at the first event
        except ImportError as exc:  # pragma: no cover - the extra is installed in the test env
            raise ConfigurationError('PostgresStore needs asyncpg: pip install "tidings[postgres]"') from exc
        if schema is not None and not _IDENTIFIER.match(schema):
            raise ConfigurationError(f"schema must be a plain SQL identifier, got {schema!r}")
        if not isinstance(max_payload_bytes, int) or max_payload_bytes < 1:
            raise ConfigurationError(f"max_payload_bytes must be an int >= 1, got {max_payload_bytes!r}")
        self.dsn = dsn
        self.schema = schema
        self.max_payload_bytes = max_payload_bytes
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.close_timeout = close_timeout
        prefix = f'"{schema}".' if schema else ""
        self._table = f"{prefix}tidings_deliveries"
        self.inbox_table = f"{prefix}tidings_inbox"
        self._queue: list[_Op] = []
        self._in_flight: list[_Op] = []  # the batch the writer took from the queue and has not settled
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        # aclose() ran: a write nobody awaits is refused (StoreError, as SQLiteStore's), rather than
        # reopening a connection that nothing would close; an awaited call reopens the log
        self._closed = False
        self._connection: asyncpg.Connection | None = None

    @property
    def deliveries_table(self) -> str:
        """The (schema-qualified) table the transactional outbox writes deliveries into."""
        return self._table

    # -- lifecycle -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, create the schema and tables if missing, and start the writer. Idempotent.

        Raises:
            StoreError: the server cannot be reached or refuses the connection.
        """
        self._start_writer()
        await self._call(lambda connection: _noop(), "open")

    def _start_writer(self) -> None:
        if self._writer is not None and not self._writer.done():
            return
        self._wakeup = asyncio.Event()
        self._writer = asyncio.get_running_loop().create_task(self._write(), name="tidings postgres writer")
        if self._queue:
            self._wakeup.set()

    async def _connect(self) -> asyncpg.Connection:
        import asyncpg

        # command_timeout: a server that stops answering fails a statement instead of hanging it
        connection = await asyncpg.connect(
            self.dsn, timeout=self.connect_timeout, command_timeout=self.command_timeout
        )
        try:
            async with connection.transaction():
                # one instance at a time creates the tables (CREATE ... IF NOT EXISTS races otherwise)
                await connection.execute("SELECT pg_advisory_xact_lock(hashtext('tidings.schema'))")
                if self.schema:
                    await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                index = f"{self.schema}_tidings_claim" if self.schema else "tidings_deliveries_claim"
                await connection.execute(_schema_sql(self._table, self.inbox_table, index))
        except BaseException:
            await connection.close()
            raise
        return connection

    async def aclose(self) -> None:
        """Commit what is queued, then disconnect. Idempotent."""
        writer = self._writer
        if writer is None:
            self._closed = True
            return
        if not writer.done():
            try:
                async with asyncio.timeout(self.close_timeout):
                    await self.flush()
            except StoreError as exc:
                logger.error("%s", exc)
            except TimeoutError:
                logger.error(
                    "the PostgreSQL event log did not answer within %ss while closing: %d queued "
                    "write(s) were not committed (completions among them run again: at least once)",
                    self.close_timeout,
                    len(self._queue),
                )
            self._closed = True  # from here a write nobody awaits is refused
            writer.cancel()
            try:
                await writer
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            # Cut off mid-batch (past the bound), or queued behind the flush: each fails, and says
            # what it was, rather than be forgotten (and an awaited one wait forever). The batch
            # was cancelled mid-transaction: asyncpg rolls it back, but a COMMIT the server took
            # before the cancel reached it stands, hence "may".
            in_flight, self._in_flight = self._in_flight, []
            for op in in_flight:
                self._fail(op, StoreError("the log closed while writing it (it may not have committed)"))
            leftovers, self._queue = self._queue, []
            for op in leftovers:
                self._fail(op, StoreError("the log closed before it was written"))
        self._writer = None
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await connection.close(timeout=min(self.connect_timeout, self.close_timeout))
            except Exception:  # a server that does not answer: drop the socket, nothing to save
                connection.terminate()

    # -- the writer ------------------------------------------------------------------------------
    async def _write(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                self._in_flight = batch  # for aclose() to settle, should it cancel the writer
                try:
                    connection = await self._connected()
                except Exception as exc:  # the server is gone: these fail, the writer carries on
                    for op in batch:
                        self._fail(op, exc, opening=True)
                    self._in_flight = []
                    continue
                await self._commit(connection, batch)
                self._in_flight = []

    async def _connected(self) -> asyncpg.Connection:
        connection = self._connection
        if connection is None or connection.is_closed():
            connection = self._connection = await self._connect()
        return connection

    async def _commit(self, connection: asyncpg.Connection, batch: list[_Op]) -> None:
        results = []
        try:
            async with connection.transaction():
                for op in batch:
                    results.append(await op.run(connection))
        except Exception as exc:  # a failed write must never stop the writer
            if connection.is_closed():
                self._connection = None
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            for index, op in enumerate(batch):  # find the one that failed; the others still commit
                try:
                    connection = await self._connected()
                except Exception as reconnect_error:  # gone for good: fail what is left, loudly
                    for rest in batch[index:]:
                        self._fail(rest, reconnect_error, opening=True)
                    return
                await self._commit(connection, [op])
                self._in_flight = batch[index + 1 :]  # that one is settled: not for aclose() to fail
            return
        for op, result in zip(batch, results, strict=True):
            if op.future is not None and not op.future.done():
                op.future.set_result(result)

    def _fail(self, op: _Op, exc: Exception, *, opening: bool = False) -> None:
        verb = "open" if opening else op.what
        error = StoreError(f"the PostgreSQL event log could not {verb}: {exc}")
        error.__cause__ = exc
        if op.future is not None:
            if not op.future.done():
                op.future.set_exception(error)
        else:
            logger.error("%s", error, exc_info=exc)

    def _submit(self, run: Run, what: str) -> None:
        if self._closed:  # as SQLiteStore: the caller says what is not written
            raise StoreError(f"the PostgreSQL event log is closed: could not {what}")
        self._queue.append(_Op(run, what, None))
        self._start_writer()
        assert self._wakeup is not None
        self._wakeup.set()

    async def _call(self, run: Run, what: str) -> Any:
        self._closed = False  # someone waits for it (a start, a read after close): it reopens the log
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Op(run, what, future))
        self._start_writer()
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    # -- writes behind handler work ------------------------------------------------------------
    async def record(self, deliveries: Sequence[tuple[Event, str]], *, lease: float) -> dict[str, str]:
        """Write pending deliveries; return the events that could not be written, with why."""
        rows, refused = delivery_rows(deliveries, self.max_payload_bytes, lease)

        async def run(connection: asyncpg.Connection) -> None:
            await connection.executemany(
                f"INSERT INTO {self._table} "
                f"(event_id, handler, name, payload, headers, timestamp_ns, lease_until) "
                f"VALUES ($1, $2, $3, $4, $5, $6, {_NOW} + $7) ON CONFLICT DO NOTHING",
                rows,
            )

        if rows:
            await self._call(run, f"record {len(rows)} deliveries")
        return refused

    def complete(self, deliveries: Sequence[tuple[str, str]]) -> None:
        """Delete deliveries that succeeded."""
        rows = list(deliveries)

        async def run(connection: asyncpg.Connection) -> None:
            await connection.executemany(
                f"DELETE FROM {self._table} WHERE event_id = $1 AND handler = $2 AND status = 'pending'", rows
            )

        self._submit(run, f"complete {len(rows)} deliveries")

    def retry_later(self, event_id: str, handler: str, *, attempts: int, due_in: float, lease: float) -> None:
        """Note a failed attempt; the lease covers the wait and the next attempt."""

        async def run(connection: asyncpg.Connection) -> None:
            await connection.execute(
                f"UPDATE {self._table} SET attempts = $1, lease_until = {_NOW} + $2 "
                f"WHERE event_id = $3 AND handler = $4 AND status = 'pending'",
                attempts,
                due_in + lease,
                event_id,
                handler,
            )

        self._submit(run, f"note a failed attempt of {event_id}/{handler}")

    def renew(self, deliveries: Sequence[tuple[str, str]], *, lease: float) -> None:
        """Extend the leases of deliveries this process is still working on (never shortening one)."""
        rows = [(event_id, handler, lease) for event_id, handler in deliveries]

        async def run(connection: asyncpg.Connection) -> None:
            await connection.executemany(
                f"UPDATE {self._table} SET lease_until = greatest(lease_until, {_NOW} + $3) "
                f"WHERE event_id = $1 AND handler = $2 AND status = 'pending'",
                rows,
            )

        self._submit(run, f"renew the leases of {len(rows)} deliveries")

    def bury(self, letters: Sequence[DeadLetter]) -> None:
        """Make dead letters of these deliveries (writing them whole if they were not recorded)."""
        rows = dead_letter_rows(letters, self.max_payload_bytes)

        async def run(connection: asyncpg.Connection) -> None:
            await connection.executemany(
                f"INSERT INTO {self._table} (event_id, handler, name, payload, headers, timestamp_ns, "
                f"attempts, error, traceback, failed_at, status, lease_until) "
                f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'dead', 0) "
                f"ON CONFLICT (event_id, handler) DO UPDATE SET status = 'dead', "
                f"attempts = excluded.attempts, error = excluded.error, "
                f"traceback = excluded.traceback, failed_at = excluded.failed_at",
                rows,
            )

        if rows:
            self._submit(run, f"write {len(rows)} dead letter(s)")

    # -- reads and administration ----------------------------------------------------------------
    async def claim(self, *, limit: int, lease: float) -> list[Delivery]:
        """Lease pending deliveries whose lease has run out, oldest event first; never one that
        another instance is claiming at the same moment (``FOR UPDATE SKIP LOCKED``)."""

        async def run(connection: asyncpg.Connection) -> list[Delivery]:
            rows = await connection.fetch(
                f"UPDATE {self._table} AS d SET lease_until = {_NOW} + $1 FROM ("
                f"SELECT event_id, handler FROM {self._table} "
                f"WHERE status = 'pending' AND lease_until <= {_NOW} "
                f"ORDER BY event_id LIMIT $2 FOR UPDATE SKIP LOCKED) AS c "
                f"WHERE d.event_id = c.event_id AND d.handler = c.handler "
                f"RETURNING d.event_id, d.handler, d.name, d.payload, d.headers, d.timestamp_ns, d.attempts",
                lease,
                limit,
            )
            # read here, in the claim's transaction: a row that cannot be read becomes a dead letter in it
            deliveries, unreadable = claimed_deliveries(rows)
            if unreadable:
                await connection.executemany(
                    f"UPDATE {self._table} SET status = 'dead', error = $1, traceback = '', failed_at = $2 "
                    f"WHERE event_id = $3 AND handler = $4",
                    unreadable,
                )
            return deliveries

        result: list[Delivery] = await self._call(run, "claim deliveries")
        return result

    async def dead_letters(
        self,
        *,
        ids: Sequence[str] | None = None,
        event: str | None = None,
        handler: str | None = None,
    ) -> list[DeadLetter]:
        """The dead letters that pass the filter, oldest event first (by ids: only their rows are read)."""
        return await self._read_dead(ids, event, handler, listing(), "list dead letters")

    async def unreadable(
        self,
        *,
        ids: Sequence[str] | None = None,
        event: str | None = None,
        handler: str | None = None,
    ) -> list[UnreadableLetter]:
        """The dead letters that pass the filter but cannot be read back, oldest event first."""
        return await self._read_dead(ids, event, handler, unreadable_letters, "read dead letters")

    async def _read_dead(
        self,
        ids: Sequence[str] | None,
        event: str | None,
        handler: str | None,
        read: Callable[[list[Sequence[Any]]], list[_Letter]],
        what: str,
    ) -> list[_Letter]:
        """``read`` of the rows of the dead letters that pass the filter (only they are decoded)."""
        keys = None if ids is None else letter_keys(ids)
        rows = await self._call(lambda connection: self._dead_rows(connection, keys, COLUMNS), what)
        # decoded on a thread: thousands of rows would hold up the event loop
        return await asyncio.to_thread(read, selected_rows(rows, event=event, handler=handler))

    async def _dead_rows(
        self,
        connection: asyncpg.Connection,
        keys: Sequence[tuple[str, str]] | None,
        columns: str,
        *,
        lock: bool = False,
    ) -> list[Any]:
        """The rows of ``columns`` of the dead letters with these (event id, handler) keys, by
        primary key, or of every dead letter (``None``); oldest event first. One statement.

        ``lock``: the rows are locked until the transaction ends (``FOR UPDATE``), in that order.
        """
        where, args = ("", ()) if keys is None else (f"AND {_BY_KEY} ", _key_arrays(keys))
        rows: list[Any] = await connection.fetch(
            f"SELECT {columns} FROM {self._table} WHERE status = 'dead' {where}ORDER BY event_id, handler"
            + (" FOR UPDATE" if lock else ""),
            *args,
        )
        return rows

    async def revive(self, ids: Sequence[str], *, lease: float) -> list[DeadLetter]:
        """Turn dead letters back into pending deliveries leased to this process.

        Two statements however many ids there are: one locks and reads their rows, one turns those
        that read back into pending deliveries (a round trip per id took seconds for thousands).
        """
        keys = letter_keys(ids)

        async def run(connection: asyncpg.Connection) -> list[DeadLetter]:
            # locked: a replay of the same letters by another process waits, then finds them pending
            rows = {
                (row[0], row[1]): row for row in await self._dead_rows(connection, keys, COLUMNS, lock=True)
            }
            revived = [
                letter
                for key in keys  # in the order given, each once
                if key in rows and (letter := read_letter(rows[key], NOT_REVIVED)) is not None
            ]
            if revived:
                await connection.execute(
                    f"UPDATE {self._table} SET status = 'pending', attempts = 0, lease_until = {_NOW} + $3, "
                    f"error = NULL, traceback = NULL, failed_at = NULL WHERE {_BY_KEY}",
                    *_key_arrays([(letter.event.id, letter.handler) for letter in revived]),
                    lease,
                )
            return revived

        result: list[DeadLetter] = await self._call(run, f"revive {len(keys)} dead letter(s)")
        return result

    async def purge(
        self,
        ids: Sequence[str] | None = None,
        *,
        event: str | None = None,
        handler: str | None = None,
    ) -> int:
        """Delete the dead letters that pass the filter, readable or not (their payloads are not read)."""
        keys = None if ids is None else letter_keys(ids)

        async def run(connection: asyncpg.Connection) -> int:
            if event is None and handler is None and keys is None:
                status = await connection.execute(f"DELETE FROM {self._table} WHERE status = 'dead'")
                return int(status.split()[-1])
            chosen = keys
            if chosen is None or event is not None or handler is not None:
                rows = await self._dead_rows(connection, keys, NAME_COLUMNS)
                chosen = chosen_keys(rows, event=event, handler=handler)
            status = await connection.execute(
                f"DELETE FROM {self._table} WHERE status = 'dead' AND {_BY_KEY}", *_key_arrays(chosen)
            )
            return int(status.split()[-1])

        result: int = await self._call(run, "purge dead letters")
        return result

    async def flush(self) -> None:
        """Wait until every write queued so far is committed."""
        if self._writer is not None or self._queue:
            await self._call(lambda connection: _noop(), "flush")

    async def pending_count(self) -> int:
        """How many deliveries are pending (recorded, not done, not dead)."""

        async def run(connection: asyncpg.Connection) -> int:
            return int(
                await connection.fetchval(f"SELECT count(*) FROM {self._table} WHERE status = 'pending'")
            )

        result: int = await self._call(run, "count pending deliveries")
        return result

    def __repr__(self) -> str:
        state = "open" if self._connection is not None else "closed"
        return f"<PostgresStore schema={self.schema!r} {state}>"


def _key_arrays(keys: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The event ids and the handlers of ``keys``: the two arrays :data:`_BY_KEY` takes."""
    return [event_id for event_id, _ in keys], [handler for _, handler in keys]


async def _noop() -> None:
    return None
