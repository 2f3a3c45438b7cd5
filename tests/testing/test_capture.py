"""``tidings.testing`` without pytest's plugin: capture, assertions and their messages, settle, inline."""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import httpx
import pydantic
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import tidings
from tidings import Arguments, Event, EventBus, RetryPolicy, TidingsMiddleware, emit
from tidings._core.default import reset_default_bus
from tidings.testing import EventCapture, capture, inline_handlers, settle, settle_sync

from ..conftest import Recorder

pytestmark = pytest.mark.anyio


@dataclass
class UserCreated:
    __event_name__ = "user.created"
    id: int
    email: str


class OrderPlaced(pydantic.BaseModel):
    __event_name__ = "order.placed"
    order_id: int
    total: float


class Topic(enum.Enum):
    SIGNED_UP = "user.signed_up"


@pytest.fixture
def events(bus: EventBus) -> Iterator[EventCapture]:
    with capture(bus) as captured:
        yield captured


# -- matching -------------------------------------------------------------------------------------------
def test_names_patterns_and_enums_match(bus: EventBus, events: EventCapture) -> None:
    bus.emit("user.created", {"id": 1})
    bus.emit(Topic.SIGNED_UP, {"id": 1})
    assert events.names == ["user.created", "user.signed_up"]
    assert events.assert_emitted("user.created").payload == {"id": 1}
    assert events.assert_emitted(Topic.SIGNED_UP).name == "user.signed_up"
    assert [e.name for e in events.find("user.*")] == ["user.created", "user.signed_up"]
    assert [e.name for e in events.find("user.?igned_up")] == ["user.signed_up"]
    assert len(events.find()) == len(events) == 2
    events.assert_not_emitted("order.*")
    events.assert_not_emitted("user")  # exact names are not prefixes


def test_typed_events_match_by_class_instance_and_fields(bus: EventBus, events: EventCapture) -> None:
    bus.emit(UserCreated(id=1, email="ada@example.com"))
    bus.emit(OrderPlaced(order_id=7, total=9.5))
    bus.emit("user.created", {"id": 2, "email": "bob@example.com"})  # no schema: a dict, same name
    assert events.find(UserCreated)[0].payload == UserCreated(1, "ada@example.com")
    assert len(events.find(UserCreated)) == 2  # the class matches its event name too
    [bob] = events.find(UserCreated, email="bob@example.com")
    assert bob.payload == {"id": 2, "email": "bob@example.com"}
    assert events.assert_emitted(OrderPlaced, order_id=7, total=pytest.approx(9.5)).name == "order.placed"
    assert events.assert_emitted(OrderPlaced(order_id=7, total=9.5)).name == "order.placed"
    events.assert_not_emitted(OrderPlaced(order_id=8, total=9.5))
    events.assert_not_emitted(UserCreated, id=3)
    assert events.payloads(OrderPlaced) == [OrderPlaced(order_id=7, total=9.5)]


def test_a_typed_event_matches_under_the_name_its_bus_registered_it_by(
    bus: EventBus, events: EventCapture
) -> None:
    @dataclass
    class SignUp:
        user_id: int

    bus.schema(SignUp, name="user.signed_up")
    bus.emit(SignUp(user_id=1))
    bus.emit("user.signed_up", {"user_id": 2})
    assert events.assert_emitted(SignUp(user_id=1)).name == "user.signed_up"
    assert events.assert_emitted_once(SignUp(user_id=2)).payload == SignUp(user_id=2)
    events.assert_not_emitted(SignUp(user_id=3))
    with pytest.raises(AssertionError, match=r"no event 'user.signed_up' with payload .*SignUp\(user_id=3\)"):
        events.assert_emitted(SignUp(user_id=3))


def test_a_class_matches_instances_of_subclasses(bus: EventBus, events: EventCapture) -> None:
    class Base(pydantic.BaseModel):
        __event_name__ = "base"
        n: int

    class Child(Base):
        __event_name__ = "child"

    bus.emit(Child(n=1))
    assert events.assert_emitted(Base, n=1).name == "child"
    events.assert_not_emitted(Child, n=2)


def test_payloads_and_fields_of_every_kind(bus: EventBus, events: EventCapture) -> None:
    bus.emit("paid", Arguments(("order-1", 9.99), {"currency": "EUR"}))
    bus.emit("note", "hello")
    bus.emit("none")
    events.assert_emitted("paid", currency="EUR")
    events.assert_emitted("paid", Arguments(("order-1", 9.99), {"currency": "EUR"}))
    events.assert_emitted("note", "hello")
    events.assert_not_emitted("note", upper=mock.ANY)  # a str has methods, not fields
    events.assert_emitted("none", None)
    events.assert_not_emitted("none", {})
    events.assert_emitted(None, currency=mock.ANY)
    assert events.find(payload=1) == []  # a field named like the positional parameters


def test_assert_emitted_once_and_clear(bus: EventBus, events: EventCapture) -> None:
    bus.emit("ping", {"n": 1})
    bus.emit("ping", {"n": 2})
    assert events.assert_emitted_once("ping", n=2).payload == {"n": 2}
    with pytest.raises(AssertionError) as raised:
        events.assert_emitted_once("ping")
    assert str(raised.value).splitlines() == [
        "'ping' was emitted 2 times, not once:",
        "  #1 ping {'n': 1}",
        "  #2 ping {'n': 2}",
    ]
    with pytest.raises(AssertionError, match="no event 'ping' with n=3 was emitted"):
        events.assert_emitted_once("ping", n=3)
    events.clear()
    assert len(events) == 0
    events.assert_not_emitted()


def test_bad_arguments_are_type_errors(events: EventCapture) -> None:
    with pytest.raises(TypeError, match="expected an event name"):
        events.assert_emitted(42)
    with pytest.raises(TypeError, match="not both"):
        events.find(UserCreated(id=1, email="x"), {"id": 1})
    with pytest.raises(TypeError, match="takes EventBus objects"):
        capture("bus")  # type: ignore[arg-type]


async def test_waiting_helpers_given_an_app_instead_of_its_bus_are_type_errors(bus: EventBus) -> None:
    app = Starlette(middleware=[Middleware(TidingsMiddleware, bus=bus)])
    with pytest.raises(TypeError, match=r"settle\(\) takes EventBus objects, got <starlette"):
        await settle(bus, app)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"settle_sync\(\) takes EventBus objects"):
        await asyncio.to_thread(settle_sync, app)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"inline_handlers\(\) takes EventBus objects"):
        inline_handlers(bus, app).__enter__()  # type: ignore[arg-type]
    assert bus.request_handlers == "inline" and not hasattr(app, "request_handlers")


# -- failure messages -----------------------------------------------------------------------------------
def test_a_missing_event_lists_the_closest_first_then_everything(bus: EventBus, events: EventCapture) -> None:
    bus.emit("user.created", {"id": 1, "email": "x@example.com"})
    bus.emit("order.placed", {"id": 9})
    bus.emit("user.created", {"id": 2})
    with pytest.raises(AssertionError) as raised:
        events.assert_emitted("user.created", email="ada@example.com", id=1)
    assert str(raised.value) == (
        "no event 'user.created' with email='ada@example.com', id=1 was emitted.\n"
        "Events 'user.created' that differ (2):\n"
        "  #1 user.created {'id': 1, 'email': 'x@example.com'}: "
        "email is 'x@example.com', not 'ada@example.com'\n"
        "  #3 user.created {'id': 2}: no field 'email', id is 2, not 1\n"
        "Every event emitted (3), in order:\n"
        "  #1 user.created {'id': 1, 'email': 'x@example.com'}\n"
        "  #2 order.placed {'id': 9}\n"
        "  #3 user.created {'id': 2}"
    )


def test_a_misspelt_name_gets_a_suggestion(bus: EventBus, events: EventCapture) -> None:
    bus.emit("user.created", {"id": 1})
    with pytest.raises(AssertionError) as raised:
        events.assert_emitted("user.create")
    assert "Did you mean 'user.created'?" in str(raised.value)
    with pytest.raises(AssertionError, match=r"payload \{'id': 2\}") as raised:
        events.assert_emitted("user.created", {"id": 2})
    assert "#1 user.created {'id': 1}: another payload" in str(raised.value)


def test_nothing_captured_says_which_bus_was_watched(bus: EventBus, events: EventCapture) -> None:
    other = EventBus(name="other")
    other.emit("user.created")
    with pytest.raises(AssertionError) as raised:
        events.assert_emitted("user.created")
    message = str(raised.value)
    assert "No event at all was emitted on the captured bus(es) 'test'" in message
    assert "tidings_bus" in message


def test_assert_not_emitted_lists_the_offenders(bus: EventBus, events: EventCapture) -> None:
    for n in range(25):
        bus.emit("spam", {"n": n, "text": "x" * 200})
    with pytest.raises(AssertionError) as raised:
        events.assert_not_emitted("spam")
    lines = str(raised.value).splitlines()
    assert lines[0] == "expected no 'spam', but 25 event(s) were emitted:"
    assert lines[1].startswith("  #1 spam {'n': 0, 'text': 'xxx") and lines[1].endswith("...")
    assert lines[-1] == "  ... and 5 more"
    with pytest.raises(AssertionError) as raised:
        events.assert_emitted("ham")
    assert str(raised.value).splitlines()[-1] == "  ... and 5 more"
    assert repr(events).startswith("<EventCapture 25 event(s): 'spam', 'spam'")


# -- what the tap sees ----------------------------------------------------------------------------------
def test_a_bus_named_twice_is_captured_once(bus: EventBus) -> None:
    with capture(bus, bus) as events:
        bus.emit("user.created", {"id": 1})
    assert events.buses == (bus,)
    events.assert_emitted_once("user.created")


def test_capture_stops_at_the_end_of_the_block_and_defaults_to_the_default_bus() -> None:
    reset_default_bus()
    try:
        with capture() as events:
            tidings.default_bus().emit("seen")
        tidings.default_bus().emit("not seen")
        assert events.names == ["seen"]
        assert repr(capture(EventBus())) == "<EventCapture no events>"
    finally:
        reset_default_bus()


async def test_events_of_requests_are_captured_before_handlers_run(bus: EventBus, recorder: Recorder) -> None:
    order: list[str] = []

    @bus.on("page.viewed")
    async def handler(event: Event) -> None:
        order.append("handler")

    async def endpoint(request: Request) -> Response:
        emit("page.viewed", {"path": "/"})
        emit("unheard.of")  # nobody handles it: captured anyway
        order.append("endpoint")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)], middleware=[Middleware(TidingsMiddleware, bus=bus)])
    with capture(bus) as events:
        bus.tap(lambda event: order.append(f"emitted {event.name}"))
        async with (
            bus,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
        ):
            assert (await client.get("/")).status_code == 200
    assert order == ["emitted page.viewed", "emitted unheard.of", "endpoint", "handler"]
    events.assert_emitted("page.viewed", path="/")
    events.assert_emitted("unheard.of")


# -- waiting --------------------------------------------------------------------------------------------
async def test_settle_waits_for_chains_outside_events_and_retries_due_soon(
    bus: EventBus, events: EventCapture
) -> None:
    done: list[str] = []
    attempts: list[int] = []

    @bus.on("order.placed")
    async def place(event: Event) -> None:
        await asyncio.sleep(0)
        emit("invoice.created", event.payload)

    @bus.on("invoice.created", retry=RetryPolicy(max_attempts=3, backoff=0.01, jitter=0))
    def invoice(event: Event) -> None:  # a thread; fails once, then succeeds on its retry
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("mail server down")
        done.append("invoice")

    async with bus:
        bus.emit("order.placed", {"id": 1})
        await settle(bus, timeout=5)
        assert done == ["invoice"] and len(attempts) == 2
        events.assert_emitted("invoice.created", id=1)
        await events.settle()  # nothing left: returns at once


async def test_settle_leaves_retries_due_after_its_bound(bus: EventBus) -> None:
    @bus.on("flaky", retry=RetryPolicy(max_attempts=2, backoff=60, jitter=0))
    async def flaky(event: Event) -> None:
        raise ConnectionError("down")

    async with bus:
        bus.emit("flaky")
        await settle(bus, timeout=0.5)  # the retry is a minute away: not waited for
        assert len(bus._runner.retries) == 1
    assert not bus._runner.retries  # closing the bus abandoned it


async def test_settle_waits_for_an_async_failure_hook_and_what_it_emits() -> None:
    gate = asyncio.Event()
    reported: list[str] = []
    alerts: list[object] = []

    async def on_failure(error: tidings.HandlerError) -> None:  # a bus task of its own
        await gate.wait()
        reported.append(error.handler)
        emit("alert.raised", {"handler": error.handler})

    bus = EventBus(on_failure=on_failure, name="hooked")

    @bus.on("charge")
    async def charge(event: Event) -> None:
        raise ConnectionError("card processor down")

    @bus.on("alert.raised")
    async def page(handler: str) -> None:
        alerts.append(handler)

    async with bus:
        bus.emit("charge")
        with pytest.raises(TimeoutError, match=r"\(1 call\(s\)\):\n  a call of the on_failure hook, still"):
            await settle(bus, timeout=0.05)
        gate.set()
        await settle(bus)
        assert reported == alerts == [charge.__module__ + "." + charge.__qualname__]


async def test_settle_times_out_naming_the_unfinished_calls_and_cancels_nothing(bus: EventBus) -> None:
    gate = asyncio.Event()
    finished: list[str] = []

    @bus.on("report.requested")
    async def build(event: Event) -> None:
        await gate.wait()
        finished.append("built")

    async with bus:
        bus.emit("report.requested")
        with pytest.raises(TimeoutError) as raised:
            await settle(bus, timeout=0.05)
        message = str(raised.value)
        assert message.startswith("bus 'test' still had handler work after 0.05s (1 call(s)):")
        assert "test_capture.test_settle_times_out_naming_the_unfinished_calls_and_cancels_nothing" in message
        assert "<- report.requested (" in message
        gate.set()
        await settle(bus)
        assert finished == ["built"]


async def test_settle_names_a_sync_call_still_running_past_its_timeout() -> None:
    gate = threading.Event()
    timed_out = asyncio.Event()
    bus = EventBus(on_failure=lambda error: timed_out.set(), name="slow")

    @bus.on("export.requested", timeout=0.01)
    def export(event: Event) -> None:  # its thread cannot be stopped: it runs on past the timeout
        assert gate.wait(5)

    async with bus:
        bus.emit("export.requested")
        await asyncio.wait_for(timed_out.wait(), 5)
        with pytest.raises(TimeoutError) as raised:
            await settle(bus, timeout=0.05)
        assert "(1 call(s))" in str(raised.value)
        assert f"{export.__module__}.{export.__qualname__} <- export.requested (" in str(raised.value)
        assert "past its timeout, still running in its thread" in str(raised.value)
        gate.set()
        await settle(bus)


async def test_settle_reaches_a_bus_on_another_threads_loop(bus: EventBus) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gate = threading.Event()
    done: list[str] = []

    @bus.on("slow")
    def slow(event: Event) -> None:
        assert gate.wait(5)
        done.append("slow")

    try:
        asyncio.run_coroutine_threadsafe(bus.start(), loop).result(5)
        bus.emit("slow")  # from this thread: handed to the bus's loop
        with pytest.raises(TimeoutError, match="slow <- slow"):
            await settle(bus, timeout=0.05)
        gate.set()
        await settle(bus)
        assert done == ["slow"]
        with pytest.raises(RuntimeError, match="use await settle"):
            settle_sync(bus)  # this thread runs the test's loop: blocking it is refused
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(bus.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_settle_sync_from_a_plain_thread(bus: EventBus) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    done: list[str] = []

    @bus.on("work")
    async def work(event: Event) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        done.append("work")

    try:
        asyncio.run_coroutine_threadsafe(bus.start(), loop).result(5)
        with capture(bus) as events:
            bus.emit("work")
            events.settle_sync()
        assert done == ["work"]
        settle_sync(EventBus())  # never started: nothing to wait for
    finally:
        asyncio.run_coroutine_threadsafe(bus.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    settle_sync(bus)  # closed: nothing to wait for


def test_a_bus_whose_loop_is_not_running_cannot_settle(bus: EventBus) -> None:
    @bus.on("stuck")
    async def stuck(event: Event) -> None: ...

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(bus.start())
        bus.emit("stuck")  # accepted, but the loop stopped before running it
        with pytest.raises(RuntimeError, match="its event loop is not running"):
            settle_sync(bus)
        with pytest.raises(RuntimeError, match="its event loop is not running"):
            asyncio.run(settle(bus))
        loop.run_until_complete(bus.aclose())
    finally:
        loop.close()
    idle = EventBus()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(idle.start())
        settle_sync(idle)  # nothing pending: fine even with its loop stopped
        asyncio.run(settle(idle))
        loop.run_until_complete(idle.aclose())
    finally:
        loop.close()


def test_a_bus_whose_loop_is_not_running_cannot_settle_a_retry_or_a_call_left_behind() -> None:
    failures = Recorder()
    release = threading.Event()
    bus = EventBus(on_failure=failures.add, name="stopped")

    @bus.on("flaky", retry=RetryPolicy(max_attempts=2, backoff=30, jitter=False))
    async def flaky(event: Event) -> None:
        raise ConnectionError("once")

    @bus.on("hangs", timeout=0.01)
    def hangs(event: Event) -> None:
        assert release.wait(5)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(bus.start())
        bus.emit("flaky")  # fails once: its retry is due in 30 s, on a loop that is not running
        loop.run_until_complete(failures.wait_count(1))
        with pytest.raises(RuntimeError, match=r"its event loop is not running.*flaky <- flaky, retry due"):
            settle_sync(bus, timeout=60)
        with pytest.raises(RuntimeError, match="its event loop is not running"):
            asyncio.run(settle(bus, timeout=60))
        settle_sync(bus, timeout=1)  # due after the timeout: left alone, as on a running loop
        bus.emit("hangs")  # past its timeout, it runs on in its thread, whose end goes to the loop
        loop.run_until_complete(failures.wait_count(2))
        with pytest.raises(RuntimeError, match=r"hangs <- hangs .*, past its timeout, still running"):
            settle_sync(bus, timeout=1)
        release.set()
        loop.run_until_complete(bus.aclose())
    finally:
        release.set()
        loop.close()


def test_a_bus_whose_loop_is_not_running_cannot_settle_a_call_of_its_async_failure_hook() -> None:
    loop = asyncio.new_event_loop()
    hook_started = Recorder()
    hook_may_end = asyncio.Event()

    async def on_failure(error: Exception) -> None:
        hook_started.add(error)
        await hook_may_end.wait()

    bus = EventBus(on_failure=on_failure, name="stopped")

    @bus.on("fails")
    async def fails(event: Event) -> None:
        raise ValueError("reported to the hook")

    try:
        loop.run_until_complete(bus.start())
        bus.emit("fails")
        loop.run_until_complete(hook_started.wait_count(1))
        with pytest.raises(
            RuntimeError, match="not running, so it cannot finish: a call of the on_failure hook"
        ):
            settle_sync(bus)
        hook_may_end.set()
        loop.run_until_complete(bus.aclose())
    finally:
        loop.close()


async def test_wait_for_returns_an_event_emitted_later(bus: EventBus, events: EventCapture) -> None:
    async def later() -> None:
        await asyncio.sleep(0)
        bus.emit("report.ready", {"id": 3})

    bus.emit("report.queued")
    assert (await events.wait_for("report.queued")).name == "report.queued"  # emitted already
    async with bus:
        task = asyncio.create_task(later())
        event = await events.wait_for("report.ready", id=3, timeout=5)
        await task
    assert event.payload == {"id": 3}
    with pytest.raises(AssertionError, match=r"no event 'report\.failed' was emitted within 0\.01s"):
        await events.wait_for("report.failed", timeout=0.01)
    with pytest.raises(RuntimeError, match=r"use await capture\.wait_for"):
        events.wait_for_sync("report.ready")


def test_wait_for_sync_returns_an_event_emitted_by_another_thread(
    bus: EventBus, events: EventCapture
) -> None:
    thread = threading.Thread(target=bus.emit, args=("job.done", {"n": 1}))
    thread.start()
    assert events.wait_for_sync("job.done", n=1, timeout=5).payload == {"n": 1}
    thread.join(5)
    with pytest.raises(AssertionError, match=r"no event 'job\.failed' was emitted within 0\.01s"):
        events.wait_for_sync("job.failed", timeout=0.01)


async def test_a_waiter_on_a_closed_loop_does_not_break_recording(
    bus: EventBus, events: EventCapture
) -> None:
    def wait_elsewhere() -> None:
        async def main() -> None:
            with pytest.raises(AssertionError):
                await events.wait_for("never", timeout=0.01)

        asyncio.run(main())

    thread = threading.Thread(target=wait_elsewhere)
    thread.start()
    thread.join(5)
    bus.emit("after")
    assert events.names == ["after"]


# -- inline handlers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("inline", [False, True])
async def test_inline_handlers_run_a_task_mode_bus_handlers_in_the_request(inline: bool) -> None:
    bus = EventBus(request_handlers="task")
    tasks: dict[str, asyncio.Task[object] | None] = {}

    @bus.on("seen")
    async def handler(event: Event) -> None:
        tasks["handler"] = asyncio.current_task()

    async def endpoint(request: Request) -> Response:
        tasks["endpoint"] = asyncio.current_task()
        emit("seen")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)], middleware=[Middleware(TidingsMiddleware, bus=bus)])
    transport = httpx.ASGITransport(app=app)
    with inline_handlers(bus) if inline else capture(bus):
        async with bus, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.get("/")
            await settle(bus)
    assert (tasks["handler"] is tasks["endpoint"]) is inline
    assert bus.request_handlers == "task" and not bus.request_handlers_inline


def test_inline_handlers_default_to_the_default_bus() -> None:
    reset_default_bus()
    try:
        bus = tidings.default_bus()
        bus.request_handlers = "task"
        modes = []
        with inline_handlers():  # as capture() and settle(): it used to change nothing
            modes.append(bus.request_handlers)
        modes.append(bus.request_handlers)
        assert modes == ["inline", "task"]
    finally:
        reset_default_bus()


async def test_inline_handlers_restore_a_running_bus() -> None:
    bus = EventBus(request_handlers="task")

    def inline() -> bool:
        return bus.request_handlers_inline

    async with bus:
        with inline_handlers(bus):
            assert inline()
        assert not inline()
        await bus.aclose()
        with inline_handlers(bus):
            await bus.start()  # started in the block (its lifespan, say): task mode again after it
            assert inline()
        assert bus.request_handlers == "task" and not inline()
        await bus.aclose()
        with inline_handlers(bus):
            bus.ensure_running()  # started by a request (no lifespan): inline, as a lazy start needs
        assert bus.request_handlers == "task" and inline()


# -- the corners ----------------------------------------------------------------------------------------
async def test_what_is_pending_includes_retries_and_events_not_started(bus: EventBus) -> None:
    @bus.on("flaky", retry=RetryPolicy(max_attempts=2, backoff=30, jitter=0))
    async def flaky(event: Event) -> None:
        raise ConnectionError("down")

    async with bus:
        bus.emit("flaky")
        await settle(bus)  # the retry is due after the bound: not waited for
        bus.emit("flaky")  # accepted, not started yet
        pending = bus._pending_work()
        assert len(pending) == 2
        assert pending[0].startswith(f"{flaky.__module__}.{flaky.__qualname__} <- flaky, retry due in ")
        assert pending[1] == "flaky (not started yet)"
        await settle(bus)


async def test_settle_and_wait_for_corners(bus: EventBus, events: EventCapture) -> None:
    await settle(EventBus())  # never started: nothing to wait for
    with pytest.raises(AssertionError, match="no event 'x' was emitted within 0s"):
        await events.wait_for("x", timeout=0)
    bus.emit("order.placed")
    with pytest.raises(AssertionError) as raised:
        events.assert_emitted("user.*")
    assert "Did you mean" not in str(raised.value)  # no suggestion for a pattern
    assert str(raised.value).endswith("Every event emitted (1), in order:\n  #1 order.placed None")
    with pytest.raises(AssertionError, match=r"expected no 'order\.placed', but 1 event\(s\) were emitted"):
        events.assert_not_emitted("order.placed")
    assert [event.name for event in events] == ["order.placed"]


def test_a_waiter_whose_loop_closed_is_skipped(bus: EventBus, events: EventCapture) -> None:
    loop = asyncio.new_event_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    loop.close()
    events._waiters.append((loop, waiter))  # as if its loop had closed under a waiting wait_for()
    bus.emit("after")
    assert events.names == ["after"] and not events._waiters


def test_settle_sync_times_out_naming_the_unfinished_calls(bus: EventBus) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gate = threading.Event()

    @bus.on("slow")
    def slow(event: Event) -> None:
        assert gate.wait(5)

    try:
        asyncio.run_coroutine_threadsafe(bus.start(), loop).result(5)
        bus.emit("slow")
        with pytest.raises(TimeoutError, match=r"still had handler work after 0\.05s"):
            settle_sync(bus, timeout=0.05)
        gate.set()
        settle_sync(bus)
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(bus.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.mark.parametrize("how", ["settle", "settle_sync"])
def test_settling_a_bus_whose_loop_is_blocked_times_out_saying_so(
    bus: EventBus, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A settle waits for the bus's loop past its timeout by _HOP (1 s); this loop never answers, so
    # a shorter hop ends the same way, sooner.
    monkeypatch.setattr("tidings.testing._HOP", 0.1)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gate, blocking = threading.Event(), threading.Event()

    @bus.on("blocks")
    async def blocks_the_loop(event: Event) -> None:
        blocking.set()
        gate.wait(10)  # a handler that blocks its event loop (a sync call in an async def)

    try:
        asyncio.run_coroutine_threadsafe(bus.start(), loop).result(5)
        bus.emit("blocks")
        assert blocking.wait(5)

        def settle_it() -> None:
            if how == "settle":
                asyncio.run(settle(bus, timeout=0.05))
            else:
                settle_sync(bus, timeout=0.05)

        with pytest.raises(TimeoutError, match="did not answer in time") as caught:
            settle_it()
        assert "still had handler work after 0.05s" in str(caught.value)
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(bus.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
