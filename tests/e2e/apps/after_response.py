"""Served by ``test_server.py``: handlers that wait on gates the test opens, so it can tell when they run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from tidings import Event, EventBus, TidingsMiddleware, emit

from .common import gate, gate_sync, record

bus = EventBus(name="after-response")


@bus.on("app.started")
async def on_started(event: Event) -> None:
    record("startup handler ran")


@bus.on("slow")
async def slow_async(event: Event) -> None:
    record(f"async handler {event.payload} started")
    await gate(event.payload)
    record(f"async handler {event.payload} done")


@bus.on("slow")
def slow_sync(event: Event) -> None:
    record(f"sync handler {event.payload} started")
    gate_sync(event.payload)
    record(f"sync handler {event.payload} done")


@bus.on("streamed")
async def on_streamed(event: Event) -> None:
    record(f"stream handler {event.payload}")


@bus.on("late")
async def on_late(event: Event) -> None:
    record(f"late handler {event.payload}")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    emit("app.started")
    yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(TidingsMiddleware, bus=bus)
background: set[asyncio.Task[None]] = set()


@app.post("/slow/{tag}")
async def slow(tag: str, size: int = 0) -> dict[str, str]:
    emit("slow", tag)
    return {"tag": tag, "padding": "x" * size}


@app.get("/stream/{tag}")
async def stream(tag: str) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"chunk-1\n"
        emit("streamed", f"{tag} mid-stream")
        await gate(f"{tag}-stream")
        yield b"chunk-2\n"
        record(f"stream {tag} exhausted")

    emit("streamed", f"{tag} before")
    return StreamingResponse(chunks(), media_type="text/plain")


@app.post("/background/{tag}")
async def start_background(tag: str) -> dict[str, str]:
    async def later() -> None:
        await gate(f"{tag}-task")  # opened by the test once it has the response
        record(f"task {tag} emitting")
        emit("late", tag)

    task = asyncio.create_task(later())
    background.add(task)
    task.add_done_callback(background.discard)
    return {"tag": tag}
