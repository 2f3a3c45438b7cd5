"""Regressions from the second review of binding and revival: order of registration, positional-only
defaults, ``None`` arguments, typed parameters of handlers registered by name, and model aliases."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pydantic
import pytest

from tidings import Arguments, ConfigurationError, Event, EventBus, EventValidationError
from tidings._core.schemas import Schema
from tidings.store import SQLiteStore
from tidings.store.codec import decode_event, encode_payload

from ..conftest import Recorder

pytestmark = pytest.mark.anyio

BY_NAME = "by_name" in inspect.signature(pydantic.BaseModel.model_validate).parameters


@dataclass
class SignUp:
    email: str
    plan: str = "free"


class Comment(pydantic.BaseModel):
    comment: str
    author: str


class Renamed(pydantic.BaseModel):
    """A model whose JSON names differ from its attribute names, with a computed field."""

    # populate_by_name: what Pydantic before 2.11 needs to read the log's field names back
    model_config = pydantic.ConfigDict(extra="forbid", populate_by_name=True)
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


async def test_a_lone_none_fills_a_required_argument_and_stays_the_payload(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("maybe", bind="arguments")
    async def required(value: Any) -> None:
        recorder.add(("required", value))

    @bus.on("maybe", bind="arguments")
    async def optional(value: Any = "default") -> None:
        recorder.add(("optional", value))

    @bus.on("maybe", name="envelope")
    async def envelope(event: Event) -> None:
        recorder.add(("envelope", event.payload))

    async with bus:
        assert await bus.emit_now("maybe", None) == ()
        assert await bus.emit_now("maybe", Arguments((1,), {})) == ()
    assert recorder.items == [
        ("required", None),
        ("optional", "default"),
        ("envelope", None),
        ("required", 1),
        ("optional", 1),
        ("envelope", Arguments((1,), {})),
    ]


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


async def test_a_handler_by_name_gets_its_typed_event_back_from_the_log(
    recorder: Recorder, tmp_path: Path
) -> None:
    path = str(tmp_path / "log.db")
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


def test_models_are_written_by_field_name_without_computed_fields() -> None:
    event = Event("user.renamed", Renamed(userId=3, newName="Ada"))
    text = encode_payload(event)
    # by field name (what handlers bind by name), with the class it was
    assert json.loads(text) == {
        "$tidings.typed": [[f"{__name__}:Renamed"], {"user_id": 3, "new_name": "Ada"}]
    }
    read = decode_event(event.id, event.name, text, "{}", event.timestamp_ns)
    assert read.payload == {"user_id": 3, "new_name": "Ada"}  # what a handler of the envelope sees
    assert encode_payload(read) == text  # written again as it was (a revived dead letter)


class Aliased(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    user_id: int = pydantic.Field(alias="userId")


class Output(pydantic.BaseModel):
    user_id: int = pydantic.Field(serialization_alias="userId")


class Input(pydantic.BaseModel):
    user_id: int = pydantic.Field(validation_alias="userId")


@pytest.mark.skipif(not BY_NAME, reason="reading aliased fields by name needs Pydantic 2.11+")
@pytest.mark.parametrize(
    "model",
    [Aliased.model_validate({"userId": 3}), Output(user_id=4), Input.model_validate({"userId": 5})],
)
def test_models_with_any_aliases_come_back_from_the_log(model: pydantic.BaseModel) -> None:
    event = Event("x", model)
    read = decode_event(event.id, event.name, encode_payload(event), "{}", event.timestamp_ns)
    assert Schema(type(model), "x").coerce(read.payload, read_back=True) == model


async def test_a_typed_parameter_gets_its_instance_even_when_a_field_has_its_name(
    recorder: Recorder,
) -> None:
    bus = EventBus()

    @bus.on("comment.*")
    async def notify(comment: Comment) -> None:
        recorder.add(comment)

    async with bus:
        # as read back from the log: the class's fields, one of them named like the parameter
        assert await bus.emit_now("comment.added", {"comment": "nice", "author": "ann"}) == ()
        # a dict holding the class's fields under the parameter's name
        assert await bus.emit_now("comment.quoted", {"comment": {"comment": "hm", "author": "bo"}}) == ()
        (failure,) = await bus.emit_now("comment.added", {"comment": "no author"})
    assert recorder.items == [Comment(comment="nice", author="ann"), Comment(comment="hm", author="bo")]
    assert "does not fit it: field 'author'" in str(failure.__cause__)


async def test_typed_arguments_come_back_typed(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("order.paid")
    async def receipt(order: Comment, amount: float) -> None:
        recorder.add((order, amount))

    async with bus:
        # Arguments as the log gives them back: the model as a dict
        assert await bus.emit_now("order.paid", {"comment": "c", "author": "a"}, 9.5) == ()
        assert await bus.emit_now("order.paid", order={"comment": "d", "author": "b"}, amount=1.0) == ()
    assert recorder.items == [
        (Comment(comment="c", author="a"), 9.5),
        (Comment(comment="d", author="b"), 1.0),
    ]


async def test_every_registration_of_a_handler_is_planned_again_and_replays_with_it(
    recorder: Recorder,
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "log.db")

    def build(fail: bool) -> EventBus:
        bus = EventBus(store=SQLiteStore(path))

        @bus.on("user.signed_up", name="welcome")
        @bus.on("user.invited", name="welcome")
        def welcome(email):  # type: ignore[no-untyped-def]
            recorder.add(email)
            if fail:
                raise ConnectionError("the mail server is down")

        bus.schema(SignUp, name="user.signed_up")
        return bus

    first = build(fail=True)
    async with first:
        assert len(await first.emit_now("user.signed_up", {"email": "a@example.com"})) == 1
        assert len(await first.emit_now("user.invited", {"email": "b@example.com"})) == 1
        await first.flush()
    second = build(fail=False)
    async with second:
        result = await second.dead_letters.replay(all=True)  # finds the handler by its name
        assert len(result.succeeded) == 2
    assert recorder.items == ["a@example.com", "b@example.com", "a@example.com", "b@example.com"]


class Customer(pydantic.BaseModel):
    id: int
    name: str = ""


class Prefs(pydantic.BaseModel):
    newsletter: bool = False


async def test_typed_parameters_named_after_fields_get_those_fields(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("order.placed")
    async def notify(customer: Customer, prefs: Prefs) -> None:
        recorder.add((customer, prefs))

    async with bus:
        # the dict an order event is, live or read back from the log: the fields win, not the whole
        payload = {
            "id": 1001,
            "name": "order",
            "customer": {"id": 7, "name": "Ann"},
            "prefs": {"newsletter": 1},
        }
        assert await bus.emit_now("order.placed", payload) == ()
        (failure,) = await bus.emit_now("order.placed", {"id": 1002, "customer": {"id": 8}})
    assert recorder.items == [(Customer(id=7, name="Ann"), Prefs(newsletter=True))]
    assert "takes prefs: Prefs" in str(failure.__cause__)  # never the whole payload as Prefs()


def test_a_schema_plans_again_a_handler_that_also_has_a_batch_registration() -> None:
    bus = EventBus()

    @bus.on("metrics.*", batch=True)
    @bus.on("user.signed_up")
    def record(email):  # type: ignore[no-untyped-def]
        return email

    bus.schema(SignUp, name="user.signed_up")
    plans = {s.pattern: s.handler.plan for s in bus.registry}
    assert plans["metrics.*"] is None  # a batch call gets the list of events, unchanged
    plan = plans["user.signed_up"]
    assert plan is not None
    assert not plan.guessed_envelope


@pytest.mark.parametrize("schema_first", [True, False])
@pytest.mark.parametrize("schema_on_inner", [True, False])
async def test_stacked_registrations_agree_whatever_the_order(
    schema_first: bool, schema_on_inner: bool, recorder: Recorder
) -> None:
    bus = EventBus()
    typed_name = "user.signed_up"
    inner, outer = (typed_name, "user.invited") if schema_on_inner else ("user.invited", typed_name)
    if schema_first:
        bus.schema(SignUp, name=typed_name)

    @bus.on(outer, name="welcome")
    @bus.on(inner, name="welcome")
    async def welcome(email):  # type: ignore[no-untyped-def]
        recorder.add(email)

    if not schema_first:
        bus.schema(SignUp, name=typed_name)
    async with bus:
        assert await bus.emit_now("user.invited", {"email": "a@example.com"}) == ()
        assert await bus.emit_now(typed_name, {"email": "b@example.com"}) == ()
    assert recorder.items == ["a@example.com", "b@example.com"]


class Webhook(pydantic.BaseModel):
    source: str
    payload: dict[str, str] = {}


class Reply(pydantic.BaseModel):
    text: str
    reply: Reply | None = None


class Order(pydantic.BaseModel):
    id: int
    total: float


async def test_typed_events_replay_as_they_ran_live(recorder: Recorder, tmp_path: Path) -> None:
    path = str(tmp_path / "log.db")

    def build(fail: bool) -> EventBus:
        bus = EventBus(store=SQLiteStore(path))

        # no schema for these names: the class travels with the event in the log
        @bus.on("order.placed", name="receipt")
        async def receipt(order: Order, note: str = "") -> None:  # one typed parameter among others
            recorder.add((order, note))
            if fail:
                raise ConnectionError("the mail server is down")

        @bus.on("webhook.received", name="webhook")
        async def on_webhook(payload: Webhook) -> None:  # named like a field of its own class
            recorder.add(payload)
            if fail:
                raise ConnectionError("the queue is down")

        @bus.on("comment.added", name="comment")
        async def on_comment(reply: Reply) -> None:
            recorder.add(reply)
            if fail:
                raise ConnectionError("the queue is down")

        return bus

    events = [
        ("order.placed", Order(id=1, total=9.5)),
        ("webhook.received", Webhook(source="github", payload={"ref": "main"})),
        ("comment.added", Reply(text="top")),
    ]
    first = build(fail=True)
    async with first:
        for name, payload in events:
            assert len(await first.emit_now(name, payload)) == 1
        await first.flush()
    live = list(recorder.items)
    second = build(fail=False)
    async with second:
        result = await second.dead_letters.replay(all=True)
        assert len(result.succeeded) == 3
    assert live == [(events[0][1], ""), events[1][1], events[2][1]]
    assert sorted(map(repr, recorder.items[3:])) == sorted(map(repr, live))


@pytest.mark.parametrize("style", ["batch", "arguments"])
def test_registrations_that_bind_no_fields_do_not_make_the_order_matter(style: str) -> None:
    @dataclass
    class Invited:
        inviter: str

    for schema_first in (True, False):
        bus = EventBus()
        bus.schema(Invited, name="user.invited")
        if schema_first:
            bus.schema(SignUp, name="user.signed_up")

        def record(email):  # type: ignore[no-untyped-def]
            return email

        if style == "batch":
            bus.subscribe(record, "user.invited", batch=True)
        else:
            bus.subscribe(record, "user.invited", bind="arguments")
        bus.subscribe(record, "user.signed_up")
        if not schema_first:
            bus.schema(SignUp, name="user.signed_up")  # no longer refused for user.invited's fields
        plan = next(s.handler.plan for s in bus.registry if s.pattern == "user.signed_up")
        assert plan is not None
        assert not plan.guessed_envelope


async def test_a_refused_registration_leaves_nothing_behind(recorder: Recorder) -> None:
    @dataclass
    class Invited:
        inviter: str

    bus = EventBus()
    bus.schema(SignUp, name="user.signed_up")
    bus.schema(Invited, name="user.invited")

    async def welcome(email):  # type: ignore[no-untyped-def]
        recorder.add(email)

    bus.subscribe(welcome, "user.signed_up")
    with pytest.raises(ConfigurationError, match=r"asks for 'email', which event 'user\.invited'"):
        bus.subscribe(welcome, "user.invited")
    assert [s.pattern for s in bus.registry] == ["user.signed_up"]
    async with bus:
        assert await bus.emit_now("user.invited", {"inviter": "bob"}) == ()
    assert recorder.items == []


@dataclass
class Audited:
    name: str
    data: Any


class RushOrder(Order):
    deadline: str


def test_a_payload_read_back_can_be_written_again_inside_another_event() -> None:
    event = Event("order.placed", RushOrder(id=1, total=2.0, deadline="today"))
    read = decode_event(event.id, event.name, encode_payload(event), "{}", event.timestamp_ns)
    assert isinstance(read.payload, dict)
    assert json.loads(json.dumps(read.payload)) == {"id": 1, "total": 2.0, "deadline": "today"}
    # a handler forwarding what it was given: dataclasses.asdict rebuilds the dict by its type
    forwarded = Event("audit", Audited(read.name, read.payload))
    assert json.loads(encode_payload(forwarded))["$tidings.typed"][1] == {
        "name": "order.placed",
        "data": {"id": 1, "total": 2.0, "deadline": "today"},
    }


async def test_a_parameter_typed_with_a_base_class_gets_the_base_back(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("order.placed")
    async def receipt(order: Order, note: str = "") -> None:
        recorder.add(order)

    event = Event("order.placed", RushOrder(id=1, total=2.0, deadline="today"))
    read = decode_event(event.id, event.name, encode_payload(event), "{}", event.timestamp_ns)
    async with bus:
        assert await bus.emit_now("order.placed", read.payload) == ()
    assert recorder.items == [Order(id=1, total=2.0)]  # what the log can give without importing classes


def test_a_refused_subscribe_registers_neither_its_names_nor_its_classes() -> None:
    @dataclass
    class Invited:
        inviter: str

    bus = EventBus()
    bus.schema(SignUp, name="user.signed_up")

    def welcome(email):  # type: ignore[no-untyped-def]
        return email

    bus.subscribe(welcome, "user.signed_up")
    with pytest.raises(ConfigurationError, match="asks for 'email'"):
        bus.subscribe(welcome, Invited)
    assert bus.schemas.get("Invited") is None
    with pytest.raises(ConfigurationError, match="non-empty str"):
        bus.subscribe(welcome, "a.b", "")
    assert [s.pattern for s in bus.registry] == ["user.signed_up"]


async def test_a_none_field_for_a_required_typed_parameter_fails_the_call_clearly(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("comment.added", name="strict")
    async def strict(comment: Comment) -> None:
        recorder.add(("strict", comment))  # pragma: no cover - never called with None

    @bus.on("comment.added")
    def optional(comment: Comment | None, note: str) -> None:  # a plain def: the same binding
        recorder.add(("optional", comment, note))

    @bus.on("comment.added")
    async def defaulted(comment: Comment = None) -> None:  # type: ignore[assignment]
        recorder.add(("defaulted", comment))

    async with bus:
        errors = await bus.emit_now("comment.added", {"comment": None, "note": "n"})
    assert [error.handler for error in errors] == ["strict"]  # the others ran, with None
    assert "field 'comment' of event 'comment.added'" in str(errors[0])
    assert "is None" in str(errors[0])
    assert sorted(recorder.items, key=str) == [("defaulted", None), ("optional", None, "n")]
