"""Orders: events dispatched as Pydantic models."""

import itertools
import uuid

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from tidings.compat.fastapi_events.dispatcher import dispatch

from ..db import database
from ..events import OrderPlaced, OrderShipped

router = APIRouter(prefix="/orders", tags=["orders"])
_ids = itertools.count(1)


class NewOrder(BaseModel):
    user_id: uuid.UUID
    sku: str
    quantity: int = 1
    unit_price: float


@router.post("", status_code=201)
async def place_order(body: NewOrder) -> dict[str, int]:
    order_id = next(_ids)
    database.insert("orders", {"id": order_id, "sku": body.sku})
    dispatch(
        OrderPlaced(
            order_id=order_id,
            user_id=body.user_id,
            sku=body.sku,
            quantity=body.quantity,
            total=body.quantity * body.unit_price,
        )
    )
    return {"id": order_id}


@router.post("/{order_id}/ship")
async def ship(order_id: int, carrier: str = "dhl") -> dict[str, str]:
    if not any(order["id"] == order_id for order in database.rows("orders")):
        raise HTTPException(404, "no such order")
    dispatch(OrderShipped(order_id=order_id, carrier=carrier))
    return {"status": "shipped"}
