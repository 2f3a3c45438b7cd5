"""Two apps in one process, each with its own bus: neither ever sees the other's events.

Both apps register the same event names and a "*" handler, run their lifespans at the same time and
serve interleaved requests; ambient ``emit()`` must always find the bus of the app it runs in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import anyio
import httpx
import pytest
from fastapi import FastAPI

from tidings import Event, EventBus, TidingsMiddleware, emit

from .support import lifespan, wait_for

pytestmark = pytest.mark.anyio


@dataclass
class Shop:
    """One app, its bus, and what its handlers saw as (handler, event name, payload)."""

    name: str
    bus: EventBus
    app: FastAPI
    seen: list[tuple[str, str, object]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # lets tasks of /later emit


def make_shop(name: str) -> Shop:
    bus = EventBus(name=name)

    @asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        emit("started", name)
        yield

    app = FastAPI(lifespan=app_lifespan)
    app.add_middleware(TidingsMiddleware, bus=bus)
    shop = Shop(name, bus, app)

    @bus.on("*")
    def everything(event: Event) -> None:
        shop.seen.append(("*", event.name, event.payload))

    @bus.on("ping")
    async def pong(event: Event) -> None:
        shop.seen.append(("pong", event.name, event.payload))
        emit("pinged", event.payload)  # chains on this app's bus

    @app.post("/ping/{tag}")
    async def ping(tag: str) -> None:
        emit("ping", tag)

    @app.post("/later/{tag}")
    async def later(tag: str) -> None:
        async def emit_later() -> None:
            await shop.release.wait()  # set by the test once it has the response
            emit("later", tag)

        task = asyncio.create_task(emit_later())
        shop.tasks.add(task)
        task.add_done_callback(shop.tasks.discard)

    return shop


@pytest.fixture
async def shops() -> AsyncIterator[tuple[Shop, Shop]]:
    a, b = make_shop("a"), make_shop("b")
    async with AsyncExitStack() as stack:
        for shop in (a, b):
            await stack.enter_async_context(lifespan(shop.app))
        yield a, b


def client(shop: Shop) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=shop.app), base_url=f"http://{shop.name}")


async def test_each_app_handles_only_its_own_events(shops: tuple[Shop, Shop]) -> None:
    a, b = shops
    async with client(a) as to_a, client(b) as to_b, anyio.create_task_group() as requests:
        for i in range(5):
            requests.start_soon(to_a.post, f"/ping/a{i}")
            requests.start_soon(to_b.post, f"/ping/b{i}")
    await wait_for(lambda: ("*", "started", "a") in a.seen, "a's startup event", seen=lambda: repr(a.seen))
    await wait_for(lambda: ("*", "started", "b") in b.seen, "b's startup event", seen=lambda: repr(b.seen))
    for shop in (a, b):
        payloads = {payload for _, _, payload in shop.seen}
        assert payloads == {shop.name} | {f"{shop.name}{i}" for i in range(5)}, shop.seen
        assert sorted(name for handler, name, _ in shop.seen if handler == "*") == sorted(
            ["started"] + ["ping", "pinged"] * 5
        )


async def test_a_task_emitting_after_the_response_reaches_its_own_app(shops: tuple[Shop, Shop]) -> None:
    a, b = shops
    async with client(a) as to_a, client(b) as to_b:
        assert (await to_a.post("/later/x")).status_code == 200
        assert (await to_b.post("/later/y")).status_code == 200
    a.release.set()
    b.release.set()
    await wait_for(lambda: ("*", "later", "x") in a.seen, "a's late event", seen=lambda: repr(a.seen))
    await wait_for(lambda: ("*", "later", "y") in b.seen, "b's late event", seen=lambda: repr(b.seen))
    assert [e for e in a.seen if e[1] == "later"] == [("*", "later", "x")]
    assert [e for e in b.seen if e[1] == "later"] == [("*", "later", "y")]


async def test_an_ambient_emit_outside_both_apps_is_refused(
    shops: tuple[Shop, Shop], caplog: pytest.LogCaptureFixture
) -> None:
    # With two buses running, an emit() in no request, handler or lifespan has no unambiguous bus:
    # it is logged and dropped, never raised into the caller.
    emit("ping", "nowhere")
    assert "event 'ping' was dropped" in caplog.text
    assert "2 buses are running" in caplog.text
