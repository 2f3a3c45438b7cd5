"""Helpers for the fastapi-events compatibility tests: run an app's lifespan, talk to it over ASGI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx

from tests.asgi_calls import http_scope, request_body
from tidings.types import Message


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Send the app the lifespan startup and, after the block, shutdown messages a server sends.

    ``httpx.ASGITransport`` sends none, and the middleware starts and drains its bus on them.
    """
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

    async def expect(kind: str) -> None:
        with anyio.fail_after(10):
            message = await outbox.get()
        assert message["type"] == kind, message

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(app, scope, inbox.get, outbox.put)
        await inbox.put({"type": "lifespan.startup"})
        await expect("lifespan.startup.complete")
        try:
            yield
        finally:
            await inbox.put({"type": "lifespan.shutdown"})
            await expect("lifespan.shutdown.complete")


def client(app: Any) -> httpx.AsyncClient:
    """A client that calls ``app`` in-process; each call returns once the app call has returned."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def starlette_app(
    handlers: list[Any],
    routes: list[Any],
    *,
    middleware_id: int | None = None,
    bus: Any = None,
    **kwargs: Any,
) -> Any:
    """A Starlette app set up as fastapi-events' README shows (``bus`` is tidings' extra option)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware

    options: dict[str, Any] = {"handlers": handlers}
    if middleware_id is not None:
        options["middleware_id"] = middleware_id
    if bus is not None:
        options["bus"] = bus
    return Starlette(routes=routes, middleware=[Middleware(EventHandlerASGIMiddleware, **options)], **kwargs)


async def call_asgi(app: Any, path: str = "/", log: list[Any] | None = None) -> list[Any]:
    """Call ``app`` with a GET request; append what it sends to ``log`` ("start", "body") and return it.

    Handlers that append to the same list show whether they ran before or after the response.
    """
    sent: list[Any] = [] if log is None else log
    scope = http_scope(path, "GET")
    receive = request_body()

    async def send(message: Message) -> None:
        sent.append("start" if message["type"] == "http.response.start" else "body")

    await app(scope, receive, send)
    return sent
