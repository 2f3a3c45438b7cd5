"""The demo shop (``examples/shop``) in-process: what every handler did, seen through ``/stats``.

The app's ASGI lifespan runs around each test (as under a server), so TidingsMiddleware starts the
bus and drains it at shutdown. With ``httpx.ASGITransport`` the handlers of a request have finished
by the time the client has its response, so the stats can be checked right after each call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from examples.shop.app import app
from examples.shop.handlers import bus, stats, warehouse
from tidings import BusState

from .support import lifespan

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(caplog: pytest.LogCaptureFixture) -> AsyncIterator[httpx.AsyncClient]:
    caplog.set_level(logging.INFO, logger="shop")
    async with (
        lifespan(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop") as client,
    ):
        await bus.drain(timeout=5)  # the "shop.opened" event of the lifespan startup runs in the background
        await bus.dead_letters.purge(all=True)  # the log is a file: start each test without old ones
        warehouse.ships_gremlins = False
        yield client


async def get_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/stats")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


async def test_every_handler_does_its_part(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert await get_stats(client) == {
        "opened": True,  # emitted by the app's lifespan startup
        "emails_sent": [],
        "orders_placed": 0,
        "orders_shipped": [],
        "orders_confirmed": [],
        "orders_cancelled": 0,
        "revenue": 0.0,
        "audited": ["shop.opened"],
        "analytics_batches": [],
        "failures": [],
        "failed_attempts": 0,
    }

    response = await client.post("/users", json={"email": "ada@example.com"})
    assert response.status_code == 201
    assert response.json() == {"id": 1, "email": "ada@example.com"}
    after_signup = await get_stats(client)
    assert after_signup["emails_sent"] == ["ada@example.com"]
    assert "sending a welcome email to ada@example.com" in caplog.messages

    # place_order is a plain def endpoint: it runs in FastAPI's thread pool and emits from there.
    response = await client.post(
        "/orders", json={"user_id": 1, "item": "teapot", "quantity": 2, "unit_price": 12.5}
    )
    assert response.status_code == 201
    assert response.json() == {
        "id": 1, "user_id": 1, "item": "teapot", "quantity": 2, "total": 25.0, "status": "placed"
    }  # fmt: skip
    after_order = await get_stats(client)
    assert after_order["orders_placed"] == 1
    assert after_order["revenue"] == 25.0
    assert after_order["orders_shipped"] == [1]
    assert after_order["orders_confirmed"] == [1]  # order.confirmed, emitted by confirm_order

    response = await client.post("/orders/1/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"

    final = await get_stats(client)
    assert final["orders_cancelled"] == 1
    assert final["revenue"] == 0.0
    assert final["failures"] == []
    # The "*" audit handler (a plain def, in a worker thread) saw every event, chained ones included.
    assert final["audited"] == [
        "shop.opened",
        "user.created",
        "order.placed", "stock.reserved", "order.confirmed",
        "order.cancelled", "stock.released",
    ]  # fmt: skip
    # The batch handler got each request's events in one call; a chained event comes in its own batch.
    assert final["analytics_batches"] == [
        ["user.created"],
        ["order.placed", "stock.reserved"],
        ["order.confirmed"],
        ["order.cancelled", "stock.released"],
    ]
    assert "forwarding 2 event(s) to analytics" in caplog.messages


async def test_a_failing_handler_is_logged_and_the_others_still_run(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    await client.post("/users", json={"email": "grace@example.com"})
    response = await client.post("/orders", json={"user_id": 1, "item": "gremlin", "unit_price": 3})
    assert response.status_code == 201  # the failure happens after the response, never in it

    await bus.drain(timeout=5)  # its retries run after their backoff
    result = await get_stats(client)
    assert result["failures"] == ["notify_warehouse: RuntimeError('the warehouse refuses to ship gremlins')"]
    assert result["failed_attempts"] == 3
    assert result["orders_shipped"] == []  # the failing handler did not get there ...
    assert result["orders_placed"] == 1  # ... but every other handler of the event ran
    assert result["revenue"] == 3.0
    assert result["orders_confirmed"] == [1]
    assert result["audited"][-3:] == ["order.placed", "stock.reserved", "order.confirmed"]

    logged = [r for r in caplog.records if r.name == "tidings" and r.levelno == logging.ERROR]
    assert len(logged) == 3
    assert all(
        "notify_warehouse raised RuntimeError: the warehouse refuses to ship gremlins" in r.getMessage()
        and r.exc_info is not None  # with its traceback
        for r in logged
    )
    assert "attempt 3, now a dead letter" in logged[-1].getMessage()


async def test_a_dead_letter_is_listed_and_replayed_once_the_cause_is_fixed(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/users", json={"email": "grace@example.com"})
    await client.post("/orders", json={"user_id": 1, "item": "gremlin", "unit_price": 3})
    await bus.drain(timeout=5)
    [letter] = (await client.get("/dead-letters")).json()
    assert letter["event"] == "order.placed"
    assert letter["handler"] == "examples.shop.handlers.notify_warehouse"
    assert letter["attempts"] == 3
    assert letter["error"] == "RuntimeError: the warehouse refuses to ship gremlins"

    assert (await client.post("/warehouse/gremlins")).json() == {"ships_gremlins": True}
    replay = (await client.post("/dead-letters/replay")).json()
    assert replay == {"succeeded": [letter["id"]], "failed": []}
    assert (await client.get("/dead-letters")).json() == []
    assert (await get_stats(client))["orders_shipped"] == [1]


async def test_rejected_requests_emit_nothing(client: httpx.AsyncClient) -> None:
    assert (
        await client.post("/orders", json={"user_id": 7, "item": "teapot", "unit_price": 1})
    ).status_code == 404
    assert (await client.post("/orders/7/cancel")).status_code == 404
    assert (await client.post("/users", json={"email": "x@example.com"})).status_code == 201
    assert (
        await client.post("/orders", json={"user_id": 1, "item": "mug", "unit_price": 4})
    ).status_code == 201
    assert (await client.post("/orders/1/cancel")).status_code == 200
    assert (await client.post("/orders/1/cancel")).status_code == 409  # already cancelled: no second refund

    result = await get_stats(client)
    assert result["orders_cancelled"] == 1
    assert result["revenue"] == 0.0
    assert result["audited"].count("order.cancelled") == 1


async def test_pending_events_are_handled_before_the_lifespan_shutdown_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="shop")
    async with lifespan(app):
        await bus.drain(timeout=5)
        # Nothing is awaited between this emit and the lifespan.shutdown message, so no handler
        # can have run before the shutdown began.
        bus.emit("user.created", {"id": 9, "email": "late@example.com"})
    assert stats.emails_sent == ["late@example.com"]
    # The lifespan's shutdown code ran after the drain: it counted both events as audited.
    assert "shop closed after 2 event(s)" in caplog.messages
    assert bus.state is BusState.CLOSED
