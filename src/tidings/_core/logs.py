"""The fields every log record tidings writes about an event or a handler call carries.

Each such record has the same three ``extra`` attributes, so a formatter or a JSON log pipeline can
rely on them: ``tidings_event`` (the event name), ``tidings_event_id`` (its id) and
``tidings_handler`` (the handler's name). A field that does not apply is ``None``: an event dropped
before it reached any handler has no id yet, and a record about an event as a whole (dropped, not
written to the log) names no handler. The message text says the same things in words.
"""

from __future__ import annotations

from typing import Final

__all__ = ["FIELDS", "described", "fields"]

FIELDS: Final = ("tidings_event", "tidings_event_id", "tidings_handler")
"""The names of the ``extra`` attributes, in this order."""


def fields(event: str | None, event_id: str | None = None, handler: str | None = None) -> dict[str, object]:
    """The ``extra`` mapping of a log record about ``event`` (its id) and ``handler``."""
    return {"tidings_event": event, "tidings_event_id": event_id, "tidings_handler": handler}


def described(exc: BaseException) -> str:
    """``"ValueError: bad input"``: an exception's class and message, for log messages and reports.

    The exception is often user code's, and so is its ``__str__``: one that raises reads as such,
    rather than raising in the middle of reporting the failure (which would stop the job).
    """
    try:
        text = str(exc)
    except Exception as error:
        text = f"<its str() raised {type(error).__name__}>"
    return f"{type(exc).__name__}: {text}"
