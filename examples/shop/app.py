"""A small in-memory shop that shows tidings off, with no broker.

Run it (from the repository root) with either of::

    uv run uvicorn examples.shop.app:app
    uv run python -m examples.shop

then try::

    curl -X POST localhost:8000/users -H 'content-type: application/json' -d '{"email": "ada@example.com"}'
    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"user_id": 1, "item": "teapot", "quantity": 2, "unit_price": 12.5}'
    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"user_id": 1, "item": "gremlin", "unit_price": 1}'     # notify_warehouse fails on purpose
    curl -X POST localhost:8000/orders/1/cancel
    curl localhost:8000/stats
    curl localhost:8000/dead-letters                  # the gremlin's notify_warehouse, after 3 attempts
    curl -X POST localhost:8000/warehouse/gremlins    # the warehouse changes its mind ...
    curl -X POST localhost:8000/dead-letters/replay   # ... and the dead letter is replayed
    uv run tidings dead-letters list --bus examples.shop.handlers:bus   # the same, from the shell

Each endpoint only calls ``emit()``, with typed events (:mod:`examples.shop.events`) or dicts; the
handlers in :mod:`examples.shop.handlers` run after the response has been sent (watch the server
log). ``/stats`` shows what they did. Stop the server with
Ctrl+C: pending handlers finish before the lifespan's shutdown code runs. Every delivery goes through
the SQLite event log ``shop-events.db``: kill the server mid-way and the next start runs what was left.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from tidings import TidingsMiddleware, emit

from .events import OrderCancelled, OrderPlaced, UserCreated
from .handlers import Stats, bus, stats, warehouse

logging.basicConfig(level=logging.INFO, format="%(levelname)-9s %(name)s: %(message)s")
logger = logging.getLogger("shop")


class NewUser(BaseModel):
    email: str


class User(BaseModel):
    id: int
    email: str


class NewOrder(BaseModel):
    user_id: int
    item: str
    quantity: int = Field(default=1, ge=1)
    unit_price: float = Field(gt=0)


class Order(BaseModel):
    id: int
    user_id: int
    item: str
    quantity: int
    total: float
    status: Literal["placed", "cancelled"] = "placed"


class Store:
    """The shop's "database"."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.users: dict[int, User] = {}
        self.orders: dict[int, Order] = {}
        self.user_ids = itertools.count(1)
        self.order_ids = itertools.count(1)  # next() on a count is atomic: fine from the thread pool


store = Store()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    store.reset()
    stats.reset()
    emit("shop.opened")  # TidingsMiddleware started the bus before this code runs
    yield
    # The middleware drained every pending handler before this line: they could still use
    # whatever this lifespan is about to close.
    logger.info("shop closed after %d event(s)", len(stats.audited))


app = FastAPI(title="tidings shop", lifespan=lifespan)
app.add_middleware(TidingsMiddleware, bus=bus)


@app.post("/users", status_code=201)
async def create_user(body: NewUser) -> User:
    user = User(id=next(store.user_ids), email=body.email)
    store.users[user.id] = user
    emit(UserCreated(id=user.id, email=user.email))
    return user


@app.post("/orders", status_code=201)
def place_order(body: NewOrder) -> Order:
    """A plain ``def`` endpoint: FastAPI runs it in a thread pool, and ``emit()`` works there too."""
    if body.user_id not in store.users:
        raise HTTPException(status_code=404, detail=f"no user {body.user_id}")
    order = Order(
        id=next(store.order_ids),
        user_id=body.user_id,
        item=body.item,
        quantity=body.quantity,
        total=body.quantity * body.unit_price,
    )
    store.orders[order.id] = order
    emit(OrderPlaced(**order.model_dump(exclude={"status"})))
    emit("stock.reserved", {"item": order.item, "quantity": order.quantity})
    return order


@app.post("/orders/{order_id}/cancel")
async def cancel_order(order_id: int) -> Order:
    order = store.orders.get(order_id)
    if order is None:
        raise HTTPException(status_code=404, detail=f"no order {order_id}")
    if order.status == "cancelled":
        raise HTTPException(status_code=409, detail=f"order {order_id} is already cancelled")
    order.status = "cancelled"
    emit(OrderCancelled(id=order.id, total=order.total))
    emit("stock.released", {"item": order.item, "quantity": order.quantity})
    return order


@app.get("/stats")
async def get_stats() -> Stats:
    return stats


class DeadLetterView(BaseModel):
    id: str
    event: str
    handler: str
    attempts: int
    error: str


class ReplayView(BaseModel):
    succeeded: list[str]
    failed: list[str]


@app.get("/dead-letters")
async def list_dead_letters() -> list[DeadLetterView]:
    return [
        DeadLetterView(id=d.id, event=d.event.name, handler=d.handler, attempts=d.attempts, error=d.error)
        for d in await bus.dead_letters.list()
    ]


@app.post("/warehouse/gremlins")
async def ship_gremlins() -> dict[str, bool]:
    warehouse.ships_gremlins = True
    return {"ships_gremlins": True}


@app.post("/dead-letters/replay")
async def replay_dead_letters() -> ReplayView:
    """Runs every dead letter's handler once more, now, and says how each went."""
    result = await bus.dead_letters.replay(all=True)
    return ReplayView(succeeded=[d.id for d in result.succeeded], failed=[d.id for d in result.failed])
