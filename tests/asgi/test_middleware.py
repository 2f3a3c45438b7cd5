"""The ASGI middleware with real Starlette and FastAPI apps: after-response delivery, policies, lifespan."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from tests.asgi_calls import http_scope, request_body
from tidings import (
    ConfigurationError,
    DrainTimeoutError,
    Event,
    EventBus,
    Limits,
    RequestErrorPolicy,
    RequestHandlerMode,
    TidingsMiddleware,
    emit,
)
from tidings._core.dispatcher import current_scope
from tidings.types import Message, Scope

from ..conftest import Recorder

pytestmark = pytest.mark.anyio

Log = list[str]


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def call_asgi(app: Any, path: str, log: Log, method: str = "GET") -> None:
    """Call an ASGI app directly, recording each message it sends into ``log``."""
    scope = http_scope(path, method)
    receive = request_body()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            log.append("body" if not message.get("more_body") else "chunk")
        else:
            log.append(message["type"])

    await app(scope, receive, send)


def starlette_app(bus: EventBus, routes: list[Any], **kwargs: Any) -> Starlette:
    return Starlette(routes=routes, middleware=[Middleware(TidingsMiddleware, bus=bus)], **kwargs)


async def test_handlers_run_after_the_last_body_chunk(bus: EventBus) -> None:
    log: Log = []

    @bus.on("page.viewed")
    async def handler(event: Event) -> None:
        log.append(f"handler:{event.payload}")

    async def endpoint(request: Request) -> Response:
        emit("page.viewed", 1)
        log.append("endpoint")
        emit("page.viewed", 2)
        return PlainTextResponse("ok")

    app = starlette_app(bus, [Route("/", endpoint)])
    async with bus:
        await call_asgi(app, "/", log)
    assert log == ["endpoint", "http.response.start", "body", "handler:1", "handler:2"]


async def test_streaming_responses_finish_before_handlers_start(bus: EventBus) -> None:
    log: Log = []

    @bus.on("stream.*")
    async def handler(event: Event) -> None:
        log.append(event.name)

    async def chunks() -> AsyncIterator[bytes]:
        emit("stream.started")
        for part in (b"a", b"b", b"c"):
            yield part
        emit("stream.finished")

    async def endpoint(request: Request) -> Response:
        return StreamingResponse(chunks())

    app = starlette_app(bus, [Route("/", endpoint)])
    async with bus:
        await call_asgi(app, "/", log)
    assert log[-2:] == ["stream.started", "stream.finished"]
    assert log.index("body") < log.index("stream.started")
    assert log.count("chunk") == 3


async def test_fastapi_async_and_sync_endpoints_and_dependencies(bus: EventBus, recorder: Recorder) -> None:
    from fastapi import Depends

    @bus.on("*")
    async def handler(event: Event) -> None:
        recorder.add((event.name, event.payload))

    def current_user() -> str:
        emit("auth.checked", "ann")
        return "ann"

    app = FastAPI()
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.post("/users")
    async def create(user: str = Depends(current_user)) -> dict[str, str]:
        emit("user.created", {"by": user})
        return {"ok": user}

    @app.post("/orders")
    def place() -> dict[str, bool]:  # runs in the threadpool; emit still finds the request
        emit("order.placed", 5)
        return {"ok": True}

    async with bus, client(app) as http:
        assert (await http.post("/users")).status_code == 200
        assert (await http.post("/orders")).status_code == 200
    assert recorder.items == [
        ("auth.checked", "ann"),
        ("user.created", {"by": "ann"}),
        ("order.placed", 5),
    ]


async def test_background_tasks_and_spawned_tasks_do_not_lose_events(
    bus: EventBus, recorder: Recorder
) -> None:
    release = asyncio.Event()
    spawned: list[asyncio.Task[None]] = []

    @bus.on("*")
    async def handler(event: Event) -> None:
        recorder.add(event.name)

    async def later() -> None:
        await release.wait()
        emit("task.after.response")

    app = FastAPI()
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.get("/")
    async def endpoint(background: BackgroundTasks) -> dict[str, bool]:
        emit("in.request")
        background.add_task(emit, "in.background.task")
        spawned.append(asyncio.create_task(later()))
        return {"ok": True}

    async with bus, client(app) as http:
        assert (await http.get("/")).status_code == 200
        assert recorder.items == ["in.request", "in.background.task"]
        release.set()
        await recorder.wait_count(3)
        await spawned[0]
    assert recorder.items[-1] == "task.after.response"


def failing_app(
    bus: EventBus,
    *,
    after_response: bool = False,
    request_errors: RequestErrorPolicy | None = None,
    by_hand: bool = False,
) -> Any:
    """An app whose endpoint emits two events and raises, before or after its response started.

    ``by_hand``: the middleware wraps the app (``TidingsMiddleware(app, bus=bus)``), outside
    Starlette's ``ServerErrorMiddleware``, which sends its 500 response and then re-raises.
    """

    async def endpoint(request: Request) -> Response:
        emit("user.created")
        emit("user.welcomed")
        if not after_response:
            raise RuntimeError("database is gone")

        async def fail() -> None:
            raise RuntimeError("background task failed")

        return PlainTextResponse("ok", background=BackgroundTask(fail))

    routes = [Route("/", endpoint)]
    if by_hand:
        return TidingsMiddleware(Starlette(routes=routes), bus=bus, request_errors=request_errors)
    middleware = Middleware(TidingsMiddleware, bus=bus, request_errors=request_errors)
    return Starlette(routes=routes, middleware=[middleware])


async def get_ignoring_app_errors(bus: EventBus, app: Any) -> int:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with bus, httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        status = (await http.get("/")).status_code
        await bus.drain()
    return status


async def test_a_request_that_raises_delivers_its_events_by_default(recorder: Recorder) -> None:
    bus = EventBus()
    assert bus.request_errors == "deliver"
    bus.on("*")(lambda event: recorder.add(event.name))
    assert await get_ignoring_app_errors(bus, failing_app(bus)) == 500
    assert recorder.items == ["user.created", "user.welcomed"]


@pytest.mark.parametrize("by_hand", [False, True], ids=["add_middleware", "wrapped_by_hand"])
@pytest.mark.parametrize("where", ["bus", "middleware"])
async def test_the_drop_policy_discards_a_failed_requests_events_with_a_warning(
    where: str, by_hand: bool, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    bus = EventBus(request_errors="drop" if where == "bus" else "deliver")
    bus.on("*")(lambda event: recorder.add(event.name))
    policy: RequestErrorPolicy | None = "drop" if where == "middleware" else None
    app = failing_app(bus, request_errors=policy, by_hand=by_hand)
    assert await get_ignoring_app_errors(bus, app) == 500
    assert recorder.items == []
    # (tidings' own: asyncio's debug mode warns of slow callbacks on a busy machine)
    warnings = [r for r in caplog.records if r.name == "tidings" and r.levelno == logging.WARNING]
    assert [r.getMessage().split(" of a request")[0] for r in warnings] == [
        "event 'user.created'",
        "event 'user.welcomed'",
    ]  # one record per event, each naming it (and carrying it in tidings_event)
    assert all("was dropped because the app raised RuntimeError" in r.getMessage() for r in warnings)
    assert [r.__dict__["tidings_event"] for r in warnings] == ["user.created", "user.welcomed"]


@pytest.mark.parametrize("by_hand", [False, True], ids=["add_middleware", "wrapped_by_hand"])
async def test_the_drop_policy_delivers_once_the_response_has_started(
    by_hand: bool, recorder: Recorder
) -> None:
    bus = EventBus(request_errors="drop")
    bus.on("*")(lambda event: recorder.add(event.name))
    app = failing_app(bus, after_response=True, by_hand=by_hand)  # a background task raises after the 200
    assert await get_ignoring_app_errors(bus, app) == 200
    assert recorder.items == ["user.created", "user.welcomed"]


async def test_http_exceptions_are_responses_so_events_are_delivered(
    bus: EventBus, recorder: Recorder
) -> None:
    from fastapi import HTTPException

    @bus.on("*")
    async def handler(event: Event) -> None:
        recorder.add(event.name)

    app = FastAPI()
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.get("/")
    async def endpoint() -> None:
        emit("login.failed")
        raise HTTPException(status_code=401)

    async with bus, client(app) as http:
        assert (await http.get("/")).status_code == 401
    assert recorder.items == ["login.failed"]


class OutOfStock(Exception):
    pass


@pytest.mark.parametrize("catch_all", [Exception, 500], ids=["Exception", "500"])
async def test_under_drop_a_catch_all_exception_handler_counts_its_requests_as_failed(
    catch_all: type[Exception] | int, recorder: Recorder
) -> None:
    """Starlette runs a handler for ``Exception`` or 500 in ServerErrorMiddleware, outside user middleware.

    The exception passes the middleware before that handler responds, so the README tells users to
    register a handler for a specific class when they want the events kept.
    """
    bus = EventBus(request_errors="drop")
    bus.on("*")(lambda event: recorder.add(event.name))
    app = FastAPI()
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.exception_handler(OutOfStock)
    async def out_of_stock(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "out of stock"}, status_code=409)

    @app.exception_handler(catch_all)
    async def anything(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "handled"}, status_code=400)

    @app.post("/specific")
    async def specific() -> None:
        emit("kept.specific.handler")
        raise OutOfStock

    @app.post("/catch-all")
    async def unexpected() -> None:
        emit("dropped.catch_all.handler")
        raise KeyError("sku")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # ServerErrorMiddleware re-raises
    async with bus, httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.post("/specific")).status_code == 409
        assert (await http.post("/catch-all")).status_code == 400
        await bus.drain()
    assert recorder.items == ["kept.specific.handler"]


async def test_a_cancelled_request_hands_its_events_to_the_bus(bus: EventBus, recorder: Recorder) -> None:
    entered = asyncio.Event()

    @bus.on("*")
    async def handler(event: Event) -> None:
        recorder.add(event.name)

    async def endpoint(request: Request) -> Response:
        emit("before.cancel")
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = starlette_app(bus, [Route("/", endpoint)])
    async with bus:
        task = asyncio.ensure_future(call_asgi(app, "/", []))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await recorder.wait_count(1) == ["before.cancel"]


async def test_handler_failures_never_reach_the_server(bus: EventBus, failures: list[Any]) -> None:
    @bus.on("x")
    async def broken(event: Event) -> None:
        raise RuntimeError("handler bug")

    async def endpoint(request: Request) -> Response:
        emit("x")
        return JSONResponse({"ok": True})

    app = starlette_app(bus, [Route("/", endpoint)])
    async with bus, client(app) as http:  # ASGITransport re-raises app exceptions: none escapes
        assert (await http.get("/")).json() == {"ok": True}
    assert len(failures) == 1


async def test_websocket_events_are_handled_while_the_connection_is_open(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("ws.message")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        emit("ws.message", text)
        # the handler runs before the connection closes: the client's next receive proves it
        await recorder.wait_count(1)
        await websocket.send_text("seen")
        await websocket.close()

    app = starlette_app(bus, [WebSocketRoute("/ws", chat)])
    with TestClient(app) as test_client, test_client.websocket_connect("/ws") as ws:
        ws.send_text("hello")
        assert ws.receive_text() == "seen"
    assert recorder.items == ["hello"]


def test_lifespan_starts_the_bus_before_startup_code_and_drains_before_shutdown_code() -> None:
    bus = EventBus()
    log: Log = []

    @bus.on("*")
    async def handler(event: Event) -> None:
        await asyncio.sleep(0)
        log.append(f"handled {event.name}")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.append("startup code")
        emit("app.started")
        yield
        log.append("shutdown code")  # the pools handlers need are closed here
        emit("app.stopping")

    async def endpoint(request: Request) -> Response:
        emit("request.seen")
        return PlainTextResponse("ok")

    app = starlette_app(bus, [Route("/", endpoint)], lifespan=lifespan)
    with TestClient(app) as test_client:
        assert test_client.get("/").text == "ok"
        assert bus.state.value == "running"
    assert log.index("handled request.seen") < log.index("shutdown code")
    assert log[0] == "startup code"
    assert "handled app.started" in log
    assert log[-1] == "handled app.stopping"  # emitted by shutdown code, drained at the end
    assert bus.state.value == "closed"


def test_fastapi_lifespan_with_testclient(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("*")
    def handler(event: Event) -> None:
        recorder.add(event.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        emit("started")
        yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.get("/")
    def index() -> dict[str, bool]:
        emit("index")
        return {"ok": True}

    with TestClient(app) as test_client:
        test_client.get("/")
    assert sorted(recorder.items) == ["index", "started"]


@pytest.mark.parametrize("mode", ["inline", "task"])
def test_without_lifespan_the_bus_starts_at_the_first_request(
    mode: RequestHandlerMode, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # In task mode too the handlers run inline: no bus task would survive the loop closing.
    bus = EventBus(request_handlers=mode)

    @bus.on("*")
    async def handler(event: Event) -> None:
        recorder.add(event.name)

    async def endpoint(request: Request) -> Response:
        emit("seen")
        return PlainTextResponse("ok")

    app = starlette_app(bus, [Route("/", endpoint)])
    test_client = TestClient(app)  # no `with`: no lifespan, and a new event loop per request
    test_client.get("/")
    test_client.get("/")
    assert recorder.items == ["seen", "seen"]
    assert bus.state.value == "running"
    assert not bus.loop_is_open()  # TestClient closed the loop of the last request
    emit("elsewhere")  # a bus on a closed loop cannot take events: it does not count
    assert "event 'elsewhere' was dropped" in caplog.text
    assert "no tidings bus is running" in caplog.text


def test_without_a_lifespan_a_failed_requests_events_are_delivered_before_the_error_response(
    recorder: Recorder, failures: list[Any]
) -> None:
    # No lifespan: a bus task would be cut off when TestClient closes the request's loop.
    bus = EventBus(on_failure=failures.append)

    @bus.on("*")
    async def slow(event: Event) -> None:
        await asyncio.sleep(0.01)  # still running when a bus task would have been cut off
        recorder.add(("async", event.name))

    @bus.on("*")
    def sync(event: Event) -> None:
        recorder.add(("sync", event.name))

    test_client = TestClient(failing_app(bus), raise_server_exceptions=False)  # no `with`
    assert test_client.get("/").status_code == 500
    assert sorted(recorder.items) == [
        ("async", "user.created"),
        ("async", "user.welcomed"),
        ("sync", "user.created"),
        ("sync", "user.welcomed"),
    ]
    assert failures == []


@pytest.mark.parametrize("mode", ["inline", "task"])
async def test_a_request_that_outlives_its_bus_logs_its_events_as_dropped(
    mode: RequestHandlerMode, recorder: Recorder, failures: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    bus = EventBus(on_failure=failures.append, request_handlers=mode)
    bus.on("*")(lambda event: recorder.add(("sync", event.name)))  # needs the bus's threads, gone

    @bus.on("*")
    async def handler(event: Event) -> None:  # pragma: no cover - the bus closed: never called
        recorder.add(("async", event.name))

    go_on = asyncio.Event()

    async def endpoint(request: Request) -> Response:
        await go_on.wait()
        emit("late.event")
        return PlainTextResponse("ok")

    app = starlette_app(bus, [Route("/", endpoint)])
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await bus.start()
    request = asyncio.create_task(app(http_scope("/"), request_body(), send))
    await asyncio.sleep(0)  # the request is in its endpoint
    await bus.aclose()  # say, a server that closed the bus without waiting for its requests
    go_on.set()
    await request  # nothing reaches the server
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert recorder.items == [] and failures == []  # not run after the app's shutdown code...
    assert "event 'late.event' was dropped because the bus is closed" in caplog.text  # ...nor silently lost


async def test_two_apps_in_one_process_do_not_see_each_others_events(recorder: Recorder) -> None:
    shop_bus, admin_bus = EventBus(name="shop"), EventBus(name="admin")

    @shop_bus.on("*")
    async def shop_handler(event: Event) -> None:
        recorder.add(("shop", event.name))

    @admin_bus.on("*")
    async def admin_handler(event: Event) -> None:
        recorder.add(("admin", event.name))

    def app_for(bus: EventBus, name: str) -> Starlette:
        async def endpoint(request: Request) -> Response:
            emit(f"{name}.event")
            return PlainTextResponse(name)

        return starlette_app(bus, [Route("/", endpoint)])

    shop, admin = app_for(shop_bus, "shop"), app_for(admin_bus, "admin")
    async with shop_bus, admin_bus, client(shop) as shop_http, client(admin) as admin_http:
        await asyncio.gather(shop_http.get("/"), admin_http.get("/"), shop_http.get("/"))
    assert sorted(recorder.items) == [
        ("admin", "admin.event"),
        ("shop", "shop.event"),
        ("shop", "shop.event"),
    ]


def two_middlewares_app(outer_bus: EventBus, inner_bus: EventBus, endpoint: Callable[..., Any]) -> Starlette:
    """An app whose requests pass through two tidings middlewares, ``outer_bus``'s first."""
    middleware = [Middleware(TidingsMiddleware, bus=outer_bus), Middleware(TidingsMiddleware, bus=inner_bus)]
    return Starlette(routes=[Route("/", endpoint)], middleware=middleware)


@pytest.mark.parametrize("inner_enabled", [True, False])
@pytest.mark.parametrize("endpoint_kind", ["async", "sync"])
async def test_with_two_middlewares_events_of_both_buses_wait_for_the_response(
    endpoint_kind: str, inner_enabled: bool
) -> None:
    """The inner middleware's request must not hide the outer one's from the outer bus.

    The endpoint waits until the outer bus has handled a probe emitted outside any request after
    its event: an event handed to that bus at once would have been handled by then, before the
    response. The sync endpoint emits from the threadpool, whose events reach the loop in order.
    A disabled inner bus drops its own events and hides nothing either.
    """
    outer_bus, inner_bus = EventBus(name="outer"), EventBus(name="inner", enabled=inner_enabled)
    log: Log = []
    probe_handled, probe_handled_in_thread = asyncio.Event(), threading.Event()

    @outer_bus.on("audit.logged")
    async def outer_handler(event: Event) -> None:
        log.append(f"outer:{event.name}")

    @outer_bus.on("probe")
    async def probe(event: Event) -> None:
        probe_handled.set()
        probe_handled_in_thread.set()

    @inner_bus.on("*")
    async def inner_handler(event: Event) -> None:
        log.append(f"inner:{event.name}")

    def emit_both() -> None:
        emit("user.created")  # the innermost middleware's bus
        outer_bus.emit("audit.logged")
        contextvars.Context().run(outer_bus.emit, "probe")  # outside any request

    async def async_endpoint(request: Request) -> Response:
        emit_both()
        with anyio.fail_after(5):
            await probe_handled.wait()
        return PlainTextResponse("ok")

    def sync_endpoint(request: Request) -> Response:
        emit_both()
        assert probe_handled_in_thread.wait(5)
        return PlainTextResponse("ok")

    app = two_middlewares_app(
        outer_bus, inner_bus, async_endpoint if endpoint_kind == "async" else sync_endpoint
    )
    async with outer_bus, inner_bus:
        await call_asgi(app, "/", log)
    inner = ["inner:user.created"] if inner_enabled else []
    assert log == ["http.response.start", "body", *inner, "outer:audit.logged"]


async def test_with_two_middlewares_a_task_left_running_still_reaches_the_outer_bus(
    recorder: Recorder,
) -> None:
    outer_bus, inner_bus = EventBus(name="outer"), EventBus(name="inner")
    outer_bus.on("*")(lambda event: recorder.add(event.name))
    release = asyncio.Event()
    spawned: list[asyncio.Task[None]] = []

    async def later() -> None:
        await release.wait()
        outer_bus.emit("task.after.response")  # both requests are over: straight to the bus

    async def endpoint(request: Request) -> Response:
        spawned.append(asyncio.create_task(later()))
        return PlainTextResponse("ok")

    app = two_middlewares_app(outer_bus, inner_bus, endpoint)
    async with outer_bus, inner_bus, client(app) as http:
        assert (await http.get("/")).status_code == 200
        release.set()
        await spawned[0]
        await recorder.wait_count(1)
    assert recorder.items == ["task.after.response"]


@pytest.mark.parametrize("switch", ["option", "environment"])
async def test_a_disabled_bus_passes_requests_through(
    switch: str, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    if switch == "environment":
        monkeypatch.setenv("TIDINGS_DISABLE_EMIT", "1")
    bus = EventBus(enabled=False) if switch == "option" else EventBus()
    assert not bus.enabled

    @bus.on("*")
    async def handler(event: Event) -> None:
        recorder.add(event.name)

    async def endpoint(request: Request) -> Response:
        emit("ignored")
        return PlainTextResponse("ok")

    app = starlette_app(bus, [Route("/", endpoint)])
    async with bus, client(app) as http:
        assert (await http.get("/")).text == "ok"
    assert recorder.items == []


async def test_other_scope_types_pass_straight_through(bus: EventBus) -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        seen.append(scope["type"])

    await TidingsMiddleware(app, bus=bus)({"type": "custom"}, None, None)  # type: ignore[arg-type]
    assert seen == ["custom"]


def test_bad_middleware_options_fail_at_construction() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None: ...

    with pytest.raises(ConfigurationError, match="bus=EventBus"):
        TidingsMiddleware(app, bus="nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="request_errors"):
        TidingsMiddleware(app, bus=EventBus(), request_errors="maybe")  # type: ignore[arg-type]


async def test_a_client_disconnecting_mid_stream_does_not_lose_the_requests_events(
    bus: EventBus, recorder: Recorder
) -> None:
    @bus.on("*")
    async def handler(event: Event) -> None:
        recorder.add(event.name)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"tick"
            await asyncio.sleep(0)

    async def endpoint(request: Request) -> Response:
        emit("download.started")
        return StreamingResponse(endless())

    app = starlette_app(bus, [Route("/", endpoint)])
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [],
        "query_string": b"",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "root_path": "",
        "scheme": "http",
    }
    messages: Iterator[Message] = iter([{"type": "http.request", "body": b""}, {"type": "http.disconnect"}])
    chunks = 0

    async def receive() -> Message:
        await asyncio.sleep(0)
        return next(messages, {"type": "http.disconnect"})

    async def send(message: Message) -> None:
        nonlocal chunks
        chunks += 1

    async with bus:
        await app(scope, receive, send)
    assert recorder.items == ["download.started"]


async def test_backpressure_queues_request_jobs_without_delaying_responses(recorder: Recorder) -> None:
    # max_concurrency=1: while one request's handler holds the slot, the next requests still
    # respond; their jobs wait in their own tasks, then run in arrival order.
    bus = EventBus(limits=Limits(max_concurrency=1), handler_timeout=None)
    go_on = asyncio.Event()

    @bus.on("job")
    async def handler(event: Event) -> None:
        recorder.add(("start", event.payload))
        if event.payload == 0:
            await go_on.wait()
        recorder.add(("end", event.payload))

    async def endpoint(request: Request) -> Response:
        emit("job", int(request.query_params["n"]))
        return PlainTextResponse("ok")

    app = starlette_app(bus, [Route("/", endpoint)])
    responded: list[int] = []

    async def request(number: int) -> None:
        scope = http_scope("/")
        scope["query_string"] = f"n={number}".encode()

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                responded.append(number)
                recorder.add(("responded", number))

        await app(scope, request_body(), send)

    async with bus:
        requests = [asyncio.create_task(request(number)) for number in range(3)]
        await recorder.wait_for(lambda items: len(responded) == 3)
        assert recorder.items[-2:] == [("responded", 1), ("responded", 2)]  # job 0 holds the slot...
        assert ("start", 1) not in recorder.items  # ...and the other jobs wait for it
        go_on.set()
        await asyncio.gather(*requests)
    assert [item for item in recorder.items if item[0] != "responded"] == [
        ("start", 0),
        ("end", 0),
        ("start", 1),
        ("end", 1),
        ("start", 2),
        ("end", 2),
    ]


async def test_events_nobody_handles_are_a_harmless_no_op(bus: EventBus, failures: list[Any]) -> None:
    async def endpoint(request: Request) -> Response:
        emit("nobody.listens", {"x": 1})
        return PlainTextResponse("ok")

    app = starlette_app(bus, [Route("/", endpoint)])
    async with bus, client(app) as http:
        assert (await http.get("/")).text == "ok"
        assert bus._runner.jobs == set()  # no job was tracked, so drain has nothing to wait for
        assert bus._runner._running == 0  # nor was a concurrency slot taken
    assert failures == []


def test_a_shutdown_drain_cut_off_is_logged_and_shutdown_still_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus(drain_timeout=0.1, handler_timeout=None)
    log: Log = []

    @bus.on("stuck")
    async def hangs(event: Event) -> None:
        await asyncio.Event().wait()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        emit("stuck")  # its handler never returns
        yield
        log.append("shutdown code ran")

    app = starlette_app(bus, [], lifespan=lifespan)
    with TestClient(app):
        pass
    assert log == ["shutdown code ran"]
    assert "drain bound ran out with 1 handler call(s) unfinished" in caplog.text
    assert "hangs <- stuck" in caplog.text
    assert bus.state.value == "closed"


async def test_task_mode_runs_a_requests_handlers_in_a_bus_task_after_the_request(recorder: Recorder) -> None:
    bus = EventBus(request_handlers="task")
    gate = asyncio.Event()
    request_tasks: list[asyncio.Task[Any] | None] = []

    @bus.on("order.*")
    async def handler(event: Event) -> None:
        await gate.wait()
        recorder.add((event.name, asyncio.current_task() in request_tasks))
        if event.name == "order.placed":
            emit("order.confirmed")

    async def endpoint(request: Request) -> Response:
        request_tasks.append(asyncio.current_task())
        emit("order.placed")
        emit("order.paid")
        return PlainTextResponse("ok")

    app = starlette_app(bus, [Route("/", endpoint)])
    log: Log = []
    async with bus:
        await call_asgi(app, "/", log)  # returns while the handler still waits on the gate
        assert log == ["http.response.start", "body"]
        assert recorder.items == []
        gate.set()
        items = await recorder.wait_count(3)
    assert items == [("order.placed", False), ("order.paid", False), ("order.confirmed", False)]


async def test_task_mode_handlers_are_cut_off_by_the_drain_bound(caplog: pytest.LogCaptureFixture) -> None:
    failures: list[Any] = []
    bus = EventBus(request_handlers="task", handler_timeout=None, on_failure=failures.append)
    started = asyncio.Event()

    @bus.on("stuck")
    async def hangs(event: Event) -> None:
        started.set()
        await asyncio.Event().wait()

    async def endpoint(request: Request) -> Response:
        emit("stuck")
        return PlainTextResponse("ok")

    app = starlette_app(bus, [Route("/", endpoint)])
    async with bus:
        await call_asgi(app, "/", [])
        await started.wait()
        with pytest.raises(DrainTimeoutError) as caught:
            await bus.drain(timeout=0.05)
    assert [p.event.name for p in caught.value.pending] == ["stuck"]
    assert len(failures) == 1


def test_request_handlers_option_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="request_handlers"):
        EventBus(request_handlers="thread")  # type: ignore[arg-type]  # the point of the test


async def test_sync_endpoints_in_the_threadpool_lose_no_events(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("tick")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    app = FastAPI()
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.get("/{n}")
    def many(n: int) -> dict[str, int]:  # runs in a worker thread: its emits hop to the loop
        for i in range(n):
            emit("tick", (n, i))
        return {"n": n}

    async with bus, client(app) as http:
        await asyncio.gather(*(http.get(f"/{n}") for n in (200, 300, 400)))
    expected = [(n, i) for n in (200, 300, 400) for i in range(n)]
    assert sorted(recorder.items) == expected
    for n in (200, 300, 400):  # each request's events in emit order
        assert [i for m, i in recorder.items if m == n] == list(range(n))


def test_a_failed_startup_closes_the_bus() -> None:
    bus = EventBus()

    def connect_to_database() -> None:
        raise RuntimeError("no database")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        connect_to_database()
        yield

    app = starlette_app(bus, [], lifespan=lifespan)
    with pytest.raises(RuntimeError, match="no database"), TestClient(app):
        pass
    assert bus.state.value == "closed"


async def test_delivering_a_failed_requests_events_does_not_delay_its_error_response(
    bus: EventBus, recorder: Recorder
) -> None:
    gate = asyncio.Event()
    log: Log = []

    @bus.on("attempted")
    async def slow(event: Event) -> None:
        await gate.wait()
        recorder.add("handled")

    async def endpoint(request: Request) -> Response:
        emit("attempted")
        raise RuntimeError("boom")

    app = starlette_app(bus, [Route("/", endpoint)])
    async with bus:
        with pytest.raises(RuntimeError, match="boom"):
            await call_asgi(app, "/", log)  # returns (raising) while the handler still waits
        assert log == ["http.response.start", "body"]  # the 500 went out
        assert recorder.items == []
        gate.set()
        await recorder.wait_count(1)


async def _ok(scope: Scope, receive: Any, send: Any) -> None:
    emit("x")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_a_finished_request_job_lets_go_of_the_requests_task() -> None:
    # A server's timer armed in the request's send() (uvicorn's keep-alive timer; cancelled, it
    # waits in the loop's heap) holds a copy of the request's context, and so its job: the job
    # must not keep the request's task (its coroutine, its context) alive all that time
    bus = EventBus()
    jobs: list[weakref.ref[Any]] = []
    timers: list[asyncio.TimerHandle] = []

    @bus.on("x")
    async def handler(event: Event) -> None:
        jobs.append(weakref.ref(current_scope()))

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            timers.append(asyncio.get_running_loop().call_later(3600, lambda: None))

    app = TidingsMiddleware(_ok, bus=bus)
    async with bus:
        gc.disable()
        try:
            task = asyncio.get_running_loop().create_task(app(http_scope("/"), request_body(), send))
            await task
            request_task = weakref.ref(task)
            del task
            await asyncio.sleep(0)  # the loop's callback that resumed this test (it holds the task) ends
            assert jobs[0]() is not None  # the timer's copy of the context holds the job...
            assert request_task() is None  # ...and nothing holds the task
        finally:
            gc.enable()
            for timer in timers:
                timer.cancel()


async def test_a_request_job_run_in_a_task_of_its_own_is_freed_without_the_garbage_collector() -> None:
    # request_handlers="task": the job's task runs in a copy of the request's context, which holds
    # the job; a job holding its task after it ended would make a cycle only a collection frees
    bus = EventBus(request_handlers="task")
    jobs: list[weakref.ref[Any]] = []

    @bus.on("x")
    async def handler(event: Event) -> None:
        jobs.append(weakref.ref(current_scope()))

    async def send(message: Message) -> None:
        pass

    app = TidingsMiddleware(_ok, bus=bus)
    async with bus:
        gc.disable()
        try:
            for _ in range(3):
                await app(http_scope("/"), request_body(), send)
            await bus.drain()
            for _ in range(10):  # the loop lets go of a finished task once its callbacks ran
                if len(jobs) == 3 and all(job() is None for job in jobs):
                    break
                await asyncio.sleep(0)
            assert [job() is None for job in jobs] == [True, True, True]
        finally:
            gc.enable()
