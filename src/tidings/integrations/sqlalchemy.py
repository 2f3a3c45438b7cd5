"""The transactional outbox for SQLAlchemy: an event written in your transaction, released after it commits.

The business write and the event can never disagree: :meth:`Outbox.emit` stages the event on the
session; when the session commits, its (event, handler) deliveries are inserted into the event log
*in the same transaction*, and only once the commit has succeeded are they released to the bus (after
the response, inside a request, like any event). A rollback discards them. A process that dies between
the commit and the handlers loses nothing: the deliveries are in the log, leased, and are resubmitted
when the lease runs out.

Needs the ``sqlalchemy`` extra, and a bus whose store is a :class:`~tidings.store.SQLiteStore` or
:class:`~tidings.store.postgres.PostgresStore` *on the same database* as the session.

Example:
    >>> import asyncio, os, tempfile
    >>> from sqlalchemy import create_engine, text
    >>> from sqlalchemy.orm import Session
    >>> from tidings import Event, EventBus
    >>> from tidings.store import SQLiteStore
    >>> from tidings.integrations.sqlalchemy import Outbox
    >>> path = os.path.join(tempfile.mkdtemp(), "shop.db")
    >>> bus = EventBus(store=SQLiteStore(path))
    >>> outbox = Outbox(bus)
    >>> @bus.on("order.placed", name="mail.confirm")
    ... async def confirm(event: Event) -> None:
    ...     print("confirming order", event.payload["order"])
    >>> engine = create_engine(f"sqlite:///{path}")
    >>> async def main() -> None:
    ...     async with bus:
    ...         with Session(engine) as session, session.begin():
    ...             session.execute(text("CREATE TABLE IF NOT EXISTS orders (id INTEGER)"))
    ...             session.execute(text("INSERT INTO orders VALUES (7)"))
    ...             outbox.emit(session, "order.placed", {"order": 7})
    ...         with Session(engine) as session, session.begin():
    ...             outbox.emit(session, "order.placed", {"order": 8})
    ...             session.rollback()  # never committed: never handled
    >>> asyncio.run(main())
    confirming order 7
"""

from __future__ import annotations

import logging
import re
import threading
from time import time, time_ns
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, cast

from .._core.envelope import EMPTY_HEADERS, Event
from .._core.logs import fields
from ..exceptions import BusStateError, ConfigurationError
from ..store.codec import encode_event
from ..store.inbox import _commits_alone
from ..store.postgres import PostgresStore
from ..store.sqlite import SQLiteStore

try:
    from sqlalchemy import Connection, CursorResult, Transaction, text
    from sqlalchemy import event as sa_event
    from sqlalchemy.exc import StatementError
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session as _Session
except ImportError as exc:  # pragma: no cover - the extra is installed in the test environment
    raise ImportError(
        'tidings.integrations.sqlalchemy needs SQLAlchemy: pip install "tidings[sqlalchemy]"'
    ) from exc

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.orm import Session, SessionTransaction

    from .._core.bus import EventBus

__all__ = ["Outbox", "arecord_once", "record_once"]

logger = logging.getLogger("tidings")

_INSERT: Final = (
    "INSERT INTO {table} (event_id, handler, name, payload, headers, timestamp_ns, lease_until) "
    "VALUES (:event_id, :handler, :name, :payload, :headers, :timestamp_ns, {lease}) "
    "ON CONFLICT DO NOTHING"
)
_RENEW: Final = "UPDATE {table} SET lease_until = {lease} WHERE event_id = :event_id"


class _Staged:
    """An event emitted in a transaction, with its payload already encoded (the caller's bug, if
    it cannot be, is raised in the caller's code, not at commit), and the innermost transaction
    (a savepoint, maybe) it was emitted in."""

    __slots__ = ("connection", "event", "headers", "payload", "transaction", "written_in")

    def __init__(self, event: Event, payload: str, headers: str, transaction: SessionTransaction) -> None:
        self.event = event
        self.payload = payload
        self.headers = headers
        self.transaction = transaction
        self.connection: Connection | None = None  # the one its deliveries were written through
        # the innermost transaction its deliveries were written in: rolled back, it takes them along
        self.written_in: SessionTransaction | None = None

    def within(self, transaction: SessionTransaction) -> bool:
        """Whether the event was emitted in ``transaction``, or in a savepoint inside it."""
        return _inside(self.transaction, transaction)


def _inside(inner: SessionTransaction | None, outer: SessionTransaction) -> bool:
    """Whether ``inner`` is ``outer`` or a transaction (a savepoint) begun inside it."""
    while inner is not None:
        if inner is outer:
            return True
        inner = inner.parent
    return False


class Outbox:
    """Binds events to SQLAlchemy transactions for one bus.

    Args:
        bus: the bus whose handlers run the events; its store must be durable and on the same
            database as the sessions you pass to :meth:`emit`.

    Raises:
        ConfigurationError: the bus's store is not a SQL event log.
    """

    def __init__(self, bus: EventBus) -> None:
        store = bus.store
        if not isinstance(store, SQLiteStore | PostgresStore):
            raise ConfigurationError(
                "the outbox writes into the event log's table, so the bus needs a SQLiteStore or "
                f"PostgresStore on the session's database, not {type(store).__name__}"
            )
        self.bus = bus
        self._table = store.deliveries_table
        self._max_payload_bytes = store.max_payload_bytes
        self._staged_key = f"tidings.outbox.{id(self)}.staged"
        self._written_key = f"tidings.outbox.{id(self)}.written"
        _listen()

    def emit(
        self,
        session: Session | AsyncSession,
        event: object,
        payload: object = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """Stage an event on ``session``'s transaction: written at its commit, handled after it.

        The session must be in a transaction (``session.begin()``, or any statement it has run
        since its last commit): an event that belonged to no transaction could not be discarded
        with one. A rollback, or closing the session without a commit, discards it; so does
        rolling back a savepoint (``begin_nested()``) it was emitted in. A session joined to a
        transaction begun on its connection (``Session(bind=connection)``) commits into that
        transaction: its events run from the log once that commits, when their lease
        (``resubmit_after``) runs out, and never if it rolls back.

        ``event`` and ``payload`` are what :meth:`EventBus.emit <tidings.EventBus.emit>` takes: a
        name and a payload, or a typed event (named after its class); a ``dict`` payload under a
        name with a schema is validated into an instance of it, here.

        Returns:
            The event, with the id its deliveries have in the log.

        Raises:
            TypeError: ``event`` is not a name or a typed event, or a typed event came with a payload.
            EventValidationError: the payload does not fit the schema registered for the name
                (raised here, before anything is staged).
            SerializationError: the payload cannot be written to the log (your transaction is
                untouched: this is raised here, not at commit).
            BusStateError: the session is not in a transaction, or in one that has committed (an
                ``after_commit`` hook) or failed (it must be rolled back).
        """
        sync_session = session.sync_session if isinstance(session, AsyncSession) else session
        transaction = sync_session.get_nested_transaction() or sync_session.get_transaction()
        if transaction is None:
            raise BusStateError(
                "outbox.emit() needs the session to be in a transaction: call session.begin() first "
                "(the event is written by that transaction's commit, and discarded by its rollback)"
            )
        if not transaction.is_active:
            raise BusStateError(
                "outbox.emit() needs a transaction that can still commit the event; the session's "
                "has committed or failed (emit in the transaction that does the work, before its commit)"
            )
        bus = self.bus
        # What bus.emit() does to what it is given, so that an event is the same either way.
        if type(event) is str:
            name = event
        else:
            name, payload = bus.name_and_payload(event, payload, bus.schemas.names)
        payload = bus.schemas.validate(name, payload)
        tracing = bus.tracing
        if tracing is not None:  # the context of the code that emits, as bus.emit() would take it
            headers = tracing.inject(headers)
        built = Event(name, payload, MappingProxyType(dict(headers)) if headers else EMPTY_HEADERS, time_ns())
        staged = _Staged(built, *encode_event(built, self._max_payload_bytes), transaction)
        info = sync_session.info
        info.setdefault(self._staged_key, []).append(staged)
        info.setdefault(_OUTBOXES, {})[self] = None
        return built

    def _write(self, session: Session, *, renew: bool) -> None:
        """before_commit: insert the staged events' deliveries through the transaction's connection.

        A savepoint's commit writes too: its rows then belong to the enclosing transaction, and go
        with it. (Skipping it would lose the events of a savepoint still open when the outermost
        transaction commits: that commit's own before_commit comes while the savepoint is current.)
        It writes every staged event, those emitted outside it too: if the rows are rolled back
        after all (the savepoint's own flush fails, or an enclosing savepoint is rolled back), the
        events emitted outside that savepoint are staged again (:meth:`_roll_back_savepoint`), to
        be written by the next commit.

        A delivery's lease must start when its row is committed: one leased from a savepoint's
        release would be free for any instance to take as soon as the outer transaction commits,
        if that stayed open for ``resubmit_after``, while this one runs it too. So the commit of the
        outermost transaction (``renew``) leases the rows written before it again.
        """
        staged: list[_Staged] = session.info.pop(self._staged_key, [])
        earlier: list[_Staged] = session.info.get(self._written_key, []) if renew else []
        if not staged and not earlier:
            return
        lease = self.bus.resubmit_after
        connection = session.connection()
        written_in = session.get_nested_transaction() or session.get_transaction()
        if connection.dialect.name == "postgresql":
            lease_sql, params = "extract(epoch from clock_timestamp()) + :lease", {"lease": lease}
        else:
            lease_sql, params = ":lease_until", {"lease_until": time() + lease}
        rows: list[dict[str, Any]] = [
            {
                "event_id": item.event.id,
                "handler": spec.name,
                "name": item.event.name,
                "payload": item.payload,
                "headers": item.headers,
                "timestamp_ns": item.event.timestamp_ns,
                **params,
            }
            for item in staged
            for spec in self.bus.registry.resolve(item.event.name)
        ]
        try:
            if earlier:
                renewed = [{"event_id": item.event.id, **params} for item in earlier]
                connection.execute(text(_RENEW.format(table=self._table, lease=lease_sql)), renewed)
            if rows:
                connection.execute(text(_INSERT.format(table=self._table, lease=lease_sql)), rows)
        except BaseException as exc:  # the commit fails with it, as with any failed statement
            # Not written: staged still, for a commit tried again (a rollback discards them)
            session.info.setdefault(self._staged_key, [])[:0] = staged
            if isinstance(exc, StatementError):
                _hide_parameters(exc, earlier + staged)
            raise
        for item in staged:
            item.connection = connection
            item.written_in = written_in
        session.info.setdefault(self._written_key, []).extend(staged)

    def _release(self, session: Session) -> None:
        """after_commit: the deliveries are durable; hand the events to the bus."""
        if session.in_nested_transaction():  # a savepoint's release: the outer one may still roll back
            return
        for item in session.info.pop(self._written_key, []):
            if item.connection is not None and item.connection.in_transaction():
                # A session joined to a transaction begun on its connection (join_transaction_mode)
                # committed, not that transaction: its rows are durable only when it commits, and
                # gone if it rolls back. The log runs them once their lease runs out, if they are.
                logger.debug(
                    "event %r (id %s) was committed inside an outer transaction: it runs from the "
                    "event log once that commits",
                    item.event.name,
                    item.event.id,
                    extra=fields(item.event.name, item.event.id),
                )
                continue
            self.bus.release(item.event)

    def _discard(self, session: Session) -> None:
        """after_transaction_end of the outermost transaction: what it did not commit (rolled back,
        closed, emitted after its commit began writing) is gone."""
        self._drop(session.info.pop(self._staged_key, []) + session.info.pop(self._written_key, []))

    def _roll_back_savepoint(self, session: Session, savepoint: SessionTransaction) -> None:
        """after_soft_rollback of a savepoint: drop what was emitted in it (its rows, if a savepoint
        inside it wrote them at its release, are rolled back with it), and stage again what was
        emitted outside it but written in it: its rows are gone, the event is not."""
        staged: list[_Staged] = []
        written: list[_Staged] = []
        gone: list[_Staged] = []
        for item in session.info.get(self._staged_key, []):
            (gone if item.within(savepoint) else staged).append(item)
        for item in session.info.get(self._written_key, []):
            if item.within(savepoint):
                gone.append(item)
            elif _inside(item.written_in, savepoint):
                item.connection = item.written_in = None
                staged.append(item)
            else:
                written.append(item)
        session.info[self._staged_key] = staged
        session.info[self._written_key] = written
        self._drop(gone)

    @staticmethod
    def _drop(items: list[_Staged]) -> None:
        for item in items:
            event = item.event
            logger.debug(
                "event %r (id %s) of a rolled-back transaction was discarded",
                event.name,
                event.id,
                extra=fields(event.name, event.id),
            )


def _hide_parameters(exc: StatementError, staged: list[_Staged]) -> None:
    """Take the events' payloads out of ``exc``, a failed write of their deliveries.

    SQLAlchemy's message lists a failed statement's parameters, and the outbox's are the payloads
    and headers, which may hold secrets and must not reach a log. The error is otherwise kept as it
    is (its class, driver error and code), so that code handling the commit's failure (a retry on a
    serialization failure, say) sees what any failed statement of the transaction would raise.
    """
    exc.hide_parameters = True
    exc.params = None
    _hide_database_detail(exc)
    names = ", ".join(f"{item.event.name!r} ({item.event.id})" for item in staged[:3])
    if len(staged) > 3:
        names += f" and {len(staged) - 3} more"
    exc.add_detail(
        f"tidings outbox: writing the deliveries of events {names} to the event log; the "
        "statement's parameters, and the database's detail of the error, are left out: they hold "
        "the events' payloads"
    )


_LEFT_OUT: Final = "(left out by the tidings outbox: it may hold the events' payloads)"


def _hide_database_detail(exc: StatementError) -> None:
    """Keep only the first line of the messages of ``exc``, its driver's error and what that was
    raised from.

    PostgreSQL's DETAIL of a violated CHECK or NOT NULL constraint is the failing row, payload and
    headers included ("Failing row contains (...)"), and its CONTEXT may quote the values too:
    psycopg's message holds every line the server sent (and SQLAlchemy's copies it), asyncpg's
    error adds its ``detail`` to its text. The first line, the server's message, names the
    constraint; the classes and the attributes that code handling the failure reads
    (``sqlstate``, psycopg's ``diag``, which still has the detail: no log reads it) are kept.

    Only the errors raised from one another (``raise ... from``: SQLAlchemy's from the driver's,
    asyncpg's adapter's from asyncpg's) are the failed write's: a ``__context__`` is an exception
    that was being handled when the commit ran (a sync driver's error gets one), the app's own,
    which is left as it is.
    """
    seen: set[int] = set()
    for error in (exc, exc.orig):
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            for field in ("detail", "context"):  # asyncpg's, which its str() adds to the message
                if isinstance(getattr(error, field, None), str):
                    setattr(error, field, _LEFT_OUT)
            if error.args and isinstance(error.args[0], str) and "\n" in error.args[0].strip():
                message = error.args[0].strip().split("\n", 1)[0]
                error.args = (f"{message}\n{_LEFT_OUT}", *error.args[1:])
            error = error.__cause__


_OUTBOXES: Final = "tidings.outboxes"  # session.info: the outboxes that staged events on the session
# session.info: a list, one item per commit of the session under way (its before_commit came, its
# after_commit not yet): the innermost transaction (a savepoint, maybe) current at its before_commit
_COMMITTING: Final = "tidings.outbox.committing"
_listen_lock = threading.Lock()
_listening = False


def _listen() -> None:
    """Listen to the transactions of every session, once per process.

    Listeners added to a session at its first emit would come too late when that emit is part of
    the commit: an ORM event (``after_insert``, ``before_flush``...) fires in the flush a commit
    runs *after* its ``before_commit``. So every commit marks its session until it is over, and a
    flush of a committing session writes what it staged at once, still inside the transaction.
    Sessions that never see an outbox event pay a dict lookup per commit and flush.
    """
    global _listening
    with _listen_lock:
        if _listening:
            return
        sa_event.listen(_Session, "before_commit", _before_commit)
        sa_event.listen(_Session, "after_flush_postexec", _after_flush)
        sa_event.listen(_Session, "after_commit", _after_commit)
        sa_event.listen(_Session, "after_transaction_end", _after_transaction_end)
        sa_event.listen(_Session, "after_soft_rollback", _after_soft_rollback)
        _listening = True


def _outboxes(session: Session) -> list[Outbox]:
    return list(session.info.get(_OUTBOXES, ()))


def _before_commit(session: Session) -> None:
    root = session.get_transaction()
    current = session.get_nested_transaction() or root
    if current is None:  # pragma: no cover - a commit is a transaction's
        return
    committing: list[SessionTransaction] = session.info.setdefault(_COMMITTING, [])
    # The outermost transaction commits now if no savepoint is open (session.commit() commits the
    # open savepoints first, innermost first, each with its own before_commit and after_commit), or
    # if this is the last savepoint that the outermost transaction's commit commits on its way:
    # that commit's before_commit came first, while the innermost savepoint was current, then each
    # savepoint's, innermost first. Only then: the rows are leased again once per commit.
    outermost = current is root or (bool(committing) and current.parent is root)
    committing.append(current)
    try:
        for outbox in _outboxes(session):
            outbox._write(session, renew=outermost)
    except BaseException:
        # That commit fails here, and no after_commit comes for it; nor, on SQLite, which aborts
        # the statement only, a rollback: its transaction stays open, to be committed again.
        # Every other commit under way fails with it, uncounted neither: they are the outer
        # transaction's commit and its savepoints' that called this one (it commits the open
        # savepoints first), and SQLAlchemy lets the error through each of them
        committing.clear()
        raise


def _after_flush(session: Session, flush_context: object) -> None:
    if session.info.get(_COMMITTING):  # a commit's own flush: its before_commit has been
        for outbox in _outboxes(session):
            outbox._write(session, renew=False)


def _after_commit(session: Session) -> None:
    # That commit is over: a flush after a savepoint's release is no commit's, and leaves what it
    # staged to the commit that comes (it wrote it at once, leased from the flush, before)
    committing: list[SessionTransaction] = session.info.get(_COMMITTING, [])
    if committing:
        committing.pop()
    for outbox in _outboxes(session):
        outbox._release(session)


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    if previous_transaction.nested:  # the end of the outermost one is after_transaction_end's
        # A commit that failed there (a savepoint's flush at its release) never gets its
        # after_commit: left counted, it would make every later flush write at once, and every
        # later release lease again what was written, for the rest of the transaction
        committing: list[SessionTransaction] = session.info.get(_COMMITTING, [])
        committing[:] = [each for each in committing if not _inside(each, previous_transaction)]
        for outbox in _outboxes(session):
            outbox._roll_back_savepoint(session, previous_transaction)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:  # a savepoint: not the end
        return
    session.info.pop(_COMMITTING, None)
    for outbox in _outboxes(session):
        outbox._discard(session)
    session.info.pop(_OUTBOXES, None)


_IDENTIFIER: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_CLAIM: Final = (
    "INSERT INTO {table} (event_id, handler, done_at) VALUES (:event_id, :handler, :done_at) "
    "ON CONFLICT DO NOTHING"
)


def _commits_each_statement(connection: Connection) -> bool:
    """Whether ``connection``, in a transaction as SQLAlchemy sees it, commits each statement at once
    (``isolation_level="AUTOCOMMIT"``, or a driver connection left in autocommit mode)."""
    pooled = connection.connection
    if connection.dialect.name == "sqlite":  # autocommit, unless a BEGIN of the app's own is open
        # The driver's own connection: sqlite3's, or aiosqlite's, which has what sqlite3's has here
        # (SQLAlchemy's adapter of it, the DBAPI connection, has no in_transaction)
        return _commits_alone(pooled.driver_connection)
    return getattr(pooled.dbapi_connection, "autocommit", False) is True  # psycopg, asyncpg's adapter...


def record_once(
    session: Session | Connection, event: Event | str, handler: str, *, schema: str | None = None
) -> bool:
    """The idempotency inbox (:mod:`tidings.store.inbox`) in a SQLAlchemy session's transaction.

    Run it first in the transaction that does the handler's work: ``False`` means the work was
    committed before (this delivery is a repeat), so skip it. The ``tidings_inbox`` table is the
    one the SQLite and PostgreSQL logs create (in ``schema``, if the log has one). A ``Connection``
    not in a transaction yet begins one here, as the insert would (commit-as-you-go): commit it
    with the work.

    Raises:
        ConfigurationError: ``schema`` is not a plain SQL identifier; or the connection commits
            each statement on its own (``isolation_level="AUTOCOMMIT"``), so the pair would be
            committed before the work, and work that then failed would be skipped when the event
            is delivered again. Nothing is recorded then, and nothing begun: a transaction this
            call began (the session's, the connection's) is closed before it raises. One that
            the caller began on the connection a session joins is left as it is, unless the
            session was given it (``join_transaction_mode="control_fully"``).

    Example:
        >>> import os, tempfile
        >>> from sqlalchemy import create_engine
        >>> from sqlalchemy.orm import Session
        >>> from tidings import Event
        >>> from tidings.store import inbox
        >>> engine = create_engine(f"sqlite:///{os.path.join(tempfile.mkdtemp(), 'app.db')}")
        >>> with engine.begin() as connection:
        ...     inbox.create_table(connection.connection.driver_connection)
        >>> event = Event("order.paid")
        >>> with Session(engine) as session, session.begin():
        ...     record_once(session, event, "billing.charge")
        True
        >>> with Session(engine) as session, session.begin():
        ...     record_once(session, event, "billing.charge")
        False
    """
    if schema is not None and not _IDENTIFIER.match(schema):
        raise ConfigurationError(f"schema must be a plain SQL identifier, got {schema!r}")
    began: Transaction | SessionTransaction | None = None  # what this call began, closed if it refuses
    if isinstance(session, Connection):
        connection = session
    else:
        autobegun = not session.in_transaction()
        connection = session.connection()  # the session's autobegin
        if autobegun:
            began = session.get_transaction()
    if not connection.in_transaction():
        # What the insert would do first (SQLAlchemy's autobegin): begun, a connection on the
        # recipe for SQLite savepoints has run its BEGIN, and shows a transaction in the driver
        began = connection.begin()
    if _commits_each_statement(connection):
        if began is not None:  # left begun, it would refuse the caller's own begin()
            # Closed, not rolled back: a session's rollback also rolls back a transaction begun on
            # its connection that it joined (rollback_only, the default's choice when that has no
            # savepoint), the caller's; its close ends what the session began, and leaves that
            began.close()
        raise ConfigurationError(
            "record_once() needs a transaction, and this connection commits each statement on its own "
            "(autocommit): the inbox row would commit before the work, and a failed work would be "
            "skipped when the event is delivered again"
        )
    table = f'"{schema}".tidings_inbox' if schema else "tidings_inbox"
    event_id = event if isinstance(event, str) else event.id
    params = {"event_id": event_id, "handler": handler, "done_at": time()}
    result = cast("CursorResult[Any]", connection.execute(text(_CLAIM.format(table=table)), params))
    return result.rowcount == 1


async def arecord_once(
    session: AsyncSession | AsyncConnection, event: Event | str, handler: str, *, schema: str | None = None
) -> bool:
    """:func:`record_once` for ``AsyncSession`` and ``AsyncConnection``."""
    return await session.run_sync(record_once, event, handler, schema=schema)
