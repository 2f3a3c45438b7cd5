"""The emitter endpoints get with Depends: after-response delivery, the right bus, no thread hop."""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import anyio.to_thread
import httpx
import pytest
from fastapi import Depends, FastAPI, WebSocket
from pydantic import BaseModel
from starlette.testclient import TestClient

from tests.asgi_calls import http_scope, request_body
from tidings import Arguments, ConfigurationError, Event, EventBus, HandlerError, TidingsMiddleware
from tidings.integrations.fastapi import Emitter, EventEmitter, current_emitter, emitter_for
from tidings.types import Message

from ..conftest import Recorder

pytestmark = pytest.mark.anyio


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def call_asgi(app: FastAPI, path: str, log: list[str]) -> None:
    """POST ``path`` to the app directly, recording each message it sends."""
    scope = http_scope(path, "POST")
    receive = request_body()

    async def send(message: Message) -> None:
        log.append(message["type"])

    await app(scope, receive, send)


def app_for(bus: EventBus) -> FastAPI:
    app = FastAPI()
    app.add_middleware(TidingsMiddleware, bus=bus)
    return app


async def test_events_are_handled_after_the_response(bus: EventBus) -> None:
    log: list[str] = []

    @bus.on("user.*")
    async def handler(event: Event) -> None:
        log.append(f"handled {event.name}")

    app = app_for(bus)

    @app.post("/users")
    async def create_user(emitter: Emitter) -> dict[str, int]:
        emitter.emit("user.created", {"id": 1})
        log.append("endpoint")
        emitter.emit("user.welcomed", {"id": 1})
        return {"id": 1}

    async with bus:
        await call_asgi(app, "/users", log)
    assert log == [
        "endpoint",
        "http.response.start",
        "http.response.body",
        "handled user.created",
        "handled user.welcomed",
    ]


async def test_every_way_to_ask_for_it(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("ping")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    app = app_for(bus)

    @app.post("/alias")
    async def alias(emitter: Emitter) -> None:
        emitter.emit("ping", "alias")

    @app.post("/annotated")
    async def annotated(emitter: Annotated[EventEmitter, Depends(current_emitter)]) -> None:
        emitter.emit("ping", "annotated")

    @app.post("/default")
    async def default(emitter: EventEmitter = Depends(current_emitter)) -> None:  # noqa: B008
        emitter.emit("ping", "default")

    @app.post("/for-bus")
    async def for_bus(emitter: Annotated[EventEmitter, Depends(emitter_for(bus))]) -> None:
        emitter.emit("ping", "for-bus")

    async def service(emitter: Emitter) -> Callable[[str], None]:  # in a dependency of the endpoint
        return lambda text: emitter.emit("ping", text)

    @app.post("/in-dependency")
    async def in_dependency(notify: Annotated[Callable[[str], None], Depends(service)]) -> None:
        notify("in-dependency")

    async with bus, client(app) as http:
        for path in ("/alias", "/annotated", "/default", "/for-bus", "/in-dependency"):
            assert (await http.post(path)).status_code == 200
        items = await recorder.wait_count(5)
    assert items == ["alias", "annotated", "default", "for-bus", "in-dependency"]


async def test_typed_events_and_several_arguments(bus: EventBus, recorder: Recorder) -> None:
    @dataclass
    class OrderPlaced:
        __event_name__ = "order.placed"
        order_id: str
        total: float

    class UserCreated(BaseModel):
        id: int

    @bus.on(OrderPlaced)
    async def placed(order: OrderPlaced) -> None:
        recorder.add(("placed", order.order_id, order.total))

    @bus.on(UserCreated)
    async def created(user: UserCreated) -> None:
        recorder.add(("created", user.id))

    @bus.on("payment.processed")
    async def paid(payment_id: str, status: str, amount: float) -> None:
        recorder.add(("paid", payment_id, status, amount))

    @bus.on("payment.refunded")
    async def refunded(event: Event) -> None:
        recorder.add(("refunded", event.payload))

    app = app_for(bus)

    @app.post("/checkout")
    async def checkout(emitter: Emitter) -> None:
        emitter.emit(OrderPlaced("o-1", 9.99))
        emitter.emit(UserCreated(id=3))
        emitter.emit("payment.processed", "p-1", "success", amount=9.99)
        emitter.emit("payment.refunded")

    async with bus, client(app) as http:
        assert (await http.post("/checkout")).status_code == 200
        items = await recorder.wait_count(4)
    assert items == [
        ("placed", "o-1", 9.99),
        ("created", 3),
        ("paid", "p-1", "success", 9.99),
        ("refunded", None),
    ]


async def test_sync_endpoints_buffer_too(bus: EventBus) -> None:
    log: list[str] = []

    @bus.on("report.made")
    async def handler(event: Event) -> None:
        log.append(f"handled on thread {event.payload == threading.get_ident()}")

    app = app_for(bus)

    @app.post("/report")
    def report(emitter: Emitter) -> None:  # FastAPI's thread pool
        log.append("endpoint")
        emitter.emit("report.made", threading.get_ident())

    async with bus:
        await call_asgi(app, "/report", log)
    assert log == ["endpoint", "http.response.start", "http.response.body", "handled on thread False"]


async def test_no_thread_hop(bus: EventBus, monkeypatch: pytest.MonkeyPatch) -> None:
    # FastAPI runs sync dependencies (classes included) with anyio.to_thread.run_sync: count the hops.
    hops: list[Any] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(func)
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    app = app_for(bus)

    @app.post("/emitter")
    async def with_emitter(a: Emitter, b: Annotated[EventEmitter, Depends(emitter_for(bus))]) -> None:
        a.emit("x")
        b.emit("x")

    def sync_dependency() -> int:
        return 1

    @app.post("/control")
    async def control(n: Annotated[int, Depends(sync_dependency)]) -> None: ...

    async with bus, client(app) as http:
        assert (await http.post("/emitter")).status_code == 200
        assert hops == []
        assert (await http.post("/control")).status_code == 200  # proves the probe sees hops
        assert len(hops) == 1


async def test_the_emitter_is_bound_to_the_bus_serving_the_request(recorder: Recorder) -> None:
    shop_bus = EventBus(name="shop")
    audit_bus = EventBus(name="audit")

    @shop_bus.on("*")
    async def shop(event: Event) -> None:
        recorder.add(("shop", event.name))

    @audit_bus.on("*")
    async def audit(event: Event) -> None:
        recorder.add(("audit", event.name))

    shop_app, audit_app = app_for(shop_bus), app_for(audit_bus)
    emitters: list[EventEmitter] = []

    @shop_app.post("/")
    async def buy(emitter: Emitter, audit: Annotated[EventEmitter, Depends(emitter_for(audit_bus))]) -> None:
        emitters.append(emitter)
        emitter.emit("order.placed")
        audit.emit("order.audited")  # another bus: handed to it at once, not held for this response

    @audit_app.post("/")
    async def check(emitter: Emitter) -> None:
        emitters.append(emitter)
        emitter.emit("check.done")

    async with shop_bus, audit_bus:
        async with client(shop_app) as shop_http, client(audit_app) as audit_http:
            assert (await shop_http.post("/")).status_code == 200
            assert (await audit_http.post("/")).status_code == 200
        items = await recorder.wait_count(3)
    assert [e.bus for e in emitters] == [shop_bus, audit_bus]
    assert sorted(items) == [("audit", "check.done"), ("audit", "order.audited"), ("shop", "order.placed")]
    assert repr(emitters[0]) == "EventEmitter(bus='shop')"


def test_an_emitter_for_a_bus_nobody_started_says_so_once(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # emitter_for's docstring example once left its bus unstarted: events waited forever, unlogged.
    audit_bus = EventBus(name="audit")

    @audit_bus.on("user.logged_in")
    async def audit(event: Event) -> None:
        recorder.add(event.payload)

    app = app_for(EventBus())

    @app.post("/login")
    async def login(audit: Annotated[EventEmitter, Depends(emitter_for(audit_bus))]) -> None:
        audit.emit("user.logged_in", {"id": 1})

    with caplog.at_level(logging.WARNING, logger="tidings"), TestClient(app) as http:
        for _ in range(3):
            assert http.post("/login").status_code == 200
    told = [r.getMessage() for r in caplog.records if r.name == "tidings"]
    assert len(told) == 1, told
    assert "event 'user.logged_in' was emitted on bus 'audit', which has not been started" in told[0]
    assert recorder.items == []  # they wait for a start, as documented


async def test_without_the_middleware_the_endpoint_fails_loudly() -> None:
    app = FastAPI()  # no TidingsMiddleware

    @app.post("/")
    async def endpoint(emitter: Emitter) -> None: ...  # pragma: no cover - never reached

    async with client(app) as http:
        with pytest.raises(ConfigurationError, match="add TidingsMiddleware"):
            await http.post("/")


async def test_handlers_can_ask_for_an_emitter(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError]
) -> None:
    @bus.on("user.created")
    async def welcome(user_id: int, emitter: Emitter) -> None:
        emitter.emit("mail.sent", user_id=user_id)

    @bus.on("mail.sent")
    async def sent(user_id: int) -> None:
        recorder.add(user_id)

    app = app_for(bus)

    @app.post("/")
    async def endpoint(emitter: Emitter) -> None:
        emitter.emit("user.created", {"user_id": 5})

    async with bus, client(app) as http:
        assert (await http.post("/")).status_code == 200
        assert await recorder.wait_count(1) == [5]
    assert not failures


# Starlette < 0.37's TestClient uses httpx's deprecated app= shortcut (the oldest FastAPI tested)
@pytest.mark.filterwarnings("ignore:The 'app' shortcut is now deprecated:DeprecationWarning")
def test_websocket_endpoints_emit_at_once(recorder: Recorder) -> None:
    bus = EventBus(name="ws")

    @bus.on("chat.message")
    async def handler(text: str) -> None:
        recorder.add(text)

    app = app_for(bus)

    @app.websocket("/chat")
    async def chat(websocket: WebSocket, emitter: Emitter) -> None:
        await websocket.accept()
        emitter.emit("chat.message", {"text": await websocket.receive_text()})
        await websocket.send_text("sent")
        await websocket.close()

    with TestClient(app) as http, http.websocket_connect("/chat") as ws:  # the lifespan drains the bus
        ws.send_text("hello")
        assert ws.receive_text() == "sent"
    assert recorder.items == ["hello"]


def test_emitter_outside_requests_goes_to_its_bus() -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.tap(seen.append)
    emitter = EventEmitter(bus)
    emitter.emit("a")
    emitter.emit("b", 1)
    emitter.emit("c", 1, 2)
    emitter.emit("d", event="kw")  # a keyword may be named like the first parameter
    assert [(e.name, e.payload) for e in seen] == [
        ("a", None),
        ("b", 1),
        ("c", Arguments((1, 2))),
        ("d", Arguments((), {"event": "kw"})),
    ]
