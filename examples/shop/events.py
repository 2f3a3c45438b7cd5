"""The shop's events, typed: each class is an event, named by its ``__event_name__``.

Emitting an instance (``emit(OrderPlaced(...))``) validates nothing more (Pydantic did, when it was
built); handlers registered by class receive the instance, typed, and handlers registered by name
or wildcard (``"order.*"``) see it as ``event.payload``. The stock events stay plain dicts: both
kinds mix freely.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

__all__ = ["OrderCancelled", "OrderConfirmed", "OrderPlaced", "UserCreated"]


class UserCreated(BaseModel):
    __event_name__: ClassVar[str] = "user.created"

    id: int
    email: str


class OrderPlaced(BaseModel):
    __event_name__: ClassVar[str] = "order.placed"

    id: int
    user_id: int
    item: str
    quantity: int
    total: float


class OrderConfirmed(BaseModel):
    __event_name__: ClassVar[str] = "order.confirmed"

    id: int


class OrderCancelled(BaseModel):
    __event_name__: ClassVar[str] = "order.cancelled"

    id: int
    total: float
