"""The app: two routers, local handlers and an audit trail, and a task started at startup."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tidings.compat.fastapi_events.dispatcher import dispatch
from tidings.compat.fastapi_events.handlers.local import local_handler
from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware

from .db import database
from .handlers import AuditTrail  # importing the module registers its local handlers too
from .routers import orders, users

VERSION = "1.4.2"


async def announce_start(middleware_id: int) -> None:
    """Runs outside any request, so it names the middleware whose handlers get its events."""
    dispatch("service.started", payload={"version": VERSION}, middleware_id=middleware_id)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.announcer = asyncio.create_task(announce_start(id(app)))
    yield
    await app.state.announcer


def create_app() -> FastAPI:
    app = FastAPI(title="shop", lifespan=lifespan)
    app.include_router(users.router)
    app.include_router(orders.router)
    app.add_middleware(
        EventHandlerASGIMiddleware,
        handlers=[local_handler, AuditTrail(database)],
        middleware_id=id(app),
    )
    return app


app = create_app()
