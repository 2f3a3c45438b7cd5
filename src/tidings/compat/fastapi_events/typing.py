"""The type aliases of fastapi-events: what handlers receive, and the ASGI types.

A handler receives an :data:`Event`: the tuple ``(event_name, payload)``, with the name exactly as it
was dispatched (a ``str``, or the ``Enum`` member itself).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeAlias

from ...types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ASGIApp", "Event", "EventName", "Message", "Payload", "PydanticModel", "Receive", "Scope", "Send"]

EventName: TypeAlias = str | Enum
Event: TypeAlias = tuple[EventName, Any]
PydanticModel: TypeAlias = Any
"""An instance of a Pydantic model (``Any``, as in fastapi-events, so that Pydantic stays optional)."""
Payload: TypeAlias = Any
"""A ``dict`` or a Pydantic model instance (or anything else a handler expects)."""
