"""``dispatch()``: every behaviour fastapi-events' README documents, and where it goes outside requests."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import pydantic
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import tidings
from tidings import EventBus
from tidings.compat.fastapi_events.dispatcher import dispatch
from tidings.compat.fastapi_events.errors import (
    FastapiEventError,
    MissingEventNameDuringDispatch,
    MultiplePayloadsDetectedDuringDispatch,
)
from tidings.compat.fastapi_events.handlers.local import LocalHandler
from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware
from tidings.compat.fastapi_events.registry.payload_schema import EventPayloadSchemaRegistry, registry
from tidings.compat.fastapi_events.typing import Event
from tidings.testing import capture

from ..conftest import Recorder
from .conftest import call_asgi, client, lifespan, starlette_app

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    """Schemas registered by a test are gone after it (the default registry is process-wide)."""
    saved = dict(registry.data)
    yield
    registry.data.clear()
    registry.data.update(saved)


def recording_handler(recorder: Recorder, pattern: str = "*") -> LocalHandler:
    handler = LocalHandler()

    @handler.register(event_name=pattern)
    async def record(event: Event) -> None:
        recorder.add(event)

    return handler


async def run_endpoint(handler: LocalHandler, body: Any, **options: Any) -> list[Any]:
    """Serve one request whose endpoint runs ``body()``; return what was sent and recorded, in order."""
    log: list[Any] = []

    async def endpoint(request: Request) -> Response:
        body()
        return PlainTextResponse("ok")

    @handler.register(event_name="*")
    async def trace(event: Event) -> None:
        log.append(event)

    app = starlette_app([handler], [Route("/", endpoint)], **options)
    async with lifespan(app):
        await call_asgi(app, "/", log)
    return log


# -- dispatching: names, dicts, models ------------------------------------------------------------------


async def test_dispatch_with_a_dict_or_no_payload_is_handled_after_the_response() -> None:
    def body() -> None:
        dispatch("cat-requested-a-fish", payload={"cat_id": "fd375d23-b0c9-4271-a9e0-e028c4cd7230"})
        dispatch("a_cat_is_spotted")

    log = await run_endpoint(LocalHandler(), body)
    assert log == [
        "start",
        "body",
        ("cat-requested-a-fish", {"cat_id": "fd375d23-b0c9-4271-a9e0-e028c4cd7230"}),
        ("a_cat_is_spotted", None),
    ]


class CatRequestedAFishEvent(pydantic.BaseModel):
    __event_name__ = "cat-requested-a-fish"

    cat_id: pydantic.UUID4
    note: str = "hungry"


CAT_ID = "fd375d23-b0c9-4271-a9e0-e028c4cd7230"


async def test_a_model_is_dispatched_as_its_dump_under_its_event_name() -> None:
    def body() -> None:
        dispatch(CatRequestedAFishEvent(cat_id=CAT_ID))  # type: ignore[arg-type]
        dispatch("cat-requested-a-fish", payload={"cat_id": CAT_ID})  # the README's equivalent

    log = await run_endpoint(LocalHandler(), body)
    # model_dump(exclude_unset=True): the default "note" is left out
    assert log[2:] == [
        ("cat-requested-a-fish", {"cat_id": uuid.UUID(CAT_ID)}),
        ("cat-requested-a-fish", {"cat_id": CAT_ID}),
    ]


async def test_model_dump_arguments_and_payload_schema_dump_false() -> None:
    model = CatRequestedAFishEvent(cat_id=CAT_ID)  # type: ignore[arg-type]

    def body() -> None:
        dispatch(model, payload_schema_cls_dict_args={"mode": "json"})
        dispatch(model, payload_schema_dump=False)

    log = await run_endpoint(LocalHandler(), body)
    assert log[2] == ("cat-requested-a-fish", {"cat_id": CAT_ID, "note": "hungry"})
    assert log[3] == ("cat-requested-a-fish", model)
    assert log[3][1] is model


async def test_event_name_takes_precedence_over_the_models_event_name() -> None:
    # as documented in dispatch()'s docstring (fastapi-events 0.12.2 itself ignores it for such models)
    log = await run_endpoint(
        LocalHandler(),
        lambda: dispatch(CatRequestedAFishEvent(cat_id=CAT_ID), event_name="cat-fed"),  # type: ignore[arg-type]
    )
    assert log[2] == ("cat-fed", {"cat_id": uuid.UUID(CAT_ID)})


def test_a_model_and_a_payload_together_raise() -> None:
    model = CatRequestedAFishEvent(cat_id=CAT_ID)  # type: ignore[arg-type]
    with pytest.raises(MultiplePayloadsDetectedDuringDispatch) as raised:
        dispatch(model, {"cat_id": CAT_ID})
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, FastapiEventError)


def test_a_model_without_an_event_name_raises() -> None:
    class Unnamed(pydantic.BaseModel):
        x: int

    with pytest.raises(MissingEventNameDuringDispatch):
        dispatch(Unnamed(x=1))
    with pytest.raises(MissingEventNameDuringDispatch):
        dispatch()
    with pytest.raises(TypeError, match="str or an Enum"):
        dispatch(event_name=42)  # type: ignore[arg-type]


# -- payload validation -----------------------------------------------------------------------------------


class UserEvents(enum.Enum):
    SIGNED_UP = "USER_SIGNED_UP"
    ACTIVATED = "USER_ACTIVATED"


def register_sign_up() -> type[pydantic.BaseModel]:
    @registry.register(event_name=UserEvents.SIGNED_UP)
    class SignUpPayload(pydantic.BaseModel):
        user_id: uuid.UUID
        created_at: datetime
        referrer: str | None = None

    return SignUpPayload


async def test_payloads_are_validated_at_dispatch_in_the_caller() -> None:
    schema = register_sign_up()
    user_id = "9e79cdbb-b216-40f7-9a05-20d223dee89a"
    now = datetime.now(UTC)
    raised: list[type[BaseException]] = []

    def body() -> None:
        for bad in (None, {"user_id": user_id}):  # missing payload, missing created_at
            try:
                dispatch(UserEvents.SIGNED_UP, bad)
            except pydantic.ValidationError as exc:
                raised.append(type(exc))
        dispatch(UserEvents.SIGNED_UP, {"user_id": user_id, "created_at": now})
        dispatch(UserEvents.ACTIVATED, {"user_id": user_id, "anything": "goes"})  # no schema
        dispatch(schema(user_id=user_id, created_at=now), event_name=UserEvents.SIGNED_UP)  # not re-validated

    log = await run_endpoint(LocalHandler(), body)
    assert len(raised) == 2
    assert log[2:] == [
        (UserEvents.SIGNED_UP, {"user_id": uuid.UUID(user_id), "created_at": now}),
        (UserEvents.ACTIVATED, {"user_id": user_id, "anything": "goes"}),
        (UserEvents.SIGNED_UP, {"user_id": uuid.UUID(user_id), "created_at": now}),
    ]
    assert log[2][0] is UserEvents.SIGNED_UP  # the member itself, as fastapi-events passes it


async def test_a_schema_named_by_event_name_attribute_validates_str_names() -> None:
    @registry.register
    class Refund(pydantic.BaseModel):
        __event_name__ = "order.refunded"
        order_id: int
        amount: float = 0.0

    def body() -> None:
        dispatch("order.refunded", {"order_id": "7"})
        dispatch("order.refunded", {"order_id": "7"}, payload_schema_dump=False)
        dispatch("order.refunded", {"order_id": "x"}, validate_payload=False)

    log = await run_endpoint(LocalHandler(), body)
    assert log[2] == ("order.refunded", {"order_id": 7})
    assert log[3] == ("order.refunded", Refund(order_id=7))
    assert log[4] == ("order.refunded", {"order_id": "x"})
    with pytest.raises(pydantic.ValidationError):
        dispatch("order.refunded", {"order_id": "x"})


async def test_a_registry_of_ones_own_and_an_empty_one() -> None:
    mine = EventPayloadSchemaRegistry()
    empty = EventPayloadSchemaRegistry()

    @mine.register(event_name="ping")
    class Ping(pydantic.BaseModel):
        n: int

    @registry.register(event_name="ping")
    class StrictPing(pydantic.BaseModel):
        n: int
        source: str

    def body() -> None:
        dispatch("ping", {"n": "1"}, payload_schema_registry=mine)
        with pytest.raises(pydantic.ValidationError):
            dispatch("ping", {"n": "1"}, payload_schema_registry=empty)  # empty: the default registry

    log = await run_endpoint(LocalHandler(), body)
    assert log[2:] == [("ping", {"n": 1})]


def test_registering_a_schema_needs_a_name_and_a_model() -> None:
    from tidings.compat.fastapi_events.errors import MissingEventNameDuringRegistration

    class NoName(pydantic.BaseModel):
        x: int

    with pytest.raises(MissingEventNameDuringRegistration):
        registry.register(NoName)
    with pytest.raises(AssertionError, match="Pydantic BaseModel"):
        registry.register(event_name="x")(dict)


# -- event names ------------------------------------------------------------------------------------------


class Colour(enum.StrEnum):
    RED = "colour.red"


async def test_enum_names_match_patterns_as_in_fastapi_events() -> None:
    handler = LocalHandler()
    seen: list[tuple[str, Any]] = []

    @handler.register(event_name="UserEvents.*")  # a plain Enum member matches as str(member)
    async def by_class(event: Event) -> None:
        seen.append(("by_class", event[0]))

    @handler.register(event_name=UserEvents.ACTIVATED)  # registered with the member itself
    async def by_member(event: Event) -> None:
        seen.append(("by_member", event[0]))

    @handler.register(event_name="colour.*")  # a str-valued member matches as its value
    async def by_value(event: Event) -> None:
        seen.append(("by_value", event[0]))

    def body() -> None:
        dispatch(UserEvents.ACTIVATED)
        dispatch(Colour.RED, {"hex": "#f00"})
        dispatch("USER_ACTIVATED")  # the value of a plain Enum member is just another name

    await run_endpoint(handler, body)
    assert seen == [
        ("by_class", UserEvents.ACTIVATED),
        ("by_member", UserEvents.ACTIVATED),
        ("by_value", Colour.RED),
    ]
    assert seen[0][1] is UserEvents.ACTIVATED
    assert seen[2][1] is Colour.RED


class Level(enum.Enum):
    HIGH = 3  # no str value: emit() refuses it, dispatch() names it "Level.HIGH"


async def test_assert_emitted_finds_an_enum_event_under_the_name_it_was_emitted_with() -> None:
    bus = EventBus()

    async def endpoint(request: Request) -> Response:
        dispatch(UserEvents.SIGNED_UP, {"user_id": 1})  # "UserEvents.SIGNED_UP", as in fastapi-events
        dispatch(Colour.RED, {"hex": "#f00"})  # "colour.red"
        dispatch(Level.HIGH)
        tidings.emit(UserEvents.ACTIVATED, {"user_id": 1})  # tidings' own: "USER_ACTIVATED"
        return PlainTextResponse("ok")

    app = starlette_app([LocalHandler()], [Route("/", endpoint)], bus=bus)
    with capture(bus) as events:
        async with lifespan(app):
            await call_asgi(app)
    assert events.names == ["UserEvents.SIGNED_UP", "colour.red", "Level.HIGH", "USER_ACTIVATED"]
    events.assert_emitted_once(UserEvents.SIGNED_UP, user_id=1)
    events.assert_emitted_once(Colour.RED, hex="#f00")
    events.assert_emitted_once(Level.HIGH)
    events.assert_emitted_once(UserEvents.ACTIVATED, user_id=1)
    events.assert_not_emitted(UserEvents.SIGNED_UP, user_id=2)
    with pytest.raises(AssertionError, match=r"'USER_SIGNED_UP' or 'UserEvents\.SIGNED_UP'"):
        events.assert_not_emitted(UserEvents.SIGNED_UP)


# -- where events go --------------------------------------------------------------------------------------


async def test_events_dispatched_by_handlers_chain_in_order(recorder: Recorder) -> None:
    handler = LocalHandler()
    log: list[Any] = []

    @handler.register(event_name="order.placed")
    async def reserve(event: Event) -> None:
        log.append("reserve")
        dispatch("stock.reserved", {"order": event[1]})
        log.append("reserve done")

    @handler.register(event_name="stock.*")
    def ship(event: Event) -> None:  # a plain def handler dispatching from its worker thread
        log.append(event)
        dispatch("shipment.created", event[1])

    @handler.register(event_name="shipment.created")
    async def notify(event: Event) -> None:
        log.append(event)

    async def endpoint(request: Request) -> Response:
        dispatch("order.placed", 7)
        return PlainTextResponse("ok")

    app = starlette_app([handler], [Route("/", endpoint)])
    async with lifespan(app):
        await call_asgi(app, "/", log)
        # chained events are handled by the request's own job: done when the app call returns
        assert log == [
            "start",
            "body",
            "reserve",
            "reserve done",
            ("stock.reserved", {"order": 7}),
            ("shipment.created", {"order": 7}),
        ]


async def test_sync_endpoints_dispatch_from_their_worker_thread() -> None:
    from fastapi import FastAPI

    from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware

    handler = LocalHandler()
    seen: list[Event] = []

    @handler.register
    async def record(event: Event) -> None:
        seen.append(event)

    app = FastAPI()
    app.add_middleware(EventHandlerASGIMiddleware, handlers=[handler])

    @app.get("/")
    def index() -> dict[str, str]:
        dispatch("sync.first", threading.get_ident())
        dispatch("sync.second")
        return {}

    async with lifespan(app), client(app) as http:
        assert (await http.get("/")).status_code == 200
    assert [name for name, _ in seen] == ["sync.first", "sync.second"]
    assert seen[0][1] != threading.get_ident()


async def test_middleware_id_reaches_the_middleware_from_a_task_started_at_startup(
    recorder: Recorder,
) -> None:
    """The README's "dispatching events outside of a request" example."""
    app_id = 9_000_001
    tasks: list[asyncio.Task[None]] = []

    async def dispatch_task() -> None:
        for i in range(3):
            dispatch("date", payload={"idx": i}, middleware_id=app_id)
            await asyncio.sleep(0)

    @asynccontextmanager
    async def startup(app: Starlette) -> AsyncIterator[None]:
        # a context of its own: nothing here knows the app or its middleware
        tasks.append(asyncio.create_task(dispatch_task(), context=contextvars.Context()))
        yield
        await tasks[0]

    app = starlette_app([recording_handler(recorder)], [], middleware_id=app_id, lifespan=startup)
    async with lifespan(app):
        await recorder.wait_count(3)
    assert recorder.items == [("date", {"idx": 0}), ("date", {"idx": 1}), ("date", {"idx": 2})]


async def test_middleware_id_picks_one_of_several_apps(recorder: Recorder) -> None:
    first, second = Recorder(), Recorder()
    app_a = starlette_app([recording_handler(first)], [], middleware_id=9_000_002)
    app_b = starlette_app([recording_handler(second)], [], middleware_id=9_000_003)
    async with lifespan(app_a), lifespan(app_b):
        dispatch("to.b", 1, middleware_id=9_000_003)
        dispatch("to.a", 2, middleware_id=9_000_002)
        await first.wait_count(1)
        await second.wait_count(1)
    assert first.items == [("to.a", 2)]
    assert second.items == [("to.b", 1)]


async def test_middleware_id_of_the_outer_of_two_middlewares_waits_for_the_response() -> None:
    """A request that passes through both middlewares is one of the outer one's requests too.

    The endpoint waits until the outer bus has handled a probe dispatched outside any request after
    its event: an event handed to that bus at once would have been handled by then.
    """
    log: list[Any] = []
    probe_handled = asyncio.Event()

    def logging_handler(label: str) -> LocalHandler:
        handler = LocalHandler()

        @handler.register(event_name="*")
        async def record(event: Event) -> None:
            if event[0] == "probe":
                probe_handled.set()
            else:
                log.append(f"{label}:{event[0]}")

        return handler

    async def endpoint(request: Request) -> Response:
        dispatch("to.inner", middleware_id=9_000_102)
        dispatch("to.outer", middleware_id=9_000_101)
        contextvars.Context().run(dispatch, "probe", None, middleware_id=9_000_101)
        with anyio.fail_after(5):
            await probe_handled.wait()
        return PlainTextResponse("ok")

    outer = Middleware(
        EventHandlerASGIMiddleware, handlers=[logging_handler("outer")], middleware_id=9_000_101
    )
    inner = Middleware(
        EventHandlerASGIMiddleware, handlers=[logging_handler("inner")], middleware_id=9_000_102
    )
    app = Starlette(routes=[Route("/", endpoint)], middleware=[outer, inner])
    async with lifespan(app):
        await call_asgi(app, "/", log)
    assert log == ["start", "body", "inner:to.inner", "outer:to.outer"]


async def test_an_unknown_middleware_id_is_warned_about_and_ignored(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    unknown = uuid.uuid4().int  # warned about once per process
    app = starlette_app([recording_handler(recorder)], [], middleware_id=9_000_004)
    async with lifespan(app):
        with caplog.at_level(logging.WARNING, logger="tidings"):
            dispatch("lost?", 1, middleware_id=unknown)  # the only running bus gets it
            dispatch("lost?", 2, middleware_id=unknown)
        await recorder.wait_count(2)
    assert [r.getMessage().count(str(unknown)) for r in caplog.records] == [1]


async def test_outside_any_request_dispatch_is_logged_and_dropped_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """fastapi-events raised LookupError here; tidings never fails the caller for it."""
    with caplog.at_level(logging.ERROR, logger="tidings"):
        dispatch("nobody.listens", {"x": 1})
    assert "'nobody.listens' was dropped" in caplog.text
    assert "middleware_id" in caplog.text


async def test_outside_any_request_the_single_running_bus_gets_it(recorder: Recorder) -> None:
    app = starlette_app([recording_handler(recorder)], [])
    async with lifespan(app):
        await asyncio.to_thread(dispatch, "from.a.thread", 1)  # no context at all
        await recorder.wait_count(1)
    assert recorder.items == [("from.a.thread", 1)]


async def test_two_running_buses_and_no_middleware_id_drop_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus_a, bus_b = EventBus(name="a"), EventBus(name="b")
    async with bus_a, bus_b:
        with caplog.at_level(logging.ERROR, logger="tidings"):
            await asyncio.to_thread(dispatch, "which.one")
    assert "2 buses are running" in caplog.text


# -- FASTAPI_EVENTS_DISABLE_DISPATCH ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "True", "yes", "on", "t", "Y"])
async def test_a_truthy_disable_variable_silences_requests_startup_and_tasks(
    value: str, monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", value)

    @asynccontextmanager
    async def startup(app: Starlette) -> AsyncIterator[None]:
        dispatch("in.startup")
        yield

    async def endpoint(request: Request) -> Response:
        dispatch("in.request")
        return PlainTextResponse("ok")

    app = starlette_app([recording_handler(recorder)], [Route("/", endpoint)], lifespan=startup)
    async with lifespan(app):
        await call_asgi(app)
        dispatch("from.the.test", middleware_id=None)
        monkeypatch.delenv("FASTAPI_EVENTS_DISABLE_DISPATCH")
        await call_asgi(app)  # read again at the next request
    assert recorder.items == [("in.request", None)]


async def test_a_disabled_dispatch_leaves_native_emit_handled_after_the_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The switch is fastapi-events' own: tidings' emit() in the same app keeps its meaning.

    The handlers of a request's events go by the request's reading of the switch; those of an event
    emitted at startup, which no request read it for, read it themselves.
    """
    monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", "1")
    log: list[Any] = []
    bus = EventBus()

    @bus.on("*")
    async def native(event: tidings.Event) -> None:
        log.append(event.name)
        if event.name in ("emitted", "boot"):
            dispatch("from.a.handler")

    async def endpoint(request: Request) -> Response:
        dispatch("dispatched")
        tidings.emit("emitted")
        log.append("endpoint returns")
        return PlainTextResponse("ok")

    @asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        tidings.emit("boot")
        yield

    app = starlette_app([LocalHandler()], [Route("/", endpoint)], bus=bus, lifespan=app_lifespan)
    async with lifespan(app):
        with anyio.fail_after(5):
            await bus.drain()
            assert log == ["boot"]
            await call_asgi(app, "/", log)  # handlers run in the request, after the response
        assert log == ["boot", "endpoint returns", "start", "body", "emitted"]
    assert log == ["boot", "endpoint returns", "start", "body", "emitted"]


async def test_every_dispatch_of_a_request_goes_by_the_reading_at_its_start(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    """A str name takes the fast path, an Enum one the slow path: both keep the request's reading."""

    async def turn_off(request: Request) -> Response:
        monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", "1")
        dispatch("fast")
        dispatch(UserEvents.SIGNED_UP)
        return PlainTextResponse("ok")

    async def turn_on(request: Request) -> Response:
        monkeypatch.delenv("FASTAPI_EVENTS_DISABLE_DISPATCH")
        dispatch("dropped.fast")
        dispatch(UserEvents.SIGNED_UP, {"dropped": True})
        return PlainTextResponse("ok")

    app = starlette_app([recording_handler(recorder)], [Route("/off", turn_off), Route("/on", turn_on)])
    async with lifespan(app):
        await call_asgi(app, "/off")  # dispatch was on when this request started
        await call_asgi(app, "/on")  # and off when this one did
    assert recorder.items == [("fast", None), (UserEvents.SIGNED_UP, None)]


async def test_dispatch_under_tidings_own_middleware_reads_the_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", "1")
    log: list[str] = []
    bus = EventBus()

    @bus.on("*")
    async def native(event: tidings.Event) -> None:
        log.append(event.name)

    async def endpoint(request: Request) -> Response:
        dispatch("dispatched")
        tidings.emit("emitted")
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(tidings.TidingsMiddleware, bus=bus)]
    )
    async with lifespan(app):
        await call_asgi(app)
    assert log == ["emitted"]


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "", "not-a-truth-value"])
async def test_other_values_leave_dispatch_on(
    value: str, monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", value)

    async def endpoint(request: Request) -> Response:
        dispatch("in.request")
        return PlainTextResponse("ok")

    app = starlette_app([recording_handler(recorder)], [Route("/", endpoint)])
    async with lifespan(app):
        await call_asgi(app)
    assert recorder.items == [("in.request", None)]


async def test_a_value_that_is_no_truth_value_is_warned_about_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """fastapi-events raised ValueError from every dispatch(); a typo should not fail every request."""
    value = f"maybe-{uuid.uuid4().hex}"  # each value is warned about once per process
    monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", value)
    app = starlette_app([LocalHandler()], [Route("/", lambda request: PlainTextResponse("ok"))])
    with caplog.at_level(logging.WARNING, logger="tidings"):
        async with lifespan(app):
            await call_asgi(app)
            await call_asgi(app)
    # (other tidings records may land here, e.g. from a bus an earlier test left to its loop's close)
    assert [r.getMessage().count(value) for r in caplog.records if value in r.getMessage()] == [1]


async def test_validation_errors_are_raised_even_while_dispatch_is_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register_sign_up()
    monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", "1")
    with pytest.raises(pydantic.ValidationError):
        dispatch(UserEvents.SIGNED_UP, {"user_id": "not a uuid"})
