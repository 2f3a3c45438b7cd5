"""The Litestar plugin with real Litestar apps, driven by plain ASGI calls as a server drives them.

No ``from __future__ import annotations``: Litestar reads route handlers' annotations at runtime.
"""

import asyncio
import logging
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from litestar import Litestar, Request, Response, WebSocket, get, post, websocket
from litestar.config.app import AppConfig
from litestar.events import EventListener, SimpleEventEmitter, listener
from litestar.exceptions import NotFoundException
from litestar.params import Body
from litestar.plugins import InitPluginProtocol
from litestar.stores.memory import MemoryStore
from litestar.testing import AsyncTestClient, TestClient
from starlette.requests import Request as StarletteRequest

import tidings
from tests.asgi_calls import http_scope
from tidings import (
    Arguments,
    BusState,
    ConfigurationError,
    Event,
    EventBus,
    HandlerError,
    RequestErrorPolicy,
    TidingsMiddleware,
)
from tidings.integrations.litestar import TidingsEventEmitter, TidingsPlugin, listener_function
from tidings.store import SQLiteStore
from tidings.types import Message, Scope

from ..conftest import Recorder

pytestmark = pytest.mark.anyio


def make_app(
    plugin: TidingsPlugin | None,
    route_handlers: list[Any] | None = None,
    listeners: list[EventListener] | None = None,
    **options: Any,
) -> Litestar:
    options.setdefault("plugins", [plugin] if plugin is not None else [])
    return Litestar(
        route_handlers=route_handlers or [],
        listeners=listeners or [],
        logging_config=None,  # Litestar's default reconfigures the process's root logger
        **options,
    )


class Lifespan:
    """Drives an app's ASGI lifespan in a task of its own, as a server does.

    ``on_shutdown_message`` is called when the app receives ``lifespan.shutdown``, before it acts on it.
    """

    def __init__(self, app: Any, on_shutdown_message: Callable[[], object] = lambda: None) -> None:
        self.app = app
        self.on_shutdown_message = on_shutdown_message
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        message = await self._to_app.get()
        if message["type"] == "lifespan.shutdown":
            self.on_shutdown_message()
        return message

    async def __aenter__(self) -> "Lifespan":
        scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.create_task(self.app(scope, self._receive, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        with anyio.fail_after(5):
            message = await self._from_app.get()
        assert message["type"] == "lifespan.startup.complete", message
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        await self._to_app.put({"type": "lifespan.shutdown"})
        with anyio.fail_after(5):
            message = await self._from_app.get()
            await self._task
        assert message["type"] == "lifespan.shutdown.complete", message


async def call(
    app: Any,
    method: str,
    path: str,
    body: bytes = b"",
    on_send: Callable[[Message], object] = lambda message: None,
) -> tuple[int, bytes]:
    """One HTTP request as a server makes it; returns when the app call returns."""
    scope = http_scope(
        path,
        method,
        headers=[(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    )
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        on_send(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def response_end(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


# -- after the response ----------------------------------------------------------------------------------


async def test_listeners_run_after_the_response_is_sent(recorder: Recorder) -> None:
    response_sent = asyncio.Event()

    @listener("user_created")
    async def send_welcome_email(email: str) -> None:
        recorder.add(("welcome", email, response_sent.is_set()))

    @post("/users")
    async def create_user(request: Request[Any, Any, Any]) -> None:
        request.app.emit("user_created", email="ada@example.com")
        recorder.add("emitted")

    def on_send(message: Message) -> None:
        if response_end(message):
            response_sent.set()
            recorder.add("response sent")

    app = make_app(TidingsPlugin(), [create_user], [send_welcome_email])
    async with Lifespan(app):
        status, _ = await call(app, "POST", "/users", on_send=on_send)
        assert status == 201
        items = await recorder.wait_count(3)
    assert items == ["emitted", "response sent", ("welcome", "ada@example.com", True)]


async def test_a_listener_waiting_for_the_response_does_not_deadlock_it(recorder: Recorder) -> None:
    # Litestar's own emitter may start a listener before the response: this one would wait forever.
    response_sent = asyncio.Event()

    @listener("order_placed")
    async def confirm(order_id: int) -> None:
        await response_sent.wait()
        recorder.add(order_id)

    @post("/orders")
    async def place(request: Request[Any, Any, Any]) -> dict[str, int]:
        request.app.emit("order_placed", 7)
        return {"id": 7}

    def on_send(message: Message) -> None:
        if response_end(message):
            response_sent.set()

    app = make_app(TidingsPlugin(), [place], [confirm])
    async with Lifespan(app):
        with anyio.fail_after(5):
            status, body = await call(app, "POST", "/orders", on_send=on_send)
        assert (status, body) == (201, b'{"id":7}')
        assert await recorder.wait_count(1) == [7]


async def test_emits_from_a_sync_route_handler_wait_for_the_response(recorder: Recorder) -> None:
    response_sent = threading.Event()

    @listener("report_requested")
    async def build(month: str) -> None:
        recorder.add((month, response_sent.is_set()))

    @get("/report", sync_to_thread=True)
    def request_report(request: Request[Any, Any, Any]) -> str:
        request.app.emit("report_requested", "2026-11")  # from a worker thread
        return "queued"

    def on_send(message: Message) -> None:
        if response_end(message):
            response_sent.set()

    app = make_app(TidingsPlugin(), [request_report], [build])
    async with Lifespan(app):
        assert await call(app, "GET", "/report", on_send=on_send) == (200, b"queued")
        assert await recorder.wait_count(1) == [("2026-11", True)]


async def test_emit_outside_a_request_goes_straight_to_the_bus(recorder: Recorder) -> None:
    started = asyncio.Event()

    @listener("tick")
    async def on_tick(n: int) -> None:
        recorder.add(n)

    async def ticker(app: Litestar) -> None:
        await started.wait()
        app.emit("tick", 1)  # a task of the app's, in no request

    @asynccontextmanager
    async def run_ticker(app: Litestar) -> AsyncIterator[None]:
        task = asyncio.create_task(ticker(app))
        yield
        await task

    app = make_app(TidingsPlugin(), listeners=[on_tick], lifespan=[run_ticker])
    async with Lifespan(app):
        started.set()
        assert await recorder.wait_count(1) == [1]


# -- what Litestar's own emitter gets wrong ---------------------------------------------------------------


async def test_an_emit_nobody_listens_to_is_a_no_op(recorder: Recorder) -> None:
    @get("/")
    async def index(request: Request[Any, Any, Any]) -> str:
        request.app.emit("nobody.listens", 1, reason="none")
        return "ok"

    @asynccontextmanager
    async def startup_emit(app: Litestar) -> AsyncIterator[None]:
        app.emit("nobody.listens.either")
        yield

    app = make_app(TidingsPlugin(), [index], lifespan=[startup_emit])
    async with Lifespan(app):
        assert await call(app, "GET", "/") == (200, b"ok")


async def test_control_litestars_own_emitter_makes_it_a_500() -> None:
    @get("/")
    async def index(request: Request[Any, Any, Any]) -> str:
        request.app.emit("nobody.listens")
        return "ok"

    app = make_app(None, [index])
    async with Lifespan(app):
        status, _ = await call(app, "GET", "/")
    assert status == 500


async def test_a_failing_listener_does_not_stop_the_others_or_fail_the_request(
    bus: EventBus, failures: list[HandlerError], recorder: Recorder
) -> None:
    @listener("order_placed")
    async def charge(order_id: int) -> None:
        raise RuntimeError("card declined")

    @listener("order_placed")
    def ship(order_id: int) -> None:
        raise ValueError("no stock")

    @listener("order_placed")
    async def confirm(order_id: int) -> None:
        recorder.add(("confirmed", order_id))

    @post("/orders")
    async def place(request: Request[Any, Any, Any]) -> str:
        request.app.emit("order_placed", 42)
        return "placed"

    app = make_app(TidingsPlugin(bus), [place], [charge, ship, confirm])
    async with Lifespan(app):
        assert await call(app, "POST", "/orders") == (201, b"placed")
        assert await recorder.wait_count(1) == [("confirmed", 42)]
    # tidings saw the exceptions (Litestar's own wrapper would have logged and swallowed them)
    assert sorted(f.handler.rpartition(".")[2] for f in failures) == ["charge", "ship"]
    assert {type(f.__cause__) for f in failures} == {RuntimeError, ValueError}
    assert all(f.event.payload == 42 for f in failures)


async def test_a_sync_listener_runs_in_a_worker_thread_not_on_the_loop(recorder: Recorder) -> None:
    loop_thread = threading.get_ident()
    released = threading.Event()

    @listener("report_requested")
    def build_report(month: str) -> None:
        recorder.add(("started", threading.get_ident() != loop_thread, threading.current_thread().name))
        # if this ran on the event loop, the test could not set the event below
        recorder.add(("released", released.wait(5)))

    @post("/reports")
    async def request_report(request: Request[Any, Any, Any]) -> None:
        request.app.emit("report_requested", month="2026-11")

    app = make_app(TidingsPlugin(), [request_report], [build_report])
    async with Lifespan(app):
        request = asyncio.create_task(call(app, "POST", "/reports"))
        items = await recorder.wait_count(1)
        _, off_the_loop, thread_name = items[0]
        assert off_the_loop
        assert thread_name.startswith("tidings-handler")  # tidings' worker, not Litestar's wrapper
        released.set()
        assert await recorder.wait_count(2) == [items[0], ("released", True)]
        assert (await request)[0] == 201


# -- Litestar's calling convention ------------------------------------------------------------------------


@dataclass
class DeleteUserDTO:
    email: str
    reason: str


async def test_listeners_are_called_with_the_emitted_args_and_kwargs(recorder: Recorder) -> None:
    # Litestar's documented examples: several listeners per event, **kwargs, several events per listener.
    @listener("user_deleted")
    async def send_farewell_email_handler(email: str, **kwargs: Any) -> None:
        recorder.add(("farewell", email, kwargs))

    @listener("user_deleted")
    async def notify_customer_support(reason: str, **kwargs: Any) -> None:
        recorder.add(("support", reason, kwargs))

    @listener("user_created", "password_changed")
    async def send_email_handler(email: str, message: str) -> None:
        recorder.add(("email", email, message))

    @listener("moved")
    def positional(x: int, y: int, *rest: int, unit: str = "m") -> None:
        recorder.add(("moved", x, y, rest, unit))

    @listener("ping")
    async def no_arguments() -> None:
        recorder.add("pong")

    @post("/users/delete")
    async def delete_user_handler(
        data: Annotated[DeleteUserDTO, Body()], request: Request[Any, Any, Any]
    ) -> None:
        request.app.emit("user_deleted", email=data.email, reason=data.reason)
        request.app.emit("user_created", "ada@example.com", message="welcome")
        request.app.emit("password_changed", email="ada@example.com", message="changed")
        request.app.emit("moved", 1, 2, 3, 4, unit="km")
        request.app.emit("ping")

    app = make_app(
        TidingsPlugin(),
        [delete_user_handler],
        [send_farewell_email_handler, notify_customer_support, send_email_handler, positional, no_arguments],
    )
    async with Lifespan(app):
        body = b'{"email": "ada@example.com", "reason": "deleted"}'
        assert (await call(app, "POST", "/users/delete", body))[0] == 201
        items = await recorder.wait_count(6)
    expected = [
        ("farewell", "ada@example.com", {"reason": "deleted"}),
        ("support", "deleted", {"email": "ada@example.com"}),
        ("email", "ada@example.com", "welcome"),
        ("email", "ada@example.com", "changed"),
        ("moved", 1, 2, (3, 4), "km"),  # a sync listener: its thread runs beside the async ones
        "pong",
    ]
    assert sorted(items, key=repr) == sorted(expected, key=repr)


async def test_one_function_is_one_handler_whatever_its_listeners() -> None:
    bus = EventBus()

    async def notify(email: str) -> None: ...

    def make(suffix: str) -> EventListener:
        @listener(f"made.{suffix}")
        async def made(**kwargs: Any) -> None: ...

        return made

    first, second = make("a"), make("b")  # two functions with one qualified name
    make_app(TidingsPlugin(bus), listeners=[listener("a", "b")(notify), listener("c")(notify), first, second])
    names = {s.pattern: s.handler.name for s in bus.registry}
    assert names["a"] == names["b"] == names["c"] == f"{__name__}.{notify.__qualname__}"
    assert names["made.b"] == names["made.a"] + "#2"
    assert len({s.handler for s in bus.registry}) == 3  # notify once, for a, b and c


def test_listener_function_takes_off_litestars_wrappers() -> None:
    async def handler(email: str) -> None: ...

    def sync_handler(email: str) -> None: ...

    assert listener_function(listener("x")(handler)) is handler
    assert listener_function(listener("x")(sync_handler)) is sync_handler


# -- tidings alongside ------------------------------------------------------------------------------------


@dataclass
class UserCreated:
    __event_name__ = "user.created"
    id: int
    email: str


@dataclass
class SignedUp:
    email: str
    plan: str = "free"


async def test_typed_events_native_emit_and_bus_handlers_work_alongside(recorder: Recorder) -> None:
    bus = EventBus()
    bus.schema(SignedUp, name="signed_up")
    response_sent = asyncio.Event()

    @bus.on(UserCreated)
    async def welcome(user: UserCreated) -> None:
        recorder.add(("typed", user, response_sent.is_set()))

    @bus.on("audit")
    async def audit(event: Event) -> None:
        recorder.add(("native", event.payload, response_sent.is_set()))

    @bus.on("signed_up")
    async def count(signup: SignedUp) -> None:
        recorder.add(("schema", signup))

    @listener("audit")
    async def audit_listener(entry: dict[str, str]) -> None:
        recorder.add(("listener", entry))

    @post("/users")
    async def create(request: Request[Any, Any, Any]) -> None:
        tidings.emit(UserCreated(1, "ada@example.com"))
        tidings.emit("audit", {"by": "ada"})
        # Litestar types event ids as str; the tidings backend takes typed events too
        request.app.emit(UserCreated(2, "bob@example.com"))  # type: ignore[arg-type]
        request.app.emit("signed_up", {"email": "cy@example.com"})  # validated by the schema

    def on_send(message: Message) -> None:
        if response_end(message):
            response_sent.set()

    app = make_app(TidingsPlugin(bus), [create], [audit_listener])
    async with Lifespan(app):
        assert (await call(app, "POST", "/users", on_send=on_send))[0] == 201
        items = await recorder.wait_count(5)
    assert len(items) == 5
    assert ("typed", UserCreated(1, "ada@example.com"), True) in items
    assert ("typed", UserCreated(2, "bob@example.com"), True) in items
    assert ("native", {"by": "ada"}, True) in items
    assert ("schema", SignedUp("cy@example.com")) in items
    assert ("listener", {"by": "ada"}) in items  # tidings.emit() reaches Litestar listeners too


async def test_bus_handlers_see_the_payload_emit_now_would_make(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("user_created")
    async def by_name(email: str) -> None:
        recorder.add(("by name", email))

    @bus.on("*")
    async def envelope(event: Event) -> None:
        recorder.add((event.name, event.payload))

    @listener("nothing")
    async def gets_none(value: Any) -> None:
        recorder.add(("listener", value))

    @get("/")
    async def index(request: Request[Any, Any, Any]) -> None:
        request.app.emit("user_created", email="ada@example.com")
        request.app.emit("order_placed", {"id": 7})  # one argument: the payload itself
        request.app.emit("moved", 1, 2)
        request.app.emit("ping")
        request.app.emit("nothing", None)  # still one argument for the listener

    app = make_app(TidingsPlugin(bus), [index], [gets_none])
    async with Lifespan(app):
        await call(app, "GET", "/")
        items = await recorder.wait_count(7)
    assert items == [
        ("by name", "ada@example.com"),
        ("user_created", Arguments((), {"email": "ada@example.com"})),
        ("order_placed", {"id": 7}),
        ("moved", Arguments((1, 2))),
        ("ping", None),
        ("nothing", Arguments((None,))),
        ("listener", None),
    ]


# -- lifespan ---------------------------------------------------------------------------------------------


class Resource:
    def __init__(self, recorder: Recorder, name: str) -> None:
        self.recorder = recorder
        self.name = name
        self.open = False

    @asynccontextmanager
    async def manage(self, app: Litestar) -> AsyncIterator[None]:
        self.open = True
        self.recorder.add(f"{self.name} open")
        try:
            yield
        finally:
            self.open = False
            self.recorder.add(f"{self.name} closed")


def lifespan_app(
    plugin: TidingsPlugin | None, recorder: Recorder, shutdown_requested: asyncio.Event, **options: Any
) -> tuple[Litestar, Resource]:
    """An app whose startup hook emits a job that is still running when the server asks for shutdown."""
    db = Resource(recorder, "db")

    @listener("job")
    async def slow_job(n: int) -> None:
        recorder.add("job started")
        await shutdown_requested.wait()
        recorder.add(("job finished, db open:", db.open))

    @listener("goodbye")
    async def goodbye() -> None:
        recorder.add("goodbye handled")

    def on_startup(app: Litestar) -> None:
        recorder.add(("startup hook, bus running:", plugin is None or plugin.bus.state is BusState.RUNNING))
        app.emit("job", 1)

    async def on_shutdown(app: Litestar) -> None:
        recorder.add("shutdown hook")
        if plugin is not None:
            app.emit("goodbye")

    app = make_app(
        plugin,
        listeners=[slow_job, goodbye],
        lifespan=[db.manage],
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        **options,
    )
    return app, db


async def test_the_bus_starts_first_and_drains_before_the_apps_shutdown_code(recorder: Recorder) -> None:
    plugin = TidingsPlugin()
    shutdown_requested = asyncio.Event()
    app, _ = lifespan_app(plugin, recorder, shutdown_requested)
    async with Lifespan(app, on_shutdown_message=shutdown_requested.set):
        await recorder.wait_for(lambda items: "job started" in items)
        assert plugin.bus.state is BusState.RUNNING
    assert recorder.items == [
        "db open",
        ("startup hook, bus running:", True),
        "job started",
        ("job finished, db open:", True),  # drained before the lifespan manager closed the db
        "db closed",
        "shutdown hook",
        "goodbye handled",  # emitted by shutdown code: handled at the final close
    ]
    assert plugin.bus.state.value == "closed"


async def test_control_litestars_own_emitter_drains_after_the_resources_close(recorder: Recorder) -> None:
    # The fault the plugin's ordering avoids, shown by the same app on Litestar's SimpleEventEmitter.
    shutdown_requested = asyncio.Event()
    app, _ = lifespan_app(None, recorder, shutdown_requested)
    async with Lifespan(app, on_shutdown_message=shutdown_requested.set):
        await recorder.wait_for(lambda items: "job started" in items)
    assert recorder.items.index("db closed") < recorder.items.index(("job finished, db open:", False))


class LatePlugin(InitPluginProtocol):
    """A plugin listed after TidingsPlugin that adds a lifespan manager of its own."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.lifespan.append(self.resource.manage)
        app_config.on_shutdown.append(self.shutdown)
        return app_config

    def shutdown(self, app: Litestar) -> None:
        self.resource.recorder.add("late shutdown hook")
        app.emit("goodbye")  # still handled: the bus closes after the last hook


class RecordingStore(MemoryStore):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.recorder.add("store closed")


async def test_the_drain_comes_before_later_plugins_and_stores_close(recorder: Recorder) -> None:
    plugin = TidingsPlugin()
    shutdown_requested = asyncio.Event()
    late = Resource(recorder, "late")
    app, _ = lifespan_app(
        plugin,
        recorder,
        shutdown_requested,
        plugins=[plugin, LatePlugin(late)],
        stores={"cache": RecordingStore(recorder)},
    )
    async with Lifespan(app, on_shutdown_message=shutdown_requested.set):
        await recorder.wait_for(lambda items: "job started" in items)
    items = recorder.items
    finished = items.index(("job finished, db open:", True))
    assert finished < items.index("late closed")
    assert finished < items.index("store closed")
    assert finished < items.index("db closed")
    assert items[-4:] == ["shutdown hook", "late shutdown hook", "goodbye handled", "goodbye handled"]


async def test_the_drain_is_bounded(failures: list[HandlerError], recorder: Recorder) -> None:
    bus = EventBus(drain_timeout=0.2, on_failure=failures.append)
    db = Resource(recorder, "db")

    @listener("stuck")
    async def hangs() -> None:
        recorder.add("hanging")
        await asyncio.Event().wait()

    app = make_app(
        TidingsPlugin(bus),
        listeners=[hangs],
        lifespan=[db.manage],
        on_startup=[lambda app: app.emit("stuck")],
    )
    async with Lifespan(app):
        await recorder.wait_for(lambda items: "hanging" in items)
    assert recorder.items == ["db open", "hanging", "db closed"]
    assert [f.handler.rpartition(".")[2] for f in failures] == ["hangs"]
    assert bus.state is BusState.CLOSED


async def test_native_emit_in_lifespan_code_goes_to_the_apps_bus(recorder: Recorder) -> None:
    # Two apps run in one process: an unscoped tidings.emit() could not tell their buses apart.
    buses = [EventBus(name="a"), EventBus(name="b")]
    for bus in buses:

        @bus.on("started")
        async def started(event: Event, bus: EventBus = bus) -> None:
            recorder.add(bus.name)

    async def emit_started() -> None:
        tidings.emit("started")

    apps = [make_app(TidingsPlugin(bus), on_startup=[emit_started]) for bus in buses]
    async with Lifespan(apps[0]), Lifespan(apps[1]):
        assert sorted(await recorder.wait_count(2)) == ["a", "b"]


async def test_without_a_lifespan_the_bus_starts_at_the_first_request(recorder: Recorder) -> None:
    plugin = TidingsPlugin()

    @listener("hit")
    async def on_hit() -> None:
        recorder.add("hit")

    @get("/")
    async def index(request: Request[Any, Any, Any]) -> None:
        request.app.emit("hit")

    app = make_app(plugin, [index], [on_hit])
    await call(app, "GET", "/")
    assert await recorder.wait_count(1) == ["hit"]
    await plugin.bus.aclose()


# -- apps, configuration ----------------------------------------------------------------------------------


async def test_two_apps_do_not_share_buses(recorder: Recorder) -> None:
    def build(name: str) -> tuple[Litestar, TidingsPlugin]:
        @listener("hello")
        async def hello(who: str) -> None:
            recorder.add((name, who))

        @get("/")
        async def index(request: Request[Any, Any, Any]) -> None:
            request.app.emit("hello", name)

        plugin = TidingsPlugin()
        return make_app(plugin, [index], [hello]), plugin

    (first, first_plugin), (second, second_plugin) = build("first"), build("second")
    assert first_plugin.bus is not second_plugin.bus
    assert isinstance(first.event_emitter, TidingsEventEmitter)
    assert first.event_emitter.bus is first_plugin.bus
    async with Lifespan(first), Lifespan(second):
        await call(first, "GET", "/")
        await call(second, "GET", "/")
        items = await recorder.wait_count(2)
    assert sorted(items) == [("first", "first"), ("second", "second")]


def test_a_plugin_serves_one_app() -> None:
    plugin = TidingsPlugin()
    make_app(plugin)
    with pytest.raises(ConfigurationError, match="serves another Litestar app"):
        make_app(plugin)


def test_an_app_with_its_own_emitter_backend_is_refused() -> None:
    class MyEmitter(SimpleEventEmitter):
        pass

    with pytest.raises(ConfigurationError, match="event emitter backend already"):
        make_app(TidingsPlugin(), event_emitter_backend=MyEmitter)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="bus=EventBus"):
        TidingsPlugin("bus")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="request_errors"):
        TidingsPlugin(request_errors="ignore")  # type: ignore[arg-type]


# -- requests that fail -----------------------------------------------------------------------------------


def failing_app(plugin: TidingsPlugin, recorder: Recorder) -> Litestar:
    @listener("attempted")
    async def attempted(what: str) -> None:
        recorder.add(what)

    @get("/crash")
    async def crash(request: Request[Any, Any, Any]) -> None:
        request.app.emit("attempted", "crash")
        raise RuntimeError("boom")

    @get("/missing")
    async def missing(request: Request[Any, Any, Any]) -> None:
        request.app.emit("attempted", "missing")
        raise NotFoundException("no such thing")

    @get("/ok")
    async def ok(request: Request[Any, Any, Any]) -> None:
        request.app.emit("attempted", "ok")

    return make_app(plugin, [crash, missing, ok], [attempted])


async def test_by_default_a_failed_requests_events_are_delivered(recorder: Recorder) -> None:
    app = failing_app(TidingsPlugin(), recorder)
    async with Lifespan(app):
        assert (await call(app, "GET", "/crash"))[0] == 500
        assert await recorder.wait_count(1) == ["crash"]


async def test_without_the_plugin_a_hand_added_middleware_delivers_a_failed_requests_events(
    recorder: Recorder,
) -> None:
    # docs/litestar.md, "Requests that fail": Litestar answers the exception inside the app, and only
    # the plugin's after_exception hook tells the middleware; without it, drop cannot apply.
    from litestar.middleware import DefineMiddleware

    bus = EventBus(request_errors="drop")

    @bus.on("attempted")
    async def attempted(event: Event) -> None:
        recorder.add(event.payload)

    @get("/crash")
    async def crash() -> None:
        tidings.emit("attempted", "crash")
        raise RuntimeError("boom")

    # Litestar types ASGI apps with its own TypedDicts; TidingsMiddleware takes any mapping
    app = Litestar([crash], middleware=[DefineMiddleware(TidingsMiddleware, bus=bus)])  # type: ignore[arg-type]
    async with bus:
        assert (await call(app, "GET", "/crash"))[0] == 500
        assert await recorder.wait_count(1) == ["crash"]


async def test_request_errors_drop_drops_the_events_of_a_request_that_failed(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    app = failing_app(TidingsPlugin(request_errors="drop"), recorder)
    async with Lifespan(app):
        with caplog.at_level(logging.WARNING, logger="tidings"):
            assert (await call(app, "GET", "/crash"))[0] == 500
        assert (await call(app, "GET", "/missing"))[0] == 404  # a client error: the request did its job
        assert (await call(app, "GET", "/ok"))[0] == 200
        # each request's events were handled in its own task before its call returned
        assert await recorder.wait_count(2) == ["missing", "ok"]
    assert "'attempted'" in caplog.text
    assert "the app raised RuntimeError, which Litestar answered with a 500" in caplog.text


class OutOfStock(Exception):
    pass


class PaymentDown(Exception):
    pass


class Unanswerable(Exception):
    pass


def answer_out_of_stock(request: Request[Any, Any, Any], exc: OutOfStock) -> Response[Any]:
    return Response({"detail": "out of stock"}, status_code=409)


def raising_route(name: str, error: Exception | type[Exception]) -> Any:
    """``GET /<name>``: emits ``attempted`` with its name, then raises ``error``."""

    @get(f"/{name}", name=name)
    async def failing(request: Request[Any, Any, Any]) -> None:
        request.app.emit("attempted", name)
        raise error

    return failing


def answering_app(plugin: TidingsPlugin, recorder: Recorder) -> Litestar:
    """Routes whose exceptions exception handlers of the app answer: with a 409, a 503, or not at all."""

    @listener("attempted")
    async def attempted(what: str) -> None:
        recorder.add(what)

    def payment_down(request: Request[Any, Any, Any], exc: PaymentDown) -> Response[Any]:
        request.app.emit("attempted", "reported payment-down")
        return Response({"detail": "try later"}, status_code=503)

    def unanswerable(request: Request[Any, Any, Any], exc: Unanswerable) -> Response[Any]:
        raise RuntimeError("the exception handler failed")

    routes = [
        raising_route("out-of-stock", OutOfStock),
        raising_route("payment-down", PaymentDown),
        raising_route("broken", Unanswerable),
    ]
    handlers = {OutOfStock: answer_out_of_stock, PaymentDown: payment_down, Unanswerable: unanswerable}
    return make_app(plugin, routes, [attempted], exception_handlers=handlers)


@pytest.mark.parametrize("policy", ["drop", "deliver"])
async def test_the_response_an_exception_handler_makes_decides_under_drop(
    policy: RequestErrorPolicy, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # Under "drop" the plugin used to judge the exception alone, before the app's handler answered
    # it: OutOfStock, answered with a 409, lost its events.
    app = answering_app(TidingsPlugin(request_errors=policy), recorder)
    async with Lifespan(app):
        with caplog.at_level(logging.WARNING, logger="tidings"):
            assert (await call(app, "GET", "/out-of-stock"))[0] == 409
            assert (await call(app, "GET", "/payment-down"))[0] == 503
            assert (await call(app, "GET", "/broken"))[0] == 500  # answered by Litestar's own handler
    dropped = [r.getMessage() for r in caplog.records if "was dropped" in r.getMessage()]
    if policy == "deliver":
        assert recorder.items == ["out-of-stock", "payment-down", "reported payment-down", "broken"]
        assert dropped == []
        return
    # the handler's own event reports the failure: it is kept, the route's work is not
    assert recorder.items == ["out-of-stock", "reported payment-down"]
    assert dropped == [
        "event 'attempted' of a request was dropped because the app raised PaymentDown, which Litestar "
        "answered with a 503 (request_errors='drop')",
        # the answer itself failed, so the exception reached the middleware before any response
        "event 'attempted' of a request was dropped because the app raised RuntimeError before "
        "responding (request_errors='drop')",
    ]


async def test_what_the_app_s_after_exception_hooks_emit_is_kept_under_drop(recorder: Recorder) -> None:
    # The app's own after_exception hooks (Litestar's hook for reporting failures) ran before the
    # plugin's, which counted what they emitted as the failed request's work, and dropped it.

    @listener("error.reported")
    async def page_on_call(kind: str) -> None:
        recorder.add(kind)

    async def report(exc: Exception, scope: Any) -> None:
        app = scope.get("litestar_app") or scope["app"]  # (Litestar before 2.13: only "app")
        app.emit("error.reported", kind=type(exc).__name__)

    routes = [raising_route("crash", RuntimeError("boom"))]
    app = make_app(TidingsPlugin(request_errors="drop"), routes, [page_on_call], after_exception=[report])
    async with Lifespan(app):
        assert (await call(app, "GET", "/crash"))[0] == 500
        await recorder.wait_count(1)
    assert recorder.items == ["RuntimeError"]


def fastapi_shop(recorder: Recorder) -> tuple[Any, EventBus]:
    bus = EventBus(request_errors="drop")
    bus.on("attempted")(lambda event: recorder.add(event.payload))
    app = FastAPI()
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.exception_handler(OutOfStock)
    async def out_of_stock(request: StarletteRequest, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "out of stock"}, status_code=409)

    failures: dict[str, Exception] = {
        "crash": RuntimeError("boom"),
        "missing": HTTPException(404),
        "out-of-stock": OutOfStock(),
    }

    @app.get("/{name}")
    async def failing(name: str) -> None:
        tidings.emit("attempted", name)
        raise failures[name]

    return app, bus


def litestar_shop(recorder: Recorder) -> tuple[Any, EventBus]:
    bus = EventBus(request_errors="drop")
    bus.on("attempted")(lambda event: recorder.add(event.payload))
    routes = [
        raising_route("crash", RuntimeError("boom")),
        raising_route("missing", NotFoundException()),
        raising_route("out-of-stock", OutOfStock),
    ]
    return make_app(TidingsPlugin(bus), routes, exception_handlers={OutOfStock: answer_out_of_stock}), bus


@pytest.mark.parametrize("shop", [fastapi_shop, litestar_shop], ids=["fastapi", "litestar"])
async def test_fastapi_and_litestar_drop_the_same_failed_requests(
    shop: Callable[[Recorder], tuple[Any, EventBus]], recorder: Recorder
) -> None:
    app, bus = shop(recorder)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # Starlette re-raises its 500
    async with bus, httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        statuses = [(await http.get(f"/{name}")).status_code for name in ("crash", "missing", "out-of-stock")]
        await bus.drain()
    assert statuses == [500, 404, 409]
    # an unexpected error fails the request; a client error, or an error a handler of its class
    # answers below 500, is a response like any other
    assert recorder.items == ["missing", "out-of-stock"]


# -- stores, test clients ---------------------------------------------------------------------------------


async def test_with_a_durable_store(tmp_path: Path, recorder: Recorder) -> None:
    bus = EventBus(store=SQLiteStore(str(tmp_path / "events.db")))

    @listener("invoice_due")
    async def remind(invoice: str, *, amount: float) -> None:
        recorder.add((invoice, amount))

    @post("/invoices")
    async def create(request: Request[Any, Any, Any]) -> None:
        request.app.emit("invoice_due", "inv-1", amount=9.5)

    app = make_app(TidingsPlugin(bus), [create], [remind])
    async with Lifespan(app):
        assert (await call(app, "POST", "/invoices"))[0] == 201
        assert await recorder.wait_count(1) == [("inv-1", 9.5)]
        assert await bus.dead_letters.list() == []


@dataclass
class CreateUserDTO:
    first_name: str
    last_name: str
    email: str


def test_litestars_documented_example_with_its_test_client() -> None:
    sent: list[str] = []

    @listener("user_created")
    async def send_welcome_email_handler(email: str) -> None:
        sent.append(email)

    @post("/users")
    async def create_user_handler(
        data: Annotated[CreateUserDTO, Body()], request: Request[Any, Any, Any]
    ) -> None:
        request.app.emit("user_created", email=data.email)

    app = make_app(TidingsPlugin(), [create_user_handler], [send_welcome_email_handler])
    with TestClient(app) as client:
        user = {"first_name": "Ada", "last_name": "Lovelace", "email": "ada@example.com"}
        assert client.post("/users", json=user).status_code == 201
    assert sent == ["ada@example.com"]  # handled, and drained by the client's lifespan shutdown


async def test_with_litestars_async_test_client() -> None:
    sent: list[str] = []

    @listener("user_created")
    async def send_welcome_email_handler(email: str) -> None:
        sent.append(email)

    @post("/users")
    async def create_user_handler(request: Request[Any, Any, Any]) -> None:
        request.app.emit("user_created", email=(await request.json())["email"])

    app = make_app(TidingsPlugin(), [create_user_handler], [send_welcome_email_handler])
    async with AsyncTestClient(app) as client:
        assert (await client.post("/users", json={"email": "ada@example.com"})).status_code == 201
        assert sent == ["ada@example.com"]  # inline: handled before the client call returned


def test_a_websockets_events_are_handled_while_it_is_open() -> None:
    # A connection can last for hours: its events are not held until it closes.
    handled = threading.Event()

    @listener("ws.hello")
    async def hello(who: str) -> None:
        handled.set()

    @websocket("/ws")
    async def chat(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        socket.app.emit("ws.hello", "ada")
        await socket.send_text("emitted")
        await socket.send_text(f"handled: {await socket.receive_text()}")
        await socket.close()

    app = make_app(TidingsPlugin(), [chat], [hello])
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "emitted"
        assert handled.wait(5)  # while the handler waits for this client's next message
        ws.send_text("yes")
        assert ws.receive_text() == "handled: yes"


async def test_an_app_can_run_its_lifespan_again(recorder: Recorder) -> None:
    plugin = TidingsPlugin()

    @listener("started")
    async def started(run: int) -> None:
        recorder.add(run)

    runs = iter(range(1, 3))
    app = make_app(plugin, listeners=[started], on_startup=[lambda app: app.emit("started", next(runs))])
    for run in (1, 2):
        async with Lifespan(app):
            await recorder.wait_count(run)
        assert plugin.bus.state is BusState.CLOSED
    assert recorder.items == [1, 2]


# -- docs/litestar.md -------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "litestar.md"
BLOCK = re.compile(r"(<!-- fragment -->\n)?```python\n(.*?)```", re.DOTALL)


def doc_examples() -> list[tuple[int, str]]:
    text = DOC.read_text()
    return [
        (text.count("\n", 0, match.start(2)) + 1, match.group(2))
        for match in BLOCK.finditer(text)
        if not match.group(1)  # fragments are parts of programs, not programs
    ]


def run_script(source: str, cwd: Path) -> str:
    # A process of its own: Litestar's default logging config rewires the root logger of its process.
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", source], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def run_example(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``run_script`` in a directory of its own, once per example for the module's tests: each run is
    a process that imports Litestar (a second or two), and two tests read the setup example's."""
    outputs: dict[str, str] = {}

    def run(source: str) -> str:
        if source not in outputs:
            outputs[source] = run_script(source, tmp_path_factory.mktemp("doc-example"))
        return outputs[source]

    return run


def test_the_doc_has_examples() -> None:
    assert len(doc_examples()) >= 2


@pytest.mark.parametrize(("line", "source"), doc_examples(), ids=[f"line {n}" for n, _ in doc_examples()])
def test_every_doc_example_runs(line: int, source: str, run_example: Callable[[str], str]) -> None:
    run_example(source)


def test_the_docs_setup_example_prints_what_it_says(run_example: Callable[[str], str]) -> None:
    source = next(source for _, source in doc_examples() if "send_welcome_mail" in source)
    assert run_example(source).splitlines() == [
        "inserted ada@example.com",
        "welcome mail sent to ada@example.com",
        "201",
    ]


async def test_listener_ids_match_exactly_as_in_litestar(recorder: Recorder) -> None:
    # tidings reads "*", "?" and "[" as wildcards; Litestar's ids are plain names
    @listener("order[1]")
    async def first_order() -> None:
        recorder.add("order[1]")

    @listener("what?", "report.*")
    async def odd_names() -> None:
        recorder.add("odd")

    @post("/emit")
    async def emit_them(request: Request[Any, Any, Any]) -> None:
        for name in ("order1", "whatX", "report.daily", "order[1]", "what?", "report.*"):
            request.app.emit(name)

    app = make_app(TidingsPlugin(), [emit_them], [first_order, odd_names])
    async with Lifespan(app):
        status, _ = await call(app, "POST", "/emit")
        assert status == 201
        await recorder.wait_count(3)
    assert recorder.items == ["order[1]", "odd", "odd"]  # the first three names match no listener
