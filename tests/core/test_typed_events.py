"""Typed events: emitting models and dataclasses, schemas that validate at emit time, revival from the log."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import pydantic
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tidings import (
    ConfigurationError,
    Event,
    EventBus,
    EventValidationError,
    TidingsMiddleware,
    emit,
)
from tidings._core.schemas import event_name_of
from tidings.store import SQLiteStore

from ..conftest import Recorder

pytestmark = pytest.mark.anyio


class UserCreated(pydantic.BaseModel):
    __event_name__: ClassVar[str] = "user.created"

    id: int
    email: str


@dataclass
class OrderPlaced:
    order_id: int
    total: float = 0.0


class Kind(enum.Enum):
    SIGNED_UP = "user.signed_up"


@dataclass
class SignedUp:
    __event_name__ = Kind.SIGNED_UP
    user_id: uuid.UUID
    at: datetime


def test_event_names_of_classes() -> None:
    assert event_name_of(UserCreated) == "user.created"
    assert event_name_of(OrderPlaced) == "OrderPlaced"
    assert event_name_of(SignedUp) == "user.signed_up"

    @dataclass
    class Bad:
        __event_name__ = 3

    with pytest.raises(ConfigurationError, match="must be a non-empty str"):
        event_name_of(Bad)


async def test_typed_events_reach_class_name_and_wildcard_handlers(bus: EventBus, recorder: Recorder) -> None:
    @bus.on(UserCreated)
    async def by_class(user: UserCreated) -> None:
        recorder.add(("class", user))

    @bus.on("user.created")
    async def by_name(event: Event) -> None:
        recorder.add(("name", event.payload))

    @bus.on("user.*")
    def by_wildcard(event: Event) -> None:
        recorder.add(("wildcard", type(event.payload).__name__))

    @bus.on(OrderPlaced)
    async def order(order: OrderPlaced) -> None:
        recorder.add(("order", order.order_id))

    user = UserCreated(id=1, email="a@example.com")
    async with bus:
        bus.emit(user)
        emit(OrderPlaced(7, 9.5))
        seen = await recorder.wait_count(4)
    assert ("class", user) in seen
    assert ("name", user) in seen
    assert ("wildcard", "UserCreated") in seen
    assert ("order", 7) in seen


async def test_dict_payloads_under_a_schema_are_validated_into_the_class(
    bus: EventBus, recorder: Recorder
) -> None:
    bus.schema(SignedUp)

    @bus.on(SignedUp)
    async def handler(signed_up: SignedUp) -> None:
        recorder.add(signed_up)

    user_id = uuid.uuid4()
    async with bus:
        bus.emit(Kind.SIGNED_UP, {"user_id": str(user_id), "at": "2026-11-23T10:00:00"})
        (signed_up,) = await recorder.wait_count(1)
    assert signed_up == SignedUp(user_id, datetime(2026, 11, 23, 10, 0))


def test_a_bad_payload_raises_in_the_caller_naming_event_and_field() -> None:
    bus = EventBus()
    bus.schema(UserCreated)
    with pytest.raises(EventValidationError) as caught:
        bus.emit("user.created", {"id": "not a number"})
    error = caught.value
    assert error.event_name == "user.created"
    assert error.schema is UserCreated
    fields = dict(error.errors)
    assert set(fields) == {"id", "email"}
    assert "'id'" in str(error) and "'email'" in str(error) and "user.created" in str(error)
    assert isinstance(error, ValueError)

    with pytest.raises(EventValidationError, match="expected a UserCreated or a dict, got int"):
        bus.emit("user.created", 5)
    with pytest.raises(EventValidationError, match="expected a UserCreated or a dict, got OrderPlaced"):
        bus.emit("user.created", OrderPlaced(1))


def test_schema_registration_errors() -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError, match="Pydantic model or a dataclass"):
        bus.schema(int)
    bus.schema(OrderPlaced, name="order.placed")
    bus.schema(OrderPlaced, name="order.placed")  # the same again is fine

    @dataclass
    class Other:
        x: int

    with pytest.raises(ConfigurationError, match="has the schema OrderPlaced already"):
        bus.schema(Other, name="order.placed")
    with pytest.raises(ConfigurationError, match="Pydantic model or a dataclass"):
        bus.on(int)(print)


def test_schema_as_decorator_with_and_without_name() -> None:
    bus = EventBus()

    @bus.schema
    @dataclass
    class Plain:
        x: int

    @bus.schema(name="custom.name")
    @dataclass
    class Named:
        y: int

    assert bus.schemas.get("Plain") is not None
    schema = bus.schemas.get("custom.name")
    assert schema is not None and schema.cls is Named
    assert len(bus.schemas) == 2
    assert {s.name for s in bus.schemas} == {"Plain", "custom.name"}


def test_typed_event_with_a_payload_or_a_bad_event_is_a_type_error() -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="takes no payload with a typed event"):
        bus.emit(OrderPlaced(1), {"x": 1})
    with pytest.raises(TypeError, match="must be a name"):
        bus.emit(object())


def test_emitting_a_class_registered_under_another_schema_is_refused() -> None:
    bus = EventBus()

    @dataclass
    class Impostor:
        __event_name__ = "user.created"
        id: int

    bus.schema(UserCreated)
    with pytest.raises(EventValidationError, match="expected a UserCreated"):
        bus.emit(Impostor(1))


async def test_validation_happens_in_the_request_and_fails_it() -> None:
    bus = EventBus()
    bus.schema(UserCreated)
    recorder = Recorder()

    @bus.on(UserCreated)
    async def handler(user: UserCreated) -> None:
        recorder.add(user.id)

    app = FastAPI()
    app.add_middleware(TidingsMiddleware, bus=bus)

    @app.post("/good")
    def good() -> dict[str, str]:
        emit("user.created", {"id": "3", "email": "c@example.com"})
        return {}

    @app.post("/bad")
    def bad() -> dict[str, str]:
        try:
            emit("user.created", {"id": 3})
        except EventValidationError as exc:
            return {"error": str(exc)}
        return {}

    with TestClient(app) as client:
        assert client.post("/good").status_code == 200
        response = client.post("/bad")
        assert "field 'email'" in response.json()["error"]
    assert recorder.items == [3]


async def test_typed_payloads_come_back_typed_from_the_log(recorder: Recorder, tmp_path: Path) -> None:
    path = str(tmp_path / "log.db")
    first = EventBus(store=SQLiteStore(path), name="first")
    release = Recorder()

    @first.on(UserCreated, name="welcome")
    async def stuck(user: UserCreated) -> None:
        raise RuntimeError("the mail server is down")

    async with first:
        first.emit(UserCreated(id=5, email="e@example.com"))
        await first.flush()

    second = EventBus(store=SQLiteStore(path), name="second")

    @second.on(UserCreated, name="welcome")
    async def welcome(user: UserCreated) -> None:
        release.add(user)

    async with second:
        letters = await second.dead_letters.list()
        assert len(letters) == 1
        assert letters[0].event.payload == {"id": 5, "email": "e@example.com"}  # as stored
        result = await second.dead_letters.replay(all=True)
        assert len(result.succeeded) == 1
        (user,) = await release.wait_count(1)
    assert user == UserCreated(id=5, email="e@example.com")


def test_a_dataclass_without_pydantic_validation_is_built_by_name() -> None:
    from tidings._core import schemas

    @dataclass
    class Point:
        x: int
        y: int

    schema = schemas.Schema(Point, "point")
    assert schema.coerce({"x": 1, "y": 2}) == Point(1, 2)
    assert schema.coerce({"x": 1, "y": 2}, read_back=True) == Point(1, 2)
    with pytest.raises(EventValidationError, match="'x'"):
        schema.coerce({"x": "a", "y": 2})


def test_schema_problems_from_plain_errors() -> None:
    from tidings._core.schemas import _problems

    assert _problems(TypeError("boom")) == [("", "TypeError: boom")]


def _no_pydantic_validator(monkeypatch: pytest.MonkeyPatch) -> Any:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pydantic":
            raise ImportError("no pydantic here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_dataclass_schemas_work_without_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    from tidings._core.schemas import Schema

    @dataclass
    class Point:
        x: int

    _no_pydantic_validator(monkeypatch)
    schema = Schema(Point, "point")
    assert schema.coerce({"x": 1}) == Point(1)
    with pytest.raises(EventValidationError, match="TypeError"):
        schema.coerce({"y": 1})


async def test_classes_made_at_run_time_are_not_kept_alive(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import weakref
    from dataclasses import make_dataclass

    from tidings._core import schemas

    monkeypatch.setattr(schemas, "_CLASS_CACHE_LIMIT", 16)  # 4096 in production: the same code path
    bus = EventBus()

    @bus.on("*")
    async def handler(id: int) -> None:  # reads a field: the payload's class is looked at too
        recorder.add(id)

    made: list[weakref.ref[type]] = []
    async with bus:
        for number in range(40):
            cls = make_dataclass(f"Made{number}", [("id", int)])  # as a per-request factory would
            made.append(weakref.ref(cls))
            await bus.emit_now(cls(id=number))
            del cls
    gc.collect()
    assert recorder.items == list(range(40))  # every event was handled
    assert len(schemas._NAMES) <= 16 and len(schemas._FIELDS) <= 16
    assert made[0]() is None  # the first classes are gone: the caches let go of them


async def test_a_second_name_for_an_event_class_does_not_take_its_instances_from_the_first(
    recorder: Recorder,
) -> None:
    # The same shape reused for a second event: a typed emit of the class used to go by the
    # later name, so the handlers registered for the class silently stopped receiving it.
    bus = EventBus()

    @bus.on(UserCreated)
    async def welcome(user: UserCreated) -> None:
        recorder.add(("welcome", user.id))

    bus.schema(UserCreated, name="user.imported")

    @bus.on("user.imported")
    async def imported(id: int) -> None:
        recorder.add(("imported", id))

    async with bus:
        await bus.emit_now(UserCreated(id=1, email="a@example.com"))
        await bus.emit_now("user.imported", {"id": 2, "email": "b@example.com"})
    assert recorder.items == [("welcome", 1), ("imported", 2)]
