"""The idempotency inbox: run a handler's work once per event, even when the event is delivered twice.

The event log delivers at least once: a process killed after a handler's work but before the log
heard of it runs that delivery again. A handler whose work must not happen twice records the
(event id, handler) pair in the ``tidings_inbox`` table *in the same transaction as its own work*:
if the pair is there already, the work was done and committed, and the handler skips it; if the
transaction rolls back, the pair goes with it and the next delivery does the work. (So a connection
in autocommit mode, outside a transaction it began itself, is refused: the pair would commit alone.)

The :class:`~tidings.store.SQLiteStore` creates the table in its own file; for another database call
:func:`create_table` once.

Example:
    >>> import sqlite3, tempfile, os
    >>> from tidings import Event
    >>> from tidings.store import inbox
    >>> path = os.path.join(tempfile.mkdtemp(), "shop.db")
    >>> event = Event("order.paid", {"order": 7})
    >>> with sqlite3.connect(path) as db:
    ...     inbox.create_table(db)
    ...     _ = db.execute("CREATE TABLE charges (order_id INTEGER)")
    >>> def charge(event: Event) -> None:
    ...     with sqlite3.connect(path) as db:  # commits on success, rolls back on error
    ...         if not inbox.record_once(db, event, "billing.charge"):
    ...             return  # done before: this is a redelivery
    ...         db.execute("INSERT INTO charges VALUES (?)", (event.payload["order"],))
    >>> charge(event); charge(event)
    >>> sqlite3.connect(path).execute("SELECT count(*) FROM charges").fetchone()
    (1,)
"""

from __future__ import annotations

from time import time
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    import sqlite3

    from .._core.envelope import Event

__all__ = ["TABLE", "create_table", "record_once"]

TABLE: Final = """
CREATE TABLE IF NOT EXISTS tidings_inbox (
    event_id TEXT NOT NULL,
    handler  TEXT NOT NULL,
    done_at  REAL NOT NULL,
    PRIMARY KEY (event_id, handler)
)
"""


def create_table(connection: sqlite3.Connection) -> None:
    """Create the ``tidings_inbox`` table if it does not exist."""
    connection.execute(TABLE)


def record_once(connection: sqlite3.Connection, event: Event | str, handler: str) -> bool:
    """Record that ``handler`` handles ``event``, in the connection's current transaction.

    Call it first in the transaction that does the handler's work, and commit them together.

    Args:
        connection: the handler's own database connection (``sqlite3``; its default transaction
            handling opens the transaction at this insert).
        event: the event, or its id.
        handler: a stable name for the work (the handler's name is a good one).

    Returns:
        ``True`` the first time (do the work); ``False`` if the pair was committed before (skip it).

    Raises:
        ConfigurationError: the connection is in autocommit mode (``isolation_level=None``, or
            ``autocommit=True``) with no transaction open: the pair would be committed alone, at
            once, and work that then failed would be skipped when the event is delivered again.
            Execute ``BEGIN`` first.
    """
    if _commits_alone(connection):
        raise ConfigurationError(
            "record_once() needs a transaction: this sqlite3 connection is in autocommit mode and has "
            "none open, so the inbox row would commit alone, before the work, and a failed work "
            "would be skipped when the event is delivered again (execute BEGIN first)"
        )
    event_id = event if isinstance(event, str) else event.id
    cursor = connection.execute(
        "INSERT OR IGNORE INTO tidings_inbox (event_id, handler, done_at) VALUES (?, ?, ?)",
        (event_id, handler, time()),
    )
    return cursor.rowcount == 1


def _commits_alone(connection: Any) -> bool:
    """Whether a statement on this ``sqlite3`` connection (or aiosqlite's, which reads these from its
    ``sqlite3`` one) commits at once, on its own: autocommit mode, and no transaction begun explicitly."""
    autocommit = connection.isolation_level is None or getattr(connection, "autocommit", None) is True
    return autocommit and not connection.in_transaction
