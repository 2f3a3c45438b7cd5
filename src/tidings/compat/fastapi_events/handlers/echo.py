"""A handler that prints every event with ``pprint``: for debugging."""

from __future__ import annotations

from pprint import pprint
from typing import TYPE_CHECKING

from .base import BaseEventHandler

if TYPE_CHECKING:
    from ..typing import Event

__all__ = ["EchoHandler"]


class EchoHandler(BaseEventHandler):
    """Prints each event's ``(event_name, payload)`` tuple to stdout with ``pprint``.

    Example:
        >>> import asyncio
        >>> asyncio.run(EchoHandler().handle(("user.created", {"id": 1})))
        ('user.created', {'id': 1})
    """

    async def handle(self, event: Event) -> None:
        """Print ``event``."""
        pprint(event)
