"""A handler that does nothing: a stand-in where a handler is expected."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BaseEventHandler

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..typing import Event

__all__ = ["NullHandler"]


class NullHandler(BaseEventHandler):
    """Ignores every event. The middleware does not even register it, so it costs nothing per event."""

    async def handle(self, event: Event) -> None:
        """Do nothing."""

    async def handle_many(self, events: Iterable[Event]) -> None:
        """Do nothing."""
