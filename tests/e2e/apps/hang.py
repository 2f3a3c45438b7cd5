"""Served by ``test_shutdown.py``: handlers that never return, and a
small drain bound (0.5 s).

``POST /enqueue/{tag}`` and ``POST /enqueue-sync/{tag}`` hand ``tag`` to consumer tasks the lifespan
started (their events go straight to the bus); ``POST /stuck/{tag}`` emits from the request itself.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tidings import Event, EventBus, HandlerError, TidingsMiddleware, emit

from .common import record


def report(error: HandlerError) -> None:
    record(f"on_failure {type(error).__name__} {error.handler} <- {error.event.name}")


# HANG_HANDLER_TIMEOUT: seconds, for the test that shows handler_timeout bounding in-request work
_timeout = os.environ.get("HANG_HANDLER_TIMEOUT")
# HANG_REQUEST_HANDLERS: "inline" (default) or "task", for the test of the drain bound in task mode
_mode = os.environ.get("HANG_REQUEST_HANDLERS", "inline")
assert _mode in ("inline", "task")
bus = EventBus(
    name="hang",
    drain_timeout=0.5,
    handler_timeout=float(_timeout) if _timeout else None,
    on_failure=report,
    request_handlers="task" if _mode == "task" else "inline",
)
queues: dict[str, asyncio.Queue[str]] = {"stuck": asyncio.Queue(), "stuck.sync": asyncio.Queue()}


@bus.on("stuck")
async def hang_forever(event: Event) -> None:
    record(f"id of {event.payload}: {event.id}")
    record(f"hanging on {event.payload}")
    await asyncio.Event().wait()


@bus.on("stuck.sync")
def hang_forever_in_a_thread(event: Event) -> None:
    record(f"id of {event.payload}: {event.id}")
    record(f"hanging on {event.payload}")
    threading.Event().wait()


async def consume(name: str) -> None:
    while True:
        emit(name, await queues[name].get())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    consumers = [asyncio.create_task(consume(name)) for name in queues]
    yield
    record("lifespan shutdown")
    for consumer in consumers:
        consumer.cancel()


app = FastAPI(lifespan=lifespan)
app.add_middleware(TidingsMiddleware, bus=bus)


@app.post("/enqueue/{tag}")
async def enqueue(tag: str) -> None:
    queues["stuck"].put_nowait(tag)


@app.post("/enqueue-sync/{tag}")
async def enqueue_sync(tag: str) -> None:
    queues["stuck.sync"].put_nowait(tag)


@app.post("/stuck/{tag}")
async def stuck_in_request(tag: str) -> None:
    emit("stuck", tag)
