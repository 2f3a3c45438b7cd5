"""The app's events: names, payload schemas (validated at dispatch) and event models."""

import uuid
from datetime import datetime
from enum import Enum

from pydantic import BaseModel

from tidings.compat.fastapi_events.registry.payload_schema import registry as payload_schema


class UserEvents(Enum):
    SIGNED_UP = "USER_SIGNED_UP"
    ACTIVATED = "USER_ACTIVATED"


@payload_schema.register(event_name=UserEvents.SIGNED_UP)
class SignUpPayload(BaseModel):
    user_id: uuid.UUID
    email: str
    created_at: datetime
    referrer: str | None = None


class OrderPlaced(BaseModel):
    __event_name__ = "order.placed"

    order_id: int
    user_id: uuid.UUID
    sku: str
    quantity: int
    total: float


class OrderShipped(BaseModel):
    __event_name__ = "order.shipped"

    order_id: int
    carrier: str
