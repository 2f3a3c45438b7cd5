"""Regressions from the second review of binding and revival: order of registration, positional-only
defaults, ``None`` arguments, typed parameters of handlers registered by name, and model aliases."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, ClassVar

import pydantic
import pytest

from tidings import Arguments, Event, EventBus, EventValidationError
from tidings.store import SQLiteStore
from tidings.store.codec import decode_event, encode_payload

from ..conftest import Recorder

pytestmark = pytest.mark.anyio


@dataclass
class SignUp:
    email: str
    plan: str = "free"


class Renamed(pydantic.BaseModel):
    """A model whose JSON names differ from its attribute names, with a computed field."""

    model_config = pydantic.ConfigDict(extra="forbid")
    __event_name__: ClassVar[str] = "user.renamed"

    user_id: int = pydantic.Field(alias="userId")
    new_name: str = pydantic.Field(alias="newName")

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def greeting(self) -> str:
        return f"hello {self.new_name}"


async def test_a_lone_parameter_registered_before_its_schema_gets_the_field(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("user.signed_up")
    async def welcome(email):  # type: ignore[no-untyped-def]
        recorder.add(email)

    @bus.on("user.signed_up")
    async def audit(event):  # type: ignore[no-untyped-def]
        recorder.add(event.name)

    bus.schema(SignUp, name="user.signed_up")
    async with bus:
        assert await bus.emit_now("user.signed_up", {"email": "a@example.com"}) == ()
    assert recorder.items == ["a@example.com", "user.signed_up"]


async def test_registering_by_class_plans_again_the_handlers_registered_by_its_name(
    recorder: Recorder,
) -> None:
    bus = EventBus()

    @bus.on("SignUp", timeout=3.0)
    def welcome(email):  # type: ignore[no-untyped-def]
        recorder.add(email)

    @bus.on(SignUp)
    async def typed(sign_up: SignUp) -> None:
        recorder.add(sign_up.plan)

    (spec,) = [s.handler for s in bus.registry if s.handler.name.endswith("welcome")]
    assert spec.timeout == 3.0  # the options survive the second plan
    async with bus:
        assert await bus.emit_now(SignUp("b@example.com")) == ()
    assert sorted(recorder.items) == ["b@example.com", "free"]


def test_a_schema_that_a_handler_by_its_name_cannot_take_is_refused() -> None:
    bus = EventBus()

    @bus.on("user.signed_up")
    async def typo(emial: str) -> None: ...

    with pytest.raises(Exception, match=r"asks for 'emial'"):
        bus.schema(SignUp, name="user.signed_up")
    assert bus.schemas.get("user.signed_up") is None


async def test_positional_only_parameters_keep_their_places(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("point")
    async def point(x: int = 1, y: int = 2, /) -> None:
        recorder.add((x, y))

    async with bus:
        assert await bus.emit_now("point", {"y": 5}) == ()
        assert await bus.emit_now("point", {"x": 7}) == ()
        assert await bus.emit_now("point", {}) == ()
    assert recorder.items == [(1, 5), (7, 2), (1, 2)]


async def test_a_lone_none_argument_is_an_argument(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("maybe", bind="arguments")
    async def maybe(value: Any = "default") -> None:
        recorder.add(value)

    @bus.on("maybe", name="envelope")
    async def envelope(event: Event) -> None:
        recorder.add(event.payload)

    async with bus:
        assert await bus.emit_now("maybe", None) == ()
        assert await bus.emit_now("maybe") == ()
    assert recorder.items == [None, Arguments((None,), {}), "default", None]


async def test_emit_now_with_keyword_fields_fits_a_schema(recorder: Recorder) -> None:
    bus = EventBus()
    bus.schema(SignUp, name="user.signed_up")

    @bus.on("user.signed_up")
    async def welcome(sign_up: SignUp) -> None:
        recorder.add(sign_up)

    async with bus:
        assert await bus.emit_now("user.signed_up", email="c@example.com") == ()
        with pytest.raises(EventValidationError, match="'email'"):
            await bus.emit_now("user.signed_up", plan="pro")
    assert recorder.items == [SignUp("c@example.com")]


async def test_an_unresolvable_event_annotation_is_an_argument_under_bind_arguments(
    recorder: Recorder,
) -> None:
    bus = EventBus()
    # a module whose ``Event`` is its own class, imported for type checkers only: not there at run time
    module: dict[str, Any] = {"recorder": recorder}
    exec(
        "from __future__ import annotations\n"
        "async def audit(entry: Event) -> None:\n"
        "    recorder.add(entry)\n",
        module,
    )
    bus.subscribe(module["audit"], "audit", bind="arguments")

    async with bus:
        assert await bus.emit_now("audit", {"who": "x"}) == ()
    assert recorder.items == [{"who": "x"}]


async def test_a_handler_by_name_gets_its_typed_event_back_from_the_log(recorder: Recorder) -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="tidings-revive-"), "log.db")
    first = EventBus(store=SQLiteStore(path), name="first")

    @first.on("user.renamed", name="rename")
    async def stuck(renamed: Renamed) -> None:
        raise RuntimeError("the directory is down")

    async with first:
        first.emit(Renamed(userId=3, newName="Ada"))
        await first.flush()

    second = EventBus(store=SQLiteStore(path), name="second")

    @second.on("user.renamed", name="rename")
    async def rename(renamed: Renamed) -> None:
        recorder.add(renamed)

    async with second:
        assert second.schemas.get("user.renamed") is None  # registered by name: no schema
        result = await second.dead_letters.replay(all=True)
        assert len(result.succeeded) == 1
        (renamed,) = await recorder.wait_count(1)
    assert renamed == Renamed(userId=3, newName="Ada")


def test_models_with_aliases_and_computed_fields_round_trip_through_the_codec() -> None:
    event = Event("user.renamed", Renamed(userId=3, newName="Ada"))
    text = encode_payload(event)
    assert '"userId":3' in text
    assert "greeting" not in text
    read = decode_event(event.id, event.name, text, "{}", event.timestamp_ns)
    assert Renamed.model_validate(read.payload) == event.payload
