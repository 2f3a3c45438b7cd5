"""The base class of handler objects: ``handle(event)``, and ``handle_many(events)`` for batches."""

from __future__ import annotations

import abc
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..typing import Event

__all__ = ["BaseEventHandler"]

logger = logging.getLogger("tidings")


class BaseEventHandler(abc.ABC):
    """A handler object, given to the middleware in ``handlers=[...]``.

    Implement ``handle(event)``; it receives the tuple ``(event_name, payload)``. Override
    ``handle_many(events)`` to take the events of one request (or of one event-loop turn, for events
    dispatched outside requests) in one call, to forward them in one batch, say. Either may be a
    plain ``def``: it runs in a worker thread, and an awaitable it returns (as a decorator's wrapper
    of an ``async def`` does) is awaited on the event loop, as fastapi-events awaited it.

    Under :class:`~tidings.compat.fastapi_events.middleware.EventHandlerASGIMiddleware` a handler
    that keeps the default ``handle_many`` gets its events one by one, each call isolated: a failed
    call is logged, reported, retried or made a dead letter by itself, and never keeps the others
    from running. A handler that overrides ``handle_many`` gets each batch in one call, and a failed
    call fails the whole batch.

    Example:
        >>> from tidings.compat.fastapi_events.handlers.base import BaseEventHandler
        >>> class AuditHandler(BaseEventHandler):
        ...     async def handle(self, event):
        ...         event_name, payload = event
        ...         print("audit", event_name, payload)
    """

    async def handle_many(self, events: Iterable[Event]) -> None:
        """Handle each event with :meth:`handle`, in order; one failing does not stop the others.

        Raises:
            Exception: the first exception a call of :meth:`handle` raised (the others are logged).
        """
        first: Exception | None = None
        for event in events:
            try:
                await self.handle(event)
            except Exception as exc:
                if first is None:
                    first = exc
                else:
                    logger.error("%s.handle raised on %r", type(self).__qualname__, event[0], exc_info=exc)
        if first is not None:
            raise first

    @abc.abstractmethod
    async def handle(self, event: Event) -> None:
        """Handle one event, the tuple ``(event_name, payload)``."""
