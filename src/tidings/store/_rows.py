"""Rows as the SQL stores write and read them (shared by the SQLite and PostgreSQL logs)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from .._core.logs import fields
from ..exceptions import SerializationError
from .base import DeadLetter
from .codec import decode_event, encode_headers, encode_payload

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .._core.envelope import Event

__all__ = ["COLUMNS", "dead_letter_rows", "delivery_rows", "letter_from_row", "split_id"]

logger = logging.getLogger("tidings")

COLUMNS: Final = (
    "event_id, handler, name, payload, headers, timestamp_ns, attempts, error, traceback, failed_at"
)
"""The columns :func:`letter_from_row` reads, in its order."""


def split_id(letter_id: str) -> tuple[str, str]:
    """``"<event id>/<handler>"`` -> (event id, handler)."""
    event_id, _, handler = letter_id.partition("/")
    return event_id, handler


def letter_from_row(row: Sequence[Any]) -> DeadLetter:
    """A dead letter from a row of :data:`COLUMNS`."""
    return DeadLetter(
        event=decode_event(row[0], row[2], row[3], row[4], row[5]),
        handler=row[1],
        attempts=row[6],
        error=row[7] or "",
        traceback=row[8] or "",
        failed_at=datetime.fromtimestamp(row[9] or 0.0, tz=UTC),
    )


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
                encoded[event_id] = (encode_payload(event, max_bytes), encode_headers(event.headers))
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
            payload = encode_payload(event, max_bytes)
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
                encode_headers(event.headers),
                event.timestamp_ns,
                letter.attempts,
                letter.error,
                letter.traceback,
                letter.failed_at.timestamp(),
            )
        )
    return rows
