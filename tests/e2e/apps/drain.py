"""Served by ``test_shutdown.py``: work that is still in flight or pending when SIGTERM arrives.

``POST /work/{tag}?n=`` emits ``n`` events from a request; ``POST /enqueue/{tag}?n=`` hands them to a
consumer task the lifespan started (as a queue consumer would), whose events go straight to the bus.
Handlers of ``work`` wait on gate ``tag``, then use the "database" the lifespan opens and closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tidings import Event, EventBus, TidingsMiddleware, emit

from .common import gate, record

bus = EventBus(name="drain", drain_timeout=20.0)
database = {"state": "not open yet"}
queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()


@bus.on("work")
async def work(event: Event) -> None:
    tag, i = event.payload
    record(f"start {tag}/{i}")
    await gate(tag)
    record(f"done {tag}/{i} db={database['state']}")
    emit("work.done", event.payload)  # chained while the bus drains: handled too


@bus.on("work.done")
def follow_up(event: Event) -> None:  # a plain def handler, in a worker thread
    tag, i = event.payload
    record(f"follow-up {tag}/{i} db={database['state']}")


@bus.on("app.stopping")
async def on_stopping(event: Event) -> None:
    record("stopping handler ran")


async def consume() -> None:
    while True:
        tag, n = await queue.get()
        for i in range(n):
            emit("work", (tag, i))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    database["state"] = "open"
    consumer = asyncio.create_task(consume())
    yield
    record(f"lifespan shutdown db={database['state']}")
    consumer.cancel()
    database["state"] = "closed"
    emit("app.stopping")  # events emitted by shutdown code are handled by the final drain


app = FastAPI(lifespan=lifespan)
app.add_middleware(TidingsMiddleware, bus=bus)


@app.post("/work/{tag}")
async def work_in_request(tag: str, n: int = 1) -> None:
    for i in range(n):
        emit("work", (tag, i))


@app.post("/enqueue/{tag}")
async def enqueue(tag: str, n: int = 1) -> None:
    queue.put_nowait((tag, n))
