"""Regressions for what the review of typed events, binding, emit_now and the integrations found."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Optional, Protocol, TypedDict

import pydantic
import pytest
from fastapi import Depends
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from tidings import (
    Event,
    EventBus,
    EventValidationError,
    HandlerError,
    Limits,
    TidingsMiddleware,
    emit,
)
from tidings._core.dispatcher import reset_scope, set_scope

from ..conftest import Recorder

pytestmark = pytest.mark.anyio


class UserCreated(pydantic.BaseModel):
    __event_name__: ClassVar[str] = "user.created"

    id: int
    email: str
    meta: dict[str, str] = {}


async def test_registering_by_class_validates_on_the_fast_path(bus: EventBus) -> None:
    @bus.on(UserCreated)
    async def handler(user: UserCreated) -> None: ...

    async with bus:
        job = bus.open_request()  # what the middleware does for a request, on the loop's thread
        token = set_scope(job)
        try:
            with pytest.raises(EventValidationError, match="'email'"):
                emit("user.created", {"id": 1})
            emit("user.created", {"id": "2", "email": "b@example.com"})
        finally:
            reset_scope(token)
        assert job.buffer is not None
        assert [type(record[1]) for record in job.buffer] == [UserCreated]
        job.buffer = None


async def test_handlers_with_star_args_still_get_the_envelope(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("x")
    async def with_kwargs(event, **kwargs):  # type: ignore[no-untyped-def]
        recorder.add(type(event).__name__)

    @bus.on("x")
    def with_both(event, *args, **kwargs):  # type: ignore[no-untyped-def]
        recorder.add(type(event).__name__)

    async with bus:
        assert await bus.emit_now("x", {"a": 1}) == ()
    assert recorder.items == ["Event", "Event"]


class Shaped(TypedDict):
    order_id: int


class NotRuntime(Protocol):
    order_id: int


async def test_optional_typed_dict_protocol_and_field_named_parameters(
    bus: EventBus, recorder: Recorder
) -> None:
    @bus.on(UserCreated)
    async def optional(user: Optional[UserCreated]) -> None:  # noqa: UP045 - the spelling under test
        recorder.add(("optional", user.id if user else None))

    @bus.on(UserCreated)
    async def union(user: UserCreated | None, copy: bool = False) -> None:
        recorder.add(("union", copy))  # a model's method named copy is not a field

    @bus.on("order")
    async def typed_dict(order: Shaped) -> None:
        recorder.add(("typeddict", order["order_id"]))

    @bus.on("order")
    async def protocol(order: NotRuntime, upper: bool = False) -> None:
        recorder.add(("protocol", upper))

    @bus.on("order")
    async def field_first(meta: dict[str, str]) -> None:
        recorder.add(("field", meta))

    async with bus:
        assert await bus.emit_now(UserCreated(id=1, email="a@example.com")) == ()
        failures = await bus.emit_now("order", {"order_id": 3, "meta": {"k": "v"}})
    assert ("optional", 1) in recorder.items
    assert ("union", False) in recorder.items
    assert ("field", {"k": "v"}) in recorder.items  # the field of its name, not the whole payload
    assert ("typeddict", 3) in recorder.items  # a TypedDict is a dict: the whole payload
    # a Protocol that isinstance() cannot check registers fine, and names no field here
    (failure,) = failures
    assert "needs 'order'" in str(failure)


async def test_a_schema_name_names_the_classs_instances(bus: EventBus, recorder: Recorder) -> None:
    @dataclass
    class SignUp:
        user_id: int

    bus.schema(SignUp, name="user.signed_up")

    @bus.on("user.signed_up")
    async def by_name(event: Event) -> None:
        recorder.add(event.name)

    @bus.on(SignUp)
    async def by_class(signup: SignUp) -> None:
        recorder.add(signup.user_id)

    async with bus:
        await bus.emit_now(SignUp(7))
    assert sorted(map(str, recorder.items)) == ["7", "user.signed_up"]


async def test_emit_now_inside_a_handler_does_not_wait_for_a_slot(recorder: Recorder) -> None:
    bus = EventBus(limits=Limits(max_concurrency=1), handler_timeout=None)

    @bus.on("outer")
    async def outer(event: Event) -> None:
        recorder.add(await bus.emit_now("inner"))

    @bus.on("inner")
    async def inner(event: Event) -> None:
        recorder.add("inner")

    async with bus:
        async with asyncio.timeout(5):
            assert await bus.emit_now("outer") == ()
    assert recorder.items == ["inner", ()]


class FrameworkError(BaseException):
    """Like fastapi-events' errors: a BaseException that is not a KeyboardInterrupt or SystemExit."""


async def test_a_handler_raising_a_base_exception_is_isolated(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError]
) -> None:
    @bus.on("x")
    async def first(event: Event) -> None:
        raise FrameworkError("async")

    @bus.on("x")
    def second(event: Event) -> None:
        raise FrameworkError("sync")

    @bus.on("x")
    async def third(event: Event) -> None:
        recorder.add("third")

    async with bus:
        errors = await bus.emit_now("x")
    assert recorder.items == ["third"]
    assert sorted(type(e.__cause__).__name__ for e in errors) == ["FrameworkError", "FrameworkError"]
    assert len(failures) == 2


def test_websocket_events_are_handled_without_a_lifespan() -> None:
    bus = EventBus()
    seen: list[Any] = []

    @bus.on("chat.message")
    def handler(event: Event) -> None:
        seen.append(event.payload)

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        emit("chat.message", await websocket.receive_text())
        await websocket.close()

    app = TidingsMiddleware(Starlette(routes=[WebSocketRoute("/ws", chat)]), bus=bus)
    client = TestClient(app)  # not entered: no lifespan
    with client.websocket_connect("/ws") as websocket:
        websocket.send_text("hello")
    deadline = 50
    while not seen and deadline:
        deadline -= 1
        with client.websocket_connect("/ws") as websocket:  # each connection drives the loop on
            websocket.send_text("again")
    assert "hello" in seen


async def get_db() -> str:
    return "db"


async def test_dependencies_in_handlers_of_a_starlette_app(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("user.created")
    async def handler(event: Event, db: Annotated[str, Depends(get_db)]) -> None:
        recorder.add(db)

    bus.app = Starlette()  # what the middleware records: an app without dependency_overrides
    async with bus:
        assert await bus.emit_now("user.created") == ()
    assert recorder.items == ["db"]
