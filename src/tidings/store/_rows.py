"""Rows as the SQL stores write and read them (shared by the SQLite and PostgreSQL logs)."""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from time import time
from typing import TYPE_CHECKING, Any, Final

from .._core.logs import fields
from ..exceptions import SerializationError, StoreError
from .base import DeadLetter, Delivery, UnreadableLetter, delivery_id, names_match
from .codec import decode_event, encode_event

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from .._core.envelope import Event

__all__ = [
    "COLUMNS",
    "NAME_COLUMNS",
    "NOT_REVIVED",
    "chosen_keys",
    "claimed_deliveries",
    "dead_letter_rows",
    "delivery_rows",
    "letter_keys",
    "listed_letters",
    "listing",
    "naming_unreadable",
    "read_letter",
    "selected_rows",
    "split_id",
    "unreadable_letters",
]

logger = logging.getLogger("tidings")

COLUMNS: Final = (
    "event_id, handler, name, payload, headers, timestamp_ns, attempts, error, traceback, failed_at"
)
"""The columns :func:`read_letter` reads, in its order."""

NAME_COLUMNS: Final = "event_id, handler, name"
"""The columns a filter of dead letters reads (:func:`chosen_keys`): never the payload."""

NOT_REVIVED: Final = "is not replayed (it stays a dead letter; purge it by its id)"
"""What :func:`read_letter` logs of a dead letter being revived that cannot be read back."""

_named_by_caller: ContextVar[bool] = ContextVar("tidings.unreadable_named_by_caller", default=False)


@contextmanager
def naming_unreadable() -> Iterator[None]:
    """Within it, listings of dead letters leave out the rows that cannot be read back without
    logging them: the caller asks the store for them (``unreadable()``) and names each itself, as
    a replay does, so that each is named once."""
    token = _named_by_caller.set(True)
    try:
        yield
    finally:
        _named_by_caller.reset(token)


def listing() -> Callable[[Sequence[Sequence[Any]]], list[DeadLetter]]:
    """:func:`listed_letters` as the caller asks for it: logging the rows it leaves out, but not
    within :func:`naming_unreadable`. Call it in the caller's task: a store may decode its rows on
    a thread, which does not share the task's context."""
    return functools.partial(listed_letters, log=not _named_by_caller.get())


def split_id(letter_id: str) -> tuple[str, str]:
    """``"<event id>/<handler>"`` -> (event id, handler).

    Split at the last ``/``: a handler name never holds one (the registry refuses it), an event id
    may (``Event(id=...)``, an id from a broker).
    """
    event_id, _, handler = letter_id.rpartition("/")
    return event_id, handler


def letter_keys(ids: Sequence[str]) -> list[tuple[str, str]]:
    """The (event id, handler) keys of dead letter ids, each once, in the order given."""
    return [split_id(letter_id) for letter_id in dict.fromkeys(ids)]


def _letter(row: Sequence[Any]) -> DeadLetter:
    """A dead letter from a row of :data:`COLUMNS`; raises StoreError if it cannot be read back."""
    return DeadLetter(
        event=decode_event(row[0], row[2], row[3], row[4], row[5]),
        handler=row[1],
        attempts=row[6],
        error=row[7] or "",
        traceback=row[8] or "",
        failed_at=datetime.fromtimestamp(row[9] or 0.0, tz=UTC),
    )


def read_letter(row: Sequence[Any], unread: str | None) -> DeadLetter | None:
    """A dead letter from a row of :data:`COLUMNS`, or ``None`` (logged, saying ``unread``, unless
    that is ``None``) if the row cannot be read back: one such row must not keep the others from
    being read."""
    try:
        return _letter(row)
    except StoreError as exc:
        if unread is None:
            return None
        logger.error(
            "dead letter %s %s: %s",
            delivery_id(row[0], row[1]),
            unread,
            exc,
            extra=fields(row[2], row[0], row[1]),
        )
        return None


def unreadable_letters(rows: Sequence[Sequence[Any]]) -> list[UnreadableLetter]:
    """The rows of :data:`COLUMNS` that cannot be read back, with why (what listings leave out)."""
    unreadable: list[UnreadableLetter] = []
    for row in rows:
        try:
            _letter(row)
        except StoreError as exc:
            unreadable.append(UnreadableLetter(row[0], row[2], row[1], str(exc)))
    return unreadable


def selected_rows(
    rows: Sequence[Sequence[Any]], *, event: str | None, handler: str | None
) -> list[Sequence[Any]]:
    """The rows (event id, handler, name first) whose names pass the patterns: no payload is read."""
    if event is None and handler is None:
        return list(rows)
    return [row for row in rows if names_match(row[2], row[1], event=event, handler=handler)]


def chosen_keys(
    rows: Sequence[Sequence[Any]], *, event: str | None, handler: str | None
) -> list[tuple[str, str]]:
    """The (event id, handler) keys of rows of :data:`NAME_COLUMNS` that pass the patterns."""
    return [(row[0], row[1]) for row in selected_rows(rows, event=event, handler=handler)]


def listed_letters(rows: Sequence[Sequence[Any]], *, log: bool) -> list[DeadLetter]:
    """The dead letters of rows of :data:`COLUMNS`, leaving out (and, if ``log``, logging) those
    that cannot be read."""
    unread = "is left out of the list (purge it by its id)" if log else None
    return [letter for row in rows if (letter := read_letter(row, unread)) is not None]


def claimed_deliveries(rows: Sequence[Sequence[Any]]) -> tuple[list[Delivery], list[tuple[Any, ...]]]:
    """The deliveries of claimed rows (event id, handler, name, payload, headers, timestamp_ns,
    attempts), oldest event first; and an (error, failed_at, event id, handler) row for each one that
    cannot be read back, for the store to make a dead letter of in the claim's transaction.

    A dead letter rather than a row left pending: left pending, it would be claimed, refused and
    logged again at every lease, forever, taking a place in every batch, and no call could remove
    it; as a dead letter it is run no more, keeps the error in its row, is logged by id whenever
    dead letters are listed, and can be purged by that id.
    """
    deliveries: list[Delivery] = []
    unreadable: list[tuple[Any, ...]] = []
    for row in rows:
        event_id, handler = row[0], row[1]
        try:
            event = decode_event(event_id, row[2], row[3], row[4], row[5])
        except StoreError as exc:
            logger.error(
                "delivery %s is not run: %s; it is made a dead letter",
                delivery_id(event_id, handler),
                exc,
                extra=fields(row[2], event_id, handler),
            )
            unreadable.append((f"{type(exc).__name__}: {exc}", time(), event_id, handler))
            continue
        deliveries.append(Delivery(event, handler, row[6]))
    deliveries.sort(key=lambda d: (d.event.id, d.handler))
    return deliveries, unreadable


def delivery_rows(
    deliveries: Sequence[tuple[Event, str]], max_bytes: int, lease: float
) -> tuple[list[tuple[Any, ...]], dict[str, str]]:
    """(event id, handler, name, payload, headers, timestamp_ns, lease) rows, and the refused events.

    Each event's payload is encoded once, however many handlers it has.
    """
    rows: list[tuple[Any, ...]] = []
    refused: dict[str, str] = {}
    encoded: dict[str, tuple[str, str] | None] = {}
    for event, handler in deliveries:
        event_id = event.id
        if event_id not in encoded:
            try:
                encoded[event_id] = encode_event(event, max_bytes)
            except SerializationError as exc:
                encoded[event_id] = None
                refused[event_id] = str(exc)
        texts = encoded[event_id]
        if texts is not None:
            payload, headers = texts
            rows.append((event_id, handler, event.name, payload, headers, event.timestamp_ns, lease))
    return rows, refused


def dead_letter_rows(letters: Sequence[DeadLetter], max_bytes: int) -> list[tuple[Any, ...]]:
    """Rows of :data:`COLUMNS` for ``letters``; one whose payload cannot be written is logged and left out."""
    rows: list[tuple[Any, ...]] = []
    for letter in letters:
        event = letter.event
        try:
            payload, headers = encode_event(event, max_bytes)
        except SerializationError as exc:
            logger.error(
                "dead letter %s (handler %s) cannot be written to the event log: %s",
                letter.id,
                letter.handler,
                exc,
                extra=fields(event.name, event.id, letter.handler),
            )
            continue
        rows.append(
            (
                event.id,
                letter.handler,
                event.name,
                payload,
                headers,
                event.timestamp_ns,
                letter.attempts,
                letter.error,
                letter.traceback,
                letter.failed_at.timestamp(),
            )
        )
    return rows
