"""The bus outside any web framework: emitting, handler isolation, timeouts, threads, drain."""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import tidings
from tidings import (
    BusState,
    ConfigurationError,
    DrainTimeoutError,
    Event,
    EventBus,
    HandlerCancelledError,
    HandlerError,
    HandlerTimeoutError,
    Limits,
    emit,
)
from tidings.store import SQLiteStore

from ..conftest import Recorder, Records

pytestmark = pytest.mark.anyio


async def test_outside_events_reach_every_matching_handler(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("user.created")
    async def exact(event: Event) -> None:
        recorder.add(("exact", event.name, event.payload))

    @bus.on("user.*")
    def wildcard(event: Event) -> None:
        recorder.add(("wildcard", event.name, event.payload))

    async with bus:
        bus.emit("user.created", {"id": 1})
        bus.emit("nobody.listens")  # a harmless no-op
        items = await recorder.wait_count(2)
    assert sorted(items) == [
        ("exact", "user.created", {"id": 1}),
        ("wildcard", "user.created", {"id": 1}),
    ]


async def test_a_failing_handler_does_not_stop_the_others(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError], caplog: pytest.LogCaptureFixture
) -> None:
    @bus.on("order.placed")
    async def broken(event: Event) -> None:
        raise RuntimeError("payment service down")

    @bus.on("order.placed")
    def broken_sync(event: Event) -> None:
        raise ValueError("bad data")

    @bus.on("order.placed")
    async def fine(event: Event) -> None:
        recorder.add(event.payload)

    async with bus:
        bus.emit("order.placed", 1)
        bus.emit("order.placed", 2)
        assert await recorder.wait_count(2) == [1, 2]
        await bus.drain()
    assert sorted((f.handler.rsplit(".", 1)[-1], f.event.payload) for f in failures) == [
        ("broken", 1),
        ("broken", 2),
        ("broken_sync", 1),
        ("broken_sync", 2),
    ]
    assert isinstance(failures[0].__cause__, RuntimeError | ValueError)
    logged = [r for r in caplog.records if r.name == "tidings" and r.levelno == logging.ERROR]
    assert len(logged) == 4
    assert all(r.exc_info is not None for r in logged)  # with the traceback
    assert {r.__dict__["tidings_event"] for r in logged} == {"order.placed"}


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


async def test_a_handler_error_whose_str_raises_is_reported_and_stops_nothing(
    tmp_path: Path, recorder: Recorder, failures: list[HandlerError]
) -> None:
    # str(exc) while reporting raised out of the job: the other handlers never ran, nothing was reported
    bus = EventBus(on_failure=failures.append, store=SQLiteStore(tmp_path / "log.db"))

    @bus.on("x")
    async def broken(event: Event) -> None:
        raise Unprintable()

    @bus.on("x")
    def broken_sync(event: Event) -> None:
        raise Unprintable()

    @bus.on("x")
    async def fine(event: Event) -> None:
        recorder.add("async")

    @bus.on("x")
    def fine_sync(event: Event) -> None:
        recorder.add("sync")

    async with bus:
        bus.emit("x")
        await recorder.wait_count(2)
        await bus.drain()
        letters = await bus.dead_letters.list()
    assert sorted(recorder.items) == ["async", "sync"]
    assert len(failures) == 2
    assert all("raised Unprintable: <its str() raised RuntimeError>" in str(f) for f in failures)
    assert sorted(letter.error for letter in letters) == ["Unprintable: <its str() raised RuntimeError>"] * 2


async def test_a_hook_that_raises_is_logged_and_does_not_stop_delivery(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(error: HandlerError) -> None:
        raise RuntimeError("hook broke")

    bus = EventBus(on_failure=hook)

    @bus.on("a")
    async def broken(event: Event) -> None:
        raise RuntimeError("x")

    @bus.on("a")
    async def fine(event: Event) -> None:
        recorder.add(event.name)

    async with bus:
        bus.emit("a")
        await recorder.wait_count(1)
    assert any("on_failure hook raised" in r.getMessage() for r in caplog.records)


class _StopsEverything(BaseException):
    """Not an Exception, not what stops the process: fastapi-events' errors are of this kind."""


async def test_a_failure_hook_raising_a_base_exception_is_logged_and_contained(
    recorder: Recorder, records: Records
) -> None:
    def hook(error: HandlerError) -> None:
        raise _StopsEverything("hook broke")

    bus = EventBus(on_failure=hook)

    @bus.on("a")
    async def broken(event: Event) -> None:
        raise RuntimeError("x")

    @bus.on("a")
    async def fine(event: Event) -> None:
        recorder.add(event.name)

    @bus.on("slow", timeout=0.02)
    async def hangs(event: Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            recorder.add("cancelled")  # the watchdog survived the hook's first raise
            raise

    async with bus:
        assert [type(e) for e in await bus.emit_now("a")] == [HandlerError]
        assert recorder.items == ["a"]  # the sibling still ran
        await bus.emit_now("slow")
        assert recorder.items == ["a", "cancelled"]
    logged = await records.wait_for("the on_failure hook raised")
    assert logged.exc_info is not None and logged.exc_info[0] is _StopsEverything


async def test_an_async_failure_hook_runs_and_drain_waits_for_it(
    recorder: Recorder, records: Records
) -> None:
    release = asyncio.Event()

    async def hook(error: HandlerError) -> None:
        await release.wait()  # say, posting to a chat channel
        recorder.add(error.handler.rsplit(".", 1)[-1])
        if error.event.payload == "hook fails":
            raise RuntimeError("the chat is down")

    bus = EventBus(on_failure=hook)

    @bus.on("a")
    async def broken(event: Event) -> None:
        raise RuntimeError("x")

    async with bus:
        bus.emit("a")
        bus.emit("a", "hook fails")
        draining = asyncio.create_task(bus.drain())
        await anyio.wait_all_tasks_blocked()
        assert not draining.done()  # the hook's calls are work the drain waits for
        release.set()
        await draining
        assert recorder.items == ["broken", "broken"]
    await records.wait_for("the on_failure hook raised")


async def test_an_async_failure_hook_gets_what_closing_reports_within_the_drain_bound(
    recorder: Recorder,
) -> None:
    async def post_to_chat(error: HandlerError) -> None:
        await asyncio.sleep(0)  # network I/O, say
        recorder.add(str(error).split(": ", 1)[-1])

    bus = EventBus(on_failure=post_to_chat, retry=tidings.RetryPolicy(max_attempts=2, backoff=60, jitter=0))

    @bus.on("job")
    async def flaky(event: Event) -> None:
        raise ConnectionError("down")

    async with bus:
        bus.emit("job")
        await recorder.wait_count(1)
    # the retry, due after the bound, is reported as the bus closes, and that report is delivered too
    assert recorder.items == ["down", "its retry was due after the bus closed; it is lost"]
    assert not bus._runner.hook_tasks


async def test_a_hook_still_running_is_named_once_and_is_no_handler_cut_off(records: Records) -> None:
    release = asyncio.Event()

    async def hook(error: HandlerError) -> None:
        await release.wait()

    bus = EventBus(on_failure=hook, drain_timeout=0.05)

    @bus.on("job")
    async def broken(event: Event) -> None:
        raise RuntimeError("x")

    await bus.start()
    await bus.emit_now("job")
    await bus.drain(0.01)  # no DrainTimeoutError: no handler call is unfinished
    await bus.aclose()
    logged = [r for r in records.recorder.items if "call(s) of the on_failure hook" in r.getMessage()]
    assert len(logged) == 1
    assert not any("drain bound ran out with" in r.getMessage() for r in records.recorder.items)
    release.set()


async def test_a_hook_and_a_handler_may_both_drain(recorder: Recorder) -> None:
    async def hook(error: HandlerError) -> None:
        await bus.drain(5)
        recorder.add("hook")

    bus = EventBus(on_failure=hook)
    hook_started = asyncio.Event()

    @bus.on("boom")
    async def boom(event: Event) -> None:
        raise RuntimeError("x")

    @bus.on("settle")
    async def settle(event: Event) -> None:
        await hook_started.wait()
        await bus.drain(5)
        recorder.add("handler")

    async with bus:
        bus.emit("settle")
        await bus.emit_now("boom")
        hook_started.set()
        drained = await recorder.wait_count(2, timeout=4)  # neither waits for the other's bound
    assert sorted(drained) == ["handler", "hook"]


async def test_an_async_handler_past_its_timeout_is_cancelled_and_reported(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError]
) -> None:
    @bus.on("slow", timeout=0.05)
    async def hangs(event: Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            recorder.add("cancelled")
            raise

    @bus.on("slow")
    async def after(event: Event) -> None:
        recorder.add("after")

    async with bus:
        bus.emit("slow")
        assert await recorder.wait_count(2) == ["cancelled", "after"]
    assert len(failures) == 1
    assert isinstance(failures[0], HandlerTimeoutError)
    assert isinstance(failures[0], TimeoutError)
    assert failures[0].handler.endswith("hangs")
    # the cancellation that stopped it, whose traceback shows where it was waiting
    assert isinstance(failures[0].__cause__, asyncio.CancelledError)


async def test_a_handler_that_swallows_the_timeout_cancellation_is_still_reported(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError]
) -> None:
    @bus.on("slow", timeout=0.05)
    async def stubborn(event: Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            recorder.add("swallowed")

    @bus.on("slow")
    async def after(event: Event) -> None:
        recorder.add("after")

    async with bus:
        bus.emit("slow")
        assert await recorder.wait_count(2) == ["swallowed", "after"]
    assert [type(f) for f in failures] == [HandlerTimeoutError]


async def test_a_sync_handler_past_its_timeout_is_reported_while_it_runs(recorder: Recorder) -> None:
    release = threading.Event()
    failures = Recorder()
    bus = EventBus(on_failure=failures.add)

    @bus.on("slow", timeout=0.05)
    def blocks(event: Event) -> None:
        release.wait(10)
        recorder.add("returned")

    async with bus:
        bus.emit("slow")
        (timeout,) = await failures.wait_count(1)
        assert isinstance(timeout, HandlerTimeoutError)
        assert "cannot be interrupted" in str(timeout)
        assert recorder.items == []  # reported while it still runs
        release.set()
        await recorder.wait_count(1)


async def test_a_handler_cancelling_itself_is_reported_and_the_others_run(
    bus: EventBus, recorder: Recorder, failures: list[HandlerError]
) -> None:
    @bus.on("a")
    async def cancels(event: Event) -> None:
        raise asyncio.CancelledError

    @bus.on("a")
    async def fine(event: Event) -> None:
        recorder.add("fine")

    async with bus:
        bus.emit("a")
        await recorder.wait_count(1)
    assert [type(f) for f in failures] == [HandlerCancelledError]


async def test_sync_handlers_of_one_job_share_one_thread_hop(
    bus: EventBus, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops: list[int] = []
    runner = bus._runner
    start_sync = runner._start_sync

    def counting(job: Any, start: int) -> Any:
        hops.append(len(job.sync_calls) - start)
        return start_sync(job, start)

    monkeypatch.setattr(runner, "_start_sync", counting)

    @bus.on("tick")
    def one(event: Event) -> None:
        recorder.add((threading.get_ident(), event.payload))

    @bus.on("tick")
    def two(event: Event) -> None:
        recorder.add((threading.get_ident(), event.payload))

    async with bus:
        loop_thread = threading.get_ident()
        for i in range(100):
            bus.emit("tick", i)
        items = await recorder.wait_count(200)
    assert hops == [200]
    assert {thread for thread, _ in items} != {loop_thread}
    assert len({thread for thread, _ in items}) == 1
    assert [payload for _, payload in items] == [i for i in range(100) for _ in (0, 1)]


async def test_each_handler_sees_events_in_emit_order(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("*")
    async def first(event: Event) -> None:
        await asyncio.sleep(0)
        recorder.add(("first", event.payload))

    @bus.on("n.*")
    def second(event: Event) -> None:
        recorder.add(("second", event.payload))

    async with bus:
        for i in range(50):
            bus.emit(f"n.{i % 3}", i)
        items = await recorder.wait_count(100)
    assert [p for h, p in items if h == "first"] == list(range(50))
    assert [p for h, p in items if h == "second"] == list(range(50))


async def test_batch_handlers_receive_all_events_of_a_job_at_once(bus: EventBus) -> None:
    batches: list[list[Any]] = []

    class Forwarder:
        async def handle_many(self, events: list[Event]) -> None:
            batches.append([e.payload for e in events])

    class SyncForwarder:
        def handle_many(self, events: list[Event]) -> None:
            batches.append(["sync", *[e.payload for e in events]])

    bus.subscribe(Forwarder(), "*")
    bus.subscribe(SyncForwarder(), "x")

    @bus.on("y", batch=True)
    async def function_batch(events: list[Event]) -> None:
        batches.append(["fn", *[e.payload for e in events]])

    async with bus:
        bus.emit("x", 1)
        bus.emit("y", 2)
        bus.emit("x", 3)
        await bus.drain()
    assert sorted(batches, key=str) == sorted([[1, 2, 3], ["sync", 1, 3], ["fn", 2]], key=str)


async def test_handle_objects_receive_events_one_by_one(bus: EventBus, recorder: Recorder) -> None:
    class Printer:
        async def handle(self, event: Event) -> None:
            recorder.add(event.payload)

    bus.subscribe(Printer(), "p")
    async with bus:
        bus.emit("p", 1)
        bus.emit("p", 2)
        assert await recorder.wait_count(2) == [1, 2]


async def test_events_emitted_by_handlers_chain(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("order.placed")
    async def confirm(event: Event) -> None:
        emit("order.confirmed", event.payload)

    @bus.on("order.confirmed")
    def ship(event: Event) -> None:
        emit("order.shipped", event.payload)

    @bus.on("order.shipped")
    async def done(event: Event) -> None:
        recorder.add(event.payload)

    async with bus:
        bus.emit("order.placed", 7)
        assert await recorder.wait_count(1) == [7]


async def test_plain_threads_emit_to_the_only_running_bus(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("from.thread")
    async def handler(event: Event) -> None:
        recorder.add((event.payload, threading.get_ident()))

    async with bus:
        threads = [threading.Thread(target=emit, args=("from.thread", i)) for i in range(4)]
        threads.append(threading.Thread(target=bus.emit, args=("from.thread", 4)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        items = await recorder.wait_count(5)
    assert sorted(p for p, _ in items) == [0, 1, 2, 3, 4]
    assert {t for _, t in items} == {threading.get_ident()}  # async handlers run on the loop


async def test_emit_with_no_running_bus_logs_what_to_do_and_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    emit("lost")
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert "event 'lost' was dropped" in record.getMessage()
    assert "no tidings bus is running" in record.getMessage()
    assert "bus.emit()" in record.getMessage()
    with pytest.raises(TypeError):
        emit(3)  # the caller's own bug still raises


async def test_emit_with_two_running_buses_refuses_to_guess(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = EventBus(name="one"), EventBus(name="two")

    @two.on("x")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    async with one, two:
        emit("x")
        assert "2 buses are running and it is not clear which one is meant" in caplog.text
        two.emit("x", "explicit")
        assert await recorder.wait_count(1) == ["explicit"]


async def test_disabled_by_env_var(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    monkeypatch.setenv("TIDINGS_DISABLE_EMIT", "true")
    emit("no.bus.at.all")  # a no-op rather than an error
    bus = EventBus()
    assert not bus.enabled

    @bus.on("*")
    async def handler(event: Event) -> None:
        recorder.add(event)

    async with bus:
        bus.emit("x")
        emit("x")
        await bus.drain()
    assert recorder.items == []


async def test_disabled_by_option(recorder: Recorder) -> None:
    bus = EventBus(enabled=False)

    @bus.on("*")
    async def handler(event: Event) -> None:
        recorder.add(event)

    async with bus:
        bus.emit("x")
        await bus.drain()
    assert recorder.items == []


async def test_enum_names_and_bad_names(bus: EventBus, recorder: Recorder) -> None:
    class UserEvents(enum.Enum):
        SIGNED_UP = "user.signed_up"

    @bus.on("user.signed_up")
    async def handler(event: Event) -> None:
        recorder.add(type(event.name))

    async with bus:
        bus.emit(UserEvents.SIGNED_UP)
        emit(UserEvents.SIGNED_UP)
        assert await recorder.wait_count(2) == [str, str]
        with pytest.raises(TypeError, match="must be a name"):
            bus.emit(42)


async def test_events_emitted_before_start_run_at_start(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("early")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    bus.emit("early", 1)
    assert bus.state is BusState.CREATED
    async with bus:
        assert await recorder.wait_count(1) == [1]


async def test_events_emitted_on_a_running_loop_to_a_bus_nobody_started_are_told_once(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # An app is running (this loop), but nothing started this bus: its events would wait in silence.
    bus = EventBus(name="audit")

    @bus.on("user.*")
    async def handler(event: Event) -> None:
        recorder.add(event.name)

    off_loop = threading.Thread(target=bus.emit, args=("user.from_a_thread",))  # no loop there: no word
    off_loop.start()
    off_loop.join()
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="tidings"):
        bus.emit("user.logged_in")
        bus.emit("user.logged_out")
    assert bus.state is BusState.CREATED
    [record] = caplog.records  # once per bus, not once per event
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "event 'user.logged_in' was emitted on bus 'audit', which has not been started" in message
    assert "TidingsMiddleware" in message and "async with bus:" in message and "await bus.start()" in message
    async with bus:  # they waited, as documented: they run once it starts
        assert await recorder.wait_count(3) == ["user.from_a_thread", "user.logged_in", "user.logged_out"]
        bus.emit("user.after_start")
        await recorder.wait_count(4)
    assert len(caplog.records) == 1


async def test_an_emit_from_a_worker_thread_to_a_bus_nobody_started_is_told_while_an_app_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a sync endpoint runs in a worker thread, with no event loop of its own: the app's bus runs
    app_bus, audit = EventBus(name="app"), EventBus(name="audit")
    async with app_bus:
        with caplog.at_level(logging.WARNING, logger="tidings"):
            worker = threading.Thread(target=audit.emit, args=("user.logged_in",))
            worker.start()
            worker.join()
    [record] = caplog.records
    assert "was emitted on bus 'audit', which has not been started" in record.getMessage()


async def test_a_capture_on_a_bus_nobody_starts_is_not_told(caplog: pytest.LogCaptureFixture) -> None:
    from tidings.testing import capture

    bus = EventBus(name="captured")
    with capture(bus) as events, caplog.at_level(logging.WARNING, logger="tidings"):
        bus.emit("user.created")  # a test checking what its code emits, handlers not wanted
    events.assert_emitted("user.created")
    assert not caplog.records


async def test_events_emitted_after_close_are_logged_not_lost_silently(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    async with bus:
        pass
    assert bus.state is BusState.CLOSED
    bus.emit("late")
    assert "event 'late' was dropped because the bus is closed" in caplog.text


async def test_a_closed_bus_can_start_again(bus: EventBus, recorder: Recorder) -> None:
    @bus.on("x")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    async with bus:
        bus.emit("x", 1)
        await recorder.wait_count(1)
    async with bus:
        bus.emit("x", 2)
        assert await recorder.wait_count(2) == [1, 2]


async def test_drain_waits_for_in_flight_and_chained_work(bus: EventBus, recorder: Recorder) -> None:
    gate = asyncio.Event()

    @bus.on("a")
    async def slow(event: Event) -> None:
        await gate.wait()
        emit("b")

    @bus.on("b")
    def chained(event: Event) -> None:
        recorder.add("b")

    async with bus:
        bus.emit("a")
        drain = asyncio.ensure_future(bus.drain())
        await asyncio.sleep(0)
        assert not drain.done()
        gate.set()
        await drain
        assert recorder.items == ["b"]


async def test_drain_bound_cancels_and_reports_every_unfinished_call(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    bus = EventBus(handler_timeout=None, drain_timeout=0.2)

    @bus.on("stuck")
    async def hangs(event: Event) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            recorder.add("cancelled")

    @bus.on("stuck")
    async def next_in_line(event: Event) -> None:
        recorder.add("never")

    async with bus:
        bus.emit("stuck", 1)
        await asyncio.sleep(0)
        with pytest.raises(DrainTimeoutError) as caught:
            await bus.drain()
    pending = [(p.handler.rsplit(".", 1)[-1], p.event.payload) for p in caught.value.pending]
    assert pending == [("hangs", 1), ("next_in_line", 1)]
    assert recorder.items == ["cancelled"]
    assert "drain bound ran out with 2 handler call(s) unfinished" in caplog.text


async def test_aclose_logs_a_cut_off_drain_and_closes(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus(handler_timeout=None, drain_timeout=0.05)

    @bus.on("stuck")
    def blocks(event: Event) -> None:
        threading.Event().wait(0.5)

    await bus.start()
    bus.emit("stuck")
    await bus.aclose()
    assert bus.state is BusState.CLOSED
    assert "blocks <- stuck" in caplog.text


async def test_concurrency_limit_queues_jobs_in_order(recorder: Recorder) -> None:
    bus = EventBus(limits=Limits(max_concurrency=1))
    gate = asyncio.Event()

    @bus.on("a")
    async def first(event: Event) -> None:
        recorder.add(("start", event.payload))
        await gate.wait()
        recorder.add(("end", event.payload))

    async with bus:
        bus.emit("a", 1)
        await recorder.wait_count(1)
        bus.emit("a", 2)  # a second job: waits for the only slot
        bus.emit("a", 3)
        for _ in range(5):
            await asyncio.sleep(0)
        assert recorder.items == [("start", 1)]
        gate.set()
        await bus.drain()
    assert recorder.items == [("start", 1), ("end", 1), ("start", 2), ("end", 2), ("start", 3), ("end", 3)]


def test_invalid_options_fail_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="max_concurrency"):
        Limits(max_concurrency=0)
    with pytest.raises(ConfigurationError, match="max_threads"):
        Limits(max_threads=True)
    with pytest.raises(ConfigurationError, match="handler_timeout"):
        EventBus(handler_timeout=0)
    with pytest.raises(ConfigurationError, match="drain_timeout"):
        EventBus(drain_timeout=-1)
    with pytest.raises(ConfigurationError, match="request_errors"):
        EventBus(request_errors="ignore")  # type: ignore[arg-type]  # the point of the test


@pytest.mark.parametrize(
    ("options", "message"),
    [  # each used to be a raw TypeError or AttributeError, or accepted and failing later
        ({"drain_timeout": None}, "drain_timeout must be seconds >= 0, got None"),
        ({"handler_timeout": "5"}, "handler_timeout must be seconds > 0 or None, got '5'"),
        ({"handler_timeout": True}, "handler_timeout must be seconds > 0 or None, got True"),
        ({"handler_timeout": float("nan")}, "handler_timeout must be seconds > 0 or None, got nan"),
        ({"resubmit_after": True}, "resubmit_after must be > 0 seconds, got True"),
        ({"limits": {"max_threads": 2}}, "limits must be a Limits"),
        ({"store": 5}, "store must be a store"),
        ({"on_failure": 5}, "on_failure must be a function"),
        ({"enabled": "no"}, "enabled must be True, False or None, got 'no'"),
        ({"name": ""}, "name must be a non-empty str"),
    ],
)
def test_options_of_the_wrong_kind_are_configuration_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        EventBus(**options)


@pytest.mark.parametrize("field", ["deadline", "attempt_timeout", "backoff"])
def test_a_bool_is_no_number_of_seconds_for_a_retry_policy(field: str) -> None:
    options: dict[str, Any] = {field: True}
    with pytest.raises(ConfigurationError, match=f"RetryPolicy.{field}"):
        tidings.RetryPolicy(**options)


def test_repr_and_public_names() -> None:
    assert repr(EventBus(name="shop")) == "<EventBus 'shop' created, 0 handler(s)>"
    assert tidings.EventBus.__module__ == "tidings"


async def test_an_async_handler_behind_a_plain_decorator_is_awaited_on_the_loop(recorder: Recorder) -> None:
    # A decorator whose wrapper is a plain def makes the handler look synchronous: it is called in
    # a worker thread and returns a coroutine, which used to be dropped ("never awaited") with
    # its event, reported nowhere. It now runs on the loop, as the call it belongs to.
    failures: list[HandlerError] = []
    bus = EventBus(on_failure=failures.append)
    loop_thread = threading.get_ident()

    def logged(handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return handler(*args, **kwargs)

        return wrapper

    @bus.on("order.paid")
    @logged
    async def receipt(event: Event) -> None:
        recorder.add(("receipt", threading.get_ident() == loop_thread))
        bus.emit("receipt.sent", event.payload)  # the job's own chained event

    @bus.on("order.refunded")
    @logged
    async def refund(event: Event) -> None:
        raise ValueError("the payment provider said no")

    @bus.on("receipt.sent")
    async def sent(event: Event) -> None:
        recorder.add(("sent", event.payload))

    [spec] = bus.registry.resolve("order.paid")
    assert not spec.is_async  # what the wrapper looks like
    async with bus:
        bus.emit("order.paid", 7)
        bus.emit("order.refunded", 8)
        await recorder.wait_count(2)
        await bus.drain()
    assert sorted(recorder.items) == [("receipt", True), ("sent", 7)]
    [failure] = failures
    assert isinstance(failure.__cause__, ValueError)
    assert failure.event.payload == 8


async def test_headers_are_read_only_and_the_caller_s_dict_stays_its_own(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("order.paid")
    async def first(event: Event) -> None:
        with pytest.raises(TypeError):
            event.headers["tenant"] = "someone else"  # type: ignore[index]
        recorder.add(dict(event.headers))

    @bus.on("order.paid")
    async def second(event: Event) -> None:
        recorder.add(dict(event.headers))

    headers = {"tenant": "acme"}
    async with bus:
        bus.emit("order.paid", 1, headers=headers)
        headers["tenant"] = "changed after the emit"  # used to reach the handlers
        await recorder.wait_count(2)
    assert recorder.items == [{"tenant": "acme"}, {"tenant": "acme"}]
