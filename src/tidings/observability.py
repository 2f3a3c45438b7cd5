"""Logging: which event and handler a log record is about, in tidings' records and in yours.

Every record tidings logs about an event or a handler call (a failure, a timeout, a dead letter, a
dropped event, an event the log refused) goes to the ``"tidings"`` logger with three ``extra``
attributes, :data:`LOG_FIELDS`: ``tidings_event`` (the event name), ``tidings_event_id`` (its id)
and ``tidings_handler`` (the handler's name), ``None`` where one does not apply (an event dropped
before it reached a handler has no id yet; a record about a whole event names no handler). The
message says the same in words, so plain-text logs need nothing.

:class:`EventContextFilter` gives records that *your* code logs while a handler runs the same three
attributes. It costs nothing until a record passes through it: it reads what the runner tracks
anyway, so no handler call does any work for it.

OpenTelemetry tracing is in :mod:`tidings.integrations.opentelemetry`.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar, Token
from threading import get_ident
from typing import TYPE_CHECKING, Any, Final

from ._core.dispatcher import current_scope
from ._core.logs import FIELDS
from ._core.runner import Job

if TYPE_CHECKING:
    from ._core.registry import HandlerSpec

__all__ = ["LOG_FIELDS", "EventContextFilter"]

LOG_FIELDS: Final = FIELDS
"""``("tidings_event", "tidings_event_id", "tidings_handler")``: the attributes tidings' records carry."""


class EventContextFilter(logging.Filter):
    """Adds :data:`LOG_FIELDS` to every record, naming the handler call it was logged in.

    Inside a handler (``async def`` on the event loop, or plain ``def`` in its worker thread) the
    fields name the event, its id and the handler; elsewhere they are ``None``, so a format string
    can always use them. A batch handler's records name the first event of the batch and no id.
    Records that have the fields already (tidings' own) are left as they are. It never drops a
    record.

    Add it to a **handler** (``logging.Handler.addFilter``): a filter on a logger sees only the
    records logged on that very logger, not those of its children.

    Example:
        >>> import asyncio, logging, sys
        >>> from tidings import EventBus
        >>> from tidings.observability import EventContextFilter
        >>> output = logging.StreamHandler(sys.stdout)
        >>> output.addFilter(EventContextFilter())
        >>> output.setFormatter(logging.Formatter("%(message)s [%(tidings_event)s, %(tidings_handler)s]"))
        >>> log = logging.getLogger("shop")
        >>> log.addHandler(output)
        >>> log.setLevel(logging.INFO)
        >>> bus = EventBus()
        >>> @bus.on("order.paid", name="mail.receipt")
        ... async def send_receipt(event) -> None:
        ...     log.info("sending the receipt")
        >>> @bus.on("order.shipped", name="ledger.book")
        ... def book(event) -> None:  # in a worker thread
        ...     log.info("booking it")
        >>> async def main() -> None:
        ...     async with bus:
        ...         await bus.emit_now("order.paid", {"order": 7})
        ...         await bus.emit_now("order.shipped", {"order": 7})
        >>> asyncio.run(main())
        sending the receipt [order.paid, mail.receipt]
        booking it [order.shipped, ledger.book]
        >>> log.info("outside any handler")
        outside any handler [None, None]
        >>> log.removeHandler(output)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Set the fields on ``record`` (unless it has them); always ``True``."""
        attributes = record.__dict__
        if "tidings_event" in attributes:
            return True
        event = event_id = handler = None
        call = current_call()
        if call is not None:
            spec, arg = call
            handler = spec.name
            if spec.batch:
                event = arg[0].name if arg else None
            else:
                event, event_id = arg.name, arg.id
        attributes["tidings_event"] = event
        attributes["tidings_event_id"] = event_id
        attributes["tidings_handler"] = handler
        return True


# The call of an async handler whose work goes to other threads (a plain ``def`` handler with
# FastAPI dependencies, the sync dependencies FastAPI runs in its thread pool): those threads see
# the handler's context, and so this.
_carried: ContextVar[tuple[HandlerSpec, Any] | None] = ContextVar("tidings.carried_call", default=None)


def carry_handler_call() -> Token[tuple[HandlerSpec, Any] | None]:
    """Name the handler call running now in this context, for the threads it hands work to.

    Returns the token to reset with :func:`drop_handler_call` when the call ends.
    """
    return _carried.set(current_call())


def drop_handler_call(token: Token[tuple[HandlerSpec, Any] | None]) -> None:
    """Undo :func:`carry_handler_call`."""
    _carried.reset(token)


def current_call() -> tuple[HandlerSpec, Any] | None:
    """The handler call the calling code runs in: ``(handler, event)``, or ``(handler, events)``."""
    job = current_scope()
    if not isinstance(job, Job):
        return None
    if get_ident() == job.bus.loop_thread:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no loop running in this thread
            return None
        # only the job's own task runs its handlers (others may share its context: tasks they start)
        return job.current if task is not None and task is job.task else None
    carried = _carried.get()
    if carried is not None:
        return carried
    left_behind = job.sync_left_behind  # calls past their timeouts, in threads the job left
    if left_behind and (left := left_behind.get(get_ident())) is not None:
        return left.call
    if get_ident() != job.sync_thread:  # a thread of someone else's (a thread pool the job used)
        return None
    running = job.sync_current  # this job's sync calls run one at a time in one worker thread
    return None if running is None else (running[0], running[1])
