"""``EventHandlerASGIMiddleware``: when handlers run, isolation, threads, lifespan, handler objects."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

import tidings
from tidings import EventBus, HandlerError, RetryPolicy, TidingsMiddleware
from tidings.compat.fastapi_events.dispatcher import dispatch
from tidings.compat.fastapi_events.handlers.base import BaseEventHandler
from tidings.compat.fastapi_events.handlers.echo import EchoHandler
from tidings.compat.fastapi_events.handlers.local import LocalHandler
from tidings.compat.fastapi_events.handlers.null import NullHandler
from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware
from tidings.compat.fastapi_events.typing import Event

from ..conftest import Recorder
from .conftest import call_asgi, client, lifespan, starlette_app

pytestmark = pytest.mark.anyio


def dispatching(*events: tuple[str, Any]) -> Route:
    """A ``GET /`` route that dispatches ``events``."""

    async def endpoint(request: Request) -> Response:
        for name, payload in events:
            dispatch(name, payload)
        return PlainTextResponse("ok")

    return Route("/", endpoint)


async def test_the_readme_fastapi_setup() -> None:
    handler = LocalHandler()
    seen: list[Event] = []

    @handler.register(event_name="my-fancy-event")
    async def record(event: Event) -> None:
        seen.append(event)

    app = FastAPI()
    app.add_middleware(EventHandlerASGIMiddleware, handlers=[handler])

    @app.get("/")
    def index(request: Request) -> dict[str, str]:
        dispatch("my-fancy-event", payload={"id": 1})
        return {}

    async with lifespan(app), client(app) as http:
        assert (await http.get("/")).status_code == 200
    assert seen == [("my-fancy-event", {"id": 1})]


async def test_the_readme_starlette_setup_runs_handlers_after_the_response() -> None:
    handler = LocalHandler()
    log: list[Any] = []

    @handler.register(event_name="new event")
    async def record(event: Event) -> None:
        log.append(event)

    app = starlette_app([handler], [dispatching(("new event", {"id": 1}))])
    async with lifespan(app):
        await call_asgi(app, "/", log)
    assert log == ["start", "body", ("new event", {"id": 1})]


async def test_a_failing_handler_skips_no_other_and_never_escapes_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = LocalHandler()
    failures: list[HandlerError] = []
    ran: list[str] = []

    @handler.register(event_name="*")
    async def first(event: Event) -> None:
        ran.append("first")
        raise RuntimeError("boom")

    @handler.register(event_name="*")
    async def second(event: Event) -> None:
        ran.append("second")

    class Batch(BaseEventHandler):
        async def handle(self, event: Event) -> None:
            raise AssertionError("handle_many is used")

        async def handle_many(self, events: Iterable[Event]) -> None:
            ran.append("batch")
            raise ValueError("batch failed")

    bus = EventBus(on_failure=failures.append)
    app = starlette_app([handler, Batch()], [dispatching(("a", 1), ("b", 2))], bus=bus)
    with caplog.at_level(logging.ERROR, logger="tidings"):
        async with lifespan(app):
            sent = await call_asgi(app)  # fastapi-events: RuntimeError raised here, "second" never run
    assert sent == ["start", "body"]
    assert ran == ["first", "second", "first", "second", "batch"]
    assert sorted((f.handler.rsplit(".", 1)[-1], f.event.name) for f in failures) == [
        ("Batch", "a"),
        ("first", "a"),
        ("first", "b"),
    ]
    assert "boom" in caplog.text and "batch failed" in caplog.text


async def test_plain_def_handlers_run_off_the_event_loop(recorder: Recorder) -> None:
    handler = LocalHandler()
    loop_thread = threading.get_ident()

    @handler.register(event_name="blocking")
    def blocking(event: Event) -> None:
        recorder.add(threading.get_ident())

    app = starlette_app([handler], [dispatching(("blocking", None))])
    async with lifespan(app):
        await call_asgi(app)
    [thread] = await recorder.wait_count(1)
    assert thread != loop_thread


async def test_a_handler_object_with_handle_many_gets_a_requests_events_at_once() -> None:
    batches: list[Any] = []

    class Forwarder(BaseEventHandler):
        async def handle(self, event: Event) -> None:
            batches.append(("one", event))

        async def handle_many(self, events: Iterable[Event]) -> None:
            batches.append(events)

    app = starlette_app([Forwarder()], [dispatching(("a", 1), ("b", 2), ("c", 3))])
    async with lifespan(app):
        await call_asgi(app)
    [batch] = batches
    assert isinstance(batch, deque)  # what fastapi-events passes
    assert list(batch) == [("a", 1), ("b", 2), ("c", 3)]


async def test_a_handler_object_with_handle_only_gets_events_one_by_one_each_isolated() -> None:
    failures: list[HandlerError] = []
    handled: list[Event] = []

    class Picky(BaseEventHandler):
        async def handle(self, event: Event) -> None:
            if event[1] == 2:
                raise ValueError("not two")
            handled.append(event)

    bus = EventBus(on_failure=failures.append)
    app = starlette_app([Picky()], [dispatching(("n", 1), ("n", 2), ("n", 3))], bus=bus)
    async with lifespan(app):
        await call_asgi(app)
    assert handled == [("n", 1), ("n", 3)]
    assert [f.event.payload for f in failures] == [2]


async def test_the_default_handle_many_runs_every_event_and_raises_the_first_error() -> None:
    handled: list[Any] = []

    class Picky(BaseEventHandler):
        async def handle(self, event: Event) -> None:
            if event[1] % 2 == 0:
                raise ValueError(f"even {event[1]}")
            handled.append(event[1])

    with pytest.raises(ValueError, match="even 2"):
        await Picky().handle_many([("n", 1), ("n", 2), ("n", 3), ("n", 4)])
    assert handled == [1, 3]


async def test_echo_handler_prints_each_event(capsys: pytest.CaptureFixture[str]) -> None:
    app = starlette_app([EchoHandler()], [dispatching(("cat-spotted", {"id": 1}))])
    async with lifespan(app):
        await call_asgi(app)
    assert capsys.readouterr().out == "('cat-spotted', {'id': 1})\n"


async def test_null_handler_is_not_even_registered() -> None:
    bus = EventBus()
    starlette_app([NullHandler()], [], bus=bus).build_middleware_stack()
    assert len(bus.registry) == 0
    await NullHandler().handle(("x", 1))
    await NullHandler().handle_many([("x", 1)])


def test_a_handler_that_is_no_handler_fails_at_construction() -> None:
    with pytest.raises(TypeError, match="not an event handler"):
        EventHandlerASGIMiddleware(PlainTextResponse("ok"), handlers=[print])


async def test_a_handler_object_of_fastapi_events_itself_works_too() -> None:
    """Duck typing: a forwarder of fastapi-events (SQS, Pub/Sub) plugs into this middleware."""
    their_base: Any = pytest.importorskip("fastapi_events.handlers.base").BaseEventHandler
    batches: list[list[Event]] = []

    class TheirForwarder(their_base):  # type: ignore[misc]  # fastapi-events is untyped
        async def handle(self, event: Event) -> None:
            batches.append([event])

        async def handle_many(self, events: Iterable[Event]) -> None:
            batches.append(list(events))

    app = starlette_app([TheirForwarder()], [dispatching(("a", 1), ("b", 2))])
    async with lifespan(app):
        await call_asgi(app)
    assert batches == [[("a", 1), ("b", 2)]]


async def serve_handler_objects(library: str, handlers: list[Any], *events: tuple[str, Any]) -> None:
    """One request dispatching ``events`` to ``handlers`` through ``library``'s middleware."""
    if library == "tidings":
        app = starlette_app(handlers, [dispatching(*events)])
        async with lifespan(app):
            await call_asgi(app)
        return
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    their_dispatch: Any = pytest.importorskip("fastapi_events.dispatcher").dispatch
    their_middleware: Any = pytest.importorskip("fastapi_events.middleware").EventHandlerASGIMiddleware

    async def endpoint(request: Request) -> Response:
        for name, payload in events:
            their_dispatch(name, payload)
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(their_middleware, handlers=handlers)]
    )
    await call_asgi(app)


def handler_base(library: str) -> Any:
    if library == "tidings":
        return BaseEventHandler
    return pytest.importorskip("fastapi_events.handlers.base").BaseEventHandler


@pytest.mark.parametrize("library", ["tidings", "fastapi-events"])
async def test_an_awaitable_a_plain_def_handle_returns_is_awaited_on_the_loop(
    library: str, recorder: Recorder
) -> None:
    base = handler_base(library)
    loop_thread = threading.get_ident()

    class Forwarder(base):  # type: ignore[misc,valid-type]  # fastapi-events is untyped
        def handle(self, event: Event) -> Any:  # plain def, handing back its client's coroutine
            return self.send(event)

        async def send(self, event: Event) -> None:
            recorder.add(("handle", event, threading.get_ident() == loop_thread))

    class Batcher(base):  # type: ignore[misc,valid-type]
        async def handle(self, event: Event) -> None:
            raise AssertionError("handle_many is used")

        def handle_many(self, events: Iterable[Event]) -> Any:
            return self.send_all(list(events))

        async def send_all(self, events: list[Event]) -> None:
            recorder.add(("handle_many", events, threading.get_ident() == loop_thread))

    class Publish:
        async def __call__(self, event: Event) -> None:
            recorder.add(("__call__", event, threading.get_ident() == loop_thread))

    class Publisher(base):  # type: ignore[misc,valid-type]
        handle = Publish()  # an object whose __call__ returns a coroutine

    await serve_handler_objects(library, [Forwarder(), Batcher(), Publisher()], ("a", 1), ("b", 2))
    seen = await recorder.wait_count(5)
    assert sorted(seen, key=repr) == sorted(
        [
            ("handle", ("a", 1), True),
            ("handle", ("b", 2), True),
            ("handle_many", [("a", 1), ("b", 2)], True),
            ("__call__", ("a", 1), True),
            ("__call__", ("b", 2), True),
        ],
        key=repr,
    )


async def test_an_awaitable_a_plain_def_handle_returns_fails_as_its_call() -> None:
    failures: list[HandlerError] = []

    class Forwarder(BaseEventHandler):
        def handle(self, event: Event) -> Any:  # returns the coroutine, which is awaited
            return self.send(event)

        async def send(self, event: Event) -> None:
            raise ConnectionError(f"cannot send {event[0]}")

    bus = EventBus(on_failure=failures.append)
    app = starlette_app([Forwarder()], [dispatching(("a", 1))], bus=bus)
    async with lifespan(app):
        await call_asgi(app)
    [failure] = failures
    assert failure.event.name == "a"
    assert isinstance(failure.__cause__, ConnectionError)


async def test_functions_registered_after_the_middleware_was_built_run_too() -> None:
    handler = LocalHandler()
    seen: list[str] = []
    app = starlette_app([handler], [dispatching(("late", None))])
    async with lifespan(app):
        await call_asgi(app)  # the middleware exists now

        @handler.register(event_name="late")  # a handler module imported late
        async def late(event: Event) -> None:
            seen.append("late")

        await call_asgi(app)
    assert seen == ["late"]


async def test_handlers_run_in_registration_order_by_pattern() -> None:
    handler = LocalHandler()
    order: list[str] = []

    def register(name: str, pattern: str) -> None:
        async def run(event: Event) -> None:
            order.append(f"{name}:{event[0]}")

        run.__qualname__ = name
        handler.register(run, event_name=pattern)

    register("all", "*")
    register("cats", "cat*")
    register("one_char", "cat?")
    register("exact", "cat_is_cute")
    register("all_again", "*")
    app = starlette_app([handler], [dispatching(("cat_is_cute", None), ("cats", None), ("dog", None))])
    async with lifespan(app):
        await call_asgi(app)
    assert order == [
        "all:cat_is_cute",
        "cats:cat_is_cute",
        "exact:cat_is_cute",
        "all_again:cat_is_cute",
        "all:cats",
        "cats:cats",
        "one_char:cats",
        "all_again:cats",
        "all:dog",
        "all_again:dog",
    ]


def test_websocket_events_are_handled_as_they_come(recorder: Recorder) -> None:
    handler = LocalHandler()

    @handler.register(event_name="ws.*")
    async def record(event: Event) -> None:
        recorder.add(event[0])

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        dispatch("ws.connected")
        await recorder.wait_count(1)  # handled while the connection is still open
        await websocket.send_text("seen")
        await websocket.close()

    app = starlette_app([handler], [WebSocketRoute("/ws", chat)])
    with TestClient(app) as test_client, test_client.websocket_connect("/ws") as websocket:
        assert websocket.receive_text() == "seen"
    assert recorder.items == ["ws.connected"]


async def test_startup_code_and_request_tasks_dispatch_and_shutdown_drains_them(recorder: Recorder) -> None:
    handler = LocalHandler()
    release = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    @handler.register(event_name="*")
    async def record(event: Event) -> None:
        recorder.add(event[0])

    @asynccontextmanager
    async def startup(app: Starlette) -> AsyncIterator[None]:
        dispatch("app.started")  # fastapi-events: LookupError
        yield
        recorder.add("shutdown code")

    async def later() -> None:
        await release.wait()
        dispatch("task.finished")  # after the response: fastapi-events loses it

    async def endpoint(request: Request) -> Response:
        tasks.append(asyncio.create_task(later()))
        return PlainTextResponse("ok")

    app = starlette_app([handler], [Route("/", endpoint)], lifespan=startup)
    async with lifespan(app):
        await recorder.wait_count(1)
        await call_asgi(app)
        release.set()
        await tasks[0]
    # the middleware drains the bus before the app's shutdown code runs
    assert recorder.items == ["app.started", "task.finished", "shutdown code"]


async def test_a_bus_of_ones_own_brings_retries() -> None:
    handler = LocalHandler()
    attempts: list[int] = []

    @handler.register(event_name="flaky")
    async def flaky(event: Event) -> None:
        attempts.append(len(attempts) + 1)
        if len(attempts) < 3:
            raise ConnectionError("try again")

    bus = EventBus(retry=RetryPolicy(max_attempts=3, backoff=0.001, jitter=0))
    app = starlette_app([handler], [dispatching(("flaky", None))], bus=bus)
    async with lifespan(app):
        await call_asgi(app)
        await bus.drain()
    assert attempts == [1, 2, 3]
    assert await bus.dead_letters.list() == []


async def test_without_a_lifespan_the_bus_starts_with_the_first_request() -> None:
    handler = LocalHandler()
    seen: list[Event] = []

    @handler.register
    async def record(event: Event) -> None:
        seen.append(event)

    bus = EventBus()
    app = starlette_app([handler], [dispatching(("lazy", 1))], bus=bus)
    try:
        await call_asgi(app)
    finally:
        await bus.aclose()
    assert seen == [("lazy", 1)]


def test_the_middleware_is_a_tidings_bus_and_middleware_underneath() -> None:
    bus = EventBus()
    middleware = EventHandlerASGIMiddleware(PlainTextResponse("ok"), handlers=[LocalHandler()], bus=bus)
    assert middleware.bus is bus
    assert isinstance(middleware._tidings, TidingsMiddleware)
    default = EventHandlerASGIMiddleware(PlainTextResponse("ok"), handlers=[], middleware_id=5)
    assert default.bus.handler_timeout is None  # fastapi-events has no handler timeout
    assert default.bus.name == "fastapi-events[5]"


async def test_events_of_a_request_that_raised_are_handled_before_the_error_goes_on(
    recorder: Recorder,
) -> None:
    """As in fastapi-events, which handled them in its middleware's ``finally``: a test that checks
    what a failed request's handlers did finds it done (the native middleware hands them to a bus
    task, after the error response, so that they never delay it)."""
    handler = LocalHandler()

    @handler.register(event_name="*")
    async def record(event: Event) -> None:
        await asyncio.sleep(0)  # an async write, say: it used to be still to come
        recorder.add(event)

    async def endpoint(request: Request) -> Response:
        dispatch("before.the.error", 1)
        raise RuntimeError("endpoint failed")

    app = starlette_app([handler], [Route("/", endpoint)])
    async with lifespan(app):
        with pytest.raises(RuntimeError, match="endpoint failed"):
            await call_asgi(app)
        assert recorder.items == [("before.the.error", 1)]  # no wait: handled already
    assert recorder.items == [("before.the.error", 1)]


async def test_a_failed_request_s_events_follow_the_bus_s_own_choices(recorder: Recorder) -> None:
    """request_errors="drop" drops them; request_handlers="task" hands them to a bus task."""
    handler = LocalHandler()

    @handler.register(event_name="*")
    async def record(event: Event) -> None:
        recorder.add(event)

    async def endpoint(request: Request) -> Response:
        dispatch("before.the.error", 1)
        raise RuntimeError("endpoint failed")

    dropping = starlette_app([handler], [Route("/", endpoint)], bus=EventBus(request_errors="drop"))
    async with lifespan(dropping):
        with pytest.raises(RuntimeError, match="endpoint failed"):
            await call_asgi(dropping)
    assert recorder.items == []
    in_a_task = starlette_app([handler], [Route("/", endpoint)], bus=EventBus(request_handlers="task"))
    async with lifespan(in_a_task):
        with pytest.raises(RuntimeError, match="endpoint failed"):
            await call_asgi(in_a_task)
        await recorder.wait_count(1)
    assert recorder.items == [("before.the.error", 1)]


async def test_tidings_handlers_and_emit_work_beside_the_fastapi_events_api() -> None:
    """Moving on gradually: native handlers on the middleware's bus, native emit() in its requests."""
    from tidings import emit

    handler = LocalHandler()
    seen: list[Any] = []

    @handler.register(event_name="*")
    async def old_style(event: Event) -> None:
        seen.append(("old", event))

    bus = EventBus()

    @bus.on("user.*")
    async def new_style(event: tidings.Event) -> None:
        seen.append(("new", event.name, event.payload))

    async def endpoint(request: Request) -> Response:
        dispatch("user.created", {"id": 1})
        emit("user.activated", {"id": 1})
        return PlainTextResponse("ok")

    app = starlette_app([handler], [Route("/", endpoint)], bus=bus)
    async with lifespan(app):
        await call_asgi(app)
    assert seen == [
        ("new", "user.created", {"id": 1}),
        ("old", ("user.created", {"id": 1})),
        ("new", "user.activated", {"id": 1}),
        ("old", ("user.activated", {"id": 1})),
    ]


async def test_a_local_handler_subclass_that_overrides_handle_is_called_as_fastapi_events_calls_it() -> None:
    log: list[str] = []

    class MeteredLocalHandler(LocalHandler):
        async def handle(self, event: Event) -> None:
            log.append(f"metrics: {event[0]}")
            await super().handle(event)

    metered = MeteredLocalHandler()

    @metered.register(event_name="user.*")
    async def on_user(event: Event) -> None:
        log.append(f"function: {event[0]}")

    app = starlette_app([metered], [dispatching(("user.created", 1))])
    async with lifespan(app):
        await call_asgi(app)
    assert log == ["metrics: user.created", "function: user.created"]


async def test_handler_objects_appended_to_the_list_later_run_from_the_next_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[str, Event]] = []

    class Audit(BaseEventHandler):
        def __init__(self, name: str) -> None:
            self.name = name

        async def handle(self, event: Event) -> None:
            seen.append((self.name, event))

    first, late = Audit("first"), Audit("late")
    handlers: list[object] = [first]
    app = starlette_app(handlers, [dispatching(("x", 1))])
    async with lifespan(app):
        await call_asgi(app)
        handlers.append(late)  # fastapi-events reads the list at each request
        await call_asgi(app)
        handlers.remove(first)  # tidings cannot unregister it: it keeps running, with a warning
        await call_asgi(app)
        assert "they keep running" in caplog.text
        caplog.clear()
        handlers[0] = Audit("swapped")  # the same length: it used to go unseen, and never ran
        await call_asgi(app)
    by_request = ["first"], ["first", "late"], ["first", "late"], ["first", "late", "swapped"]
    assert [name for name, _ in seen] == [name for names in by_request for name in names]
    assert "they keep running" in caplog.text
