"""Handlers get what their signature asks for; signatures their events cannot satisfy fail at registration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pydantic
import pytest

from tidings import Arguments, ConfigurationError, Event, EventBus, HandlerError

from ..conftest import Recorder

pytestmark = pytest.mark.anyio


class UserCreated(pydantic.BaseModel):
    __event_name__: ClassVar[str] = "user.created"

    id: int
    email: str
    plan: str = "free"


@dataclass
class Base:
    id: int


@dataclass
class Derived(Base):
    name: str


async def test_each_kind_of_parameter(bus: EventBus, recorder: Recorder) -> None:
    @bus.on(UserCreated)
    async def envelope_only(event: Event) -> None:
        recorder.add(("envelope", event.name))

    @bus.on(UserCreated)
    async def untyped(e) -> None:  # type: ignore[no-untyped-def]  # a lone untyped parameter: the envelope
        recorder.add(("untyped", type(e).__name__))

    @bus.on(UserCreated)
    async def payload(user: UserCreated) -> None:
        recorder.add(("payload", user.id))

    @bus.on(UserCreated)
    def fields(email: str, plan: str) -> None:
        recorder.add(("fields", email, plan))

    @bus.on(UserCreated)
    async def envelope_and_field(event: Event, id: int) -> None:
        recorder.add(("both", event.name, id))

    @bus.on(UserCreated)
    async def keyword_only(*, email: str, missing: str = "default") -> None:
        recorder.add(("kwonly", email, missing))

    async with bus:
        bus.emit(UserCreated(id=1, email="a@example.com"))
        seen = await recorder.wait_count(6)
    assert sorted(seen) == sorted(
        [
            ("envelope", "user.created"),
            ("untyped", "Event"),
            ("payload", 1),
            ("fields", "a@example.com", "free"),
            ("both", "user.created", 1),
            ("kwonly", "a@example.com", "default"),
        ]
    )


async def test_fields_from_dict_payloads_and_missing_ones(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError]
) -> None:
    @bus.on("order.*")
    async def total(order_id: int, total: float = 0.0) -> None:
        recorder.add((order_id, total))

    async with bus:
        bus.emit("order.placed", {"order_id": 1, "total": 9.5, "extra": "ignored"})
        bus.emit("order.cancelled", {"order_id": 2})
        bus.emit("order.lost", {"nothing": True})
        await recorder.wait_count(2)
        await bus.drain()
    assert sorted(recorder.items) == [(1, 9.5), (2, 0.0)]
    (failure,) = failures
    assert "needs 'order_id', which event 'order.lost'" in str(failure)


async def test_a_lone_parameter_typed_with_the_payload_type_gets_the_whole_payload(
    bus: EventBus, recorder: Recorder
) -> None:
    @bus.on("user.updated")
    async def handler(user_data: dict[str, Any]) -> None:
        recorder.add(user_data)

    @bus.on("user.updated")
    async def as_mapping(data: Mapping) -> None:  # type: ignore[type-arg]
        recorder.add(("mapping", dict(data)))

    async with bus:
        bus.emit("user.updated", {"id": 1})
        seen = await recorder.wait_count(2)
    assert {"id": 1} in seen
    assert ("mapping", {"id": 1}) in seen


async def test_arguments_are_passed_positionally_and_by_keyword(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("payment.processed")
    async def settle(payment_id: str, status: str, amount: float) -> None:
        recorder.add((payment_id, status, amount))

    @bus.on("payment.processed")
    async def extras(event: Event, payment_id: str, *rest: Any, **options: Any) -> None:
        recorder.add(("extras", event.name, payment_id, rest, options))

    async with bus:
        failures = await bus.emit_now("payment.processed", "p-1", "ok", 9.5)
        assert failures == ()
        failures = await bus.emit_now("payment.processed", "p-2", status="ok", amount=1.0)
        assert failures == ()
    assert ("p-1", "ok", 9.5) in recorder.items
    assert ("p-2", "ok", 1.0) in recorder.items
    assert ("extras", "payment.processed", "p-1", ("ok", 9.5), {}) in recorder.items
    assert ("extras", "payment.processed", "p-2", (), {"status": "ok", "amount": 1.0}) in recorder.items


async def test_too_many_or_unknown_arguments_fail_the_call(bus: EventBus) -> None:
    @bus.on("x")
    async def one(a: int) -> None: ...

    async with bus:
        (failure,) = await bus.emit_now("x", 1, 2)
        assert "takes no more positional arguments" in str(failure)
        (failure,) = await bus.emit_now("x", 1, b=2)
        assert "unexpected keyword argument(s): b" in str(failure)


async def test_bind_arguments_makes_a_lone_untyped_parameter_an_argument(
    bus: EventBus, recorder: Recorder
) -> None:
    @bus.on("user.created", bind="arguments")
    async def send(email) -> None:  # type: ignore[no-untyped-def]
        recorder.add(email)

    async with bus:
        await bus.emit_now("user.created", email="a@example.com")
        await bus.emit_now("user.created", "b@example.com")
        bus.emit("user.created", {"a": "dict"})  # emit's payload is the one argument
        await recorder.wait_count(3)
    assert recorder.items == ["a@example.com", "b@example.com", {"a": "dict"}]
    with pytest.raises(ConfigurationError, match="bind must be"):
        bus.on("x", bind="magic")(send)  # type: ignore[arg-type]


async def test_payload_parameter_with_a_base_class(bus: EventBus, recorder: Recorder) -> None:
    @bus.on(Derived)
    async def handler(item: Base) -> None:
        recorder.add(item)

    async with bus:
        await bus.emit_now(Derived(1, "n"))
    assert recorder.items == [Derived(1, "n")]


async def test_a_typed_parameter_receiving_another_type_fails_clearly(
    bus: EventBus, failures: list[HandlerError]
) -> None:
    @bus.on("anything")
    async def handler(user: UserCreated) -> None: ...

    async with bus:
        (failure,) = await bus.emit_now("anything", {"id": 1})
        (other,) = await bus.emit_now("anything", 7)
    assert "takes user: UserCreated, but event 'anything'" in str(failure)
    assert "carries a dict that does not fit it: field 'email'" in str(failure.__cause__)
    assert "takes user: UserCreated, but event 'anything'" in str(other)
    assert "carries a int" in str(other.__cause__)


def test_unsatisfiable_signatures_fail_at_registration() -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError, match=r"asks for 'emial', which event 'user\.created'"):

        @bus.on(UserCreated)
        async def typo(emial: str) -> None: ...

    with pytest.raises(ConfigurationError, match=r"takes item: Derived, but event 'user\.created'"):

        @bus.on(UserCreated)
        async def wrong_class(item: Derived) -> None: ...

    with pytest.raises(ConfigurationError, match="envelope more than once"):

        @bus.on("x")
        async def twice(a: Event, b: Event) -> None: ...

    with pytest.raises(ConfigurationError, match="cannot read the signature"):
        bus.subscribe(min, "x")  # a builtin with no signature


def test_a_schema_registered_later_checks_existing_handlers() -> None:
    bus = EventBus()

    @bus.on("user.created")
    async def typo(emial: str) -> None: ...

    with pytest.raises(ConfigurationError, match="asks for 'emial'"):
        bus.schema(UserCreated)
    assert bus.schemas.get("user.created") is None


def test_string_annotations_that_cannot_be_resolved_still_work() -> None:
    namespace: dict[str, Any] = {}
    exec(
        "from __future__ import annotations\n"
        "async def handler(event: Event) -> None: ...\n"
        "async def other(event: Missing, x: int = 1) -> None: ...\n",
        namespace,
    )
    bus = EventBus()
    spec = bus.subscribe(namespace["handler"], "x")
    assert spec.plan is not None and spec.plan.direct
    with pytest.raises(ConfigurationError, match=r"'Missing'.* cannot be resolved"):
        bus.subscribe(namespace["other"], "x")  # what it asks for is unknown: not a silent envelope


def test_direct_handlers_are_called_without_a_binder() -> None:
    bus = EventBus()

    async def handler(event: Event, retries: int = 3) -> None: ...

    spec = bus.subscribe(handler, "x")
    assert spec.call is handler

    def untyped(event, flag=False):  # type: ignore[no-untyped-def]
        return None

    assert bus.subscribe(untyped, "x").call is untyped

    class Callable:
        async def __call__(self, event: Event) -> None: ...

    target = Callable()
    spec = bus.subscribe(target, "x", name="callable")
    assert spec.call is target and spec.is_async


async def test_arguments_envelope_has_args_and_kwargs(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("x")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    async with bus:
        await bus.emit_now("x", 1, 2, key="v")
        await bus.emit_now("x")
        await bus.emit_now("x", {"only": "payload"})
    assert recorder.items == [Arguments((1, 2), {"key": "v"}), None, {"only": "payload"}]
    assert repr(recorder.items[0]) == "Arguments(1, 2, key='v')"
    assert hash(recorder.items[0]) == hash(Arguments((1, 2), {"key": "v"}))
    assert recorder.items[0] != (1, 2)


async def test_arguments_style_handlers_on_a_typed_name(bus: EventBus, recorder: Recorder) -> None:
    bus.schema(UserCreated)

    @bus.on("user.created", bind="arguments")
    async def listener(user: UserCreated) -> None:  # Litestar style: the payload is the one argument
        recorder.add(user.id)

    @bus.on("tick", bind="arguments")
    async def tick(count: int) -> None:
        recorder.add(count)

    async with bus:
        await bus.emit_now(UserCreated(id=4, email="d@example.com"))
        await bus.emit_now("tick", 1)
    assert recorder.items == [4, 1]
