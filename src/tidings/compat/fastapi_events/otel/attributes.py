"""Span attribute names of fastapi-events."""

from __future__ import annotations

from typing import Final

__all__ = ["SpanAttributes"]


class SpanAttributes:
    """Attribute names fastapi-events puts on its spans."""

    HANDLER: Final = "fastapi_events.handler"
