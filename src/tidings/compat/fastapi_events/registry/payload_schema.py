"""The default payload schema registry, the one ``dispatch()`` uses unless given another."""

from __future__ import annotations

from .base import BaseEventPayloadSchemaRegistry

__all__ = ["EventPayloadSchemaRegistry", "registry"]


class EventPayloadSchemaRegistry(BaseEventPayloadSchemaRegistry):
    """A payload schema registry (see :class:`BaseEventPayloadSchemaRegistry`)."""


registry = EventPayloadSchemaRegistry()
"""The default registry: ``@registry.register(event_name=...)`` on a Pydantic model."""
