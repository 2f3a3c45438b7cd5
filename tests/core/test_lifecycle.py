"""Lifecycle edges: loops that close, other loops, and what a drain bound cuts off."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from time import monotonic
from typing import Any

import anyio
import pytest

from tidings import (
    BusState,
    BusStateError,
    DrainTimeoutError,
    Event,
    EventBus,
    HandlerCancelledError,
    HandlerError,
    Limits,
    PendingDelivery,
    RetryPolicy,
    TidingsMiddleware,
    emit,
)
from tidings._core.dispatcher import current_scope
from tidings._core.runner import Job

from ..asgi_calls import http_scope, request_body
from ..conftest import Recorder, Records


def test_emit_after_the_loop_closed_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    asyncio.run(bus.start())  # the loop closes; nobody closed the bus
    assert bus.state is BusState.RUNNING
    bus.emit("late")  # from the loop's own thread
    seen: list[BaseException] = []
    thread = threading.Thread(target=lambda: bus.emit("late.thread"))
    thread.start()
    thread.join()
    assert not seen
    assert caplog.text.count("because its event loop has closed") == 2


def test_a_bus_serves_one_loop_at_a_time() -> None:
    bus = EventBus()
    ready = threading.Event()
    stop: asyncio.Event | None = None
    other_loop: asyncio.AbstractEventLoop | None = None

    async def hold() -> None:
        nonlocal stop, other_loop
        stop, other_loop = asyncio.Event(), asyncio.get_running_loop()
        await bus.start()
        ready.set()
        await stop.wait()
        await bus.aclose()

    thread = threading.Thread(target=asyncio.run, args=(hold(),))
    thread.start()
    ready.wait(5)

    async def second() -> None:
        with pytest.raises(BusStateError, match="another event loop"):
            await bus.start()

    try:
        asyncio.run(second())
    finally:
        assert other_loop is not None and stop is not None
        other_loop.call_soon_threadsafe(stop.set)
        thread.join(5)
    assert bus.state is BusState.CLOSED


def test_a_request_on_another_loop_is_refused_while_the_bus_loop_is_open(recorder: Recorder) -> None:
    # e.g. a bus fixture kept across tests whose event loops differ: the bus cannot serve both
    bus = EventBus()

    @bus.on("seen")
    async def handler(event: Event) -> None:
        recorder.add(event.name)

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        emit("seen")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = TidingsMiddleware(endpoint, bus=bus)

    async def request() -> None:
        async def send(message: Any) -> None:
            pass

        await app(http_scope("/"), request_body(), send)

    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        first.run_until_complete(request())  # starts the bus on the first loop, which stays open
        with pytest.raises(BusStateError, match="another event loop"):
            second.run_until_complete(request())
        assert recorder.items == ["seen"]  # the second request's app never ran
        first.run_until_complete(bus.aclose())
        second.run_until_complete(request())  # a closed bus starts again on the loop it is given
        assert recorder.items == ["seen", "seen"]
        second.run_until_complete(bus.aclose())
    finally:
        first.close()
        second.close()


def _leave_a_job_on_a_closed_loop(bus: EventBus, payload: int) -> None:
    """Start ``bus`` on a loop that closes before the job of an event emitted there can run."""

    async def first() -> None:
        await bus.start()
        bus.emit("x", payload)  # its job gets a task, which never runs: the loop stops first

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(first())
    finally:
        loop.close()
    (dead,) = bus._runner.jobs
    assert dead.task is not None
    dead.task.get_coro().close()  # never started; closed here, not with a warning at collection


def test_jobs_of_a_loop_that_closed_are_reported_when_the_bus_starts_on_the_next() -> None:
    # e.g. a test client without lifespan: its loop closed before a job started there could run
    failures: list[HandlerError] = []
    bus = EventBus(on_failure=failures.append)
    seen: list[int] = []

    @bus.on("x")
    async def handler(event: Event) -> None:
        seen.append(event.payload)

    async def second() -> None:
        await bus.start()
        assert [(type(f), f.event.payload) for f in failures] == [(HandlerCancelledError, 1)]
        assert "its event loop closed before it finished" in str(failures[0])
        assert bus._runner.jobs == set()  # so drain has no job it could never see finish
        bus.emit("x", 2)
        await bus.aclose()

    _leave_a_job_on_a_closed_loop(bus, 1)
    asyncio.run(second())
    assert seen == [2]


def test_a_plain_def_failure_on_its_way_to_a_loop_that_stopped_is_reported_on_the_next() -> None:
    # Its thread passed the failure to the loop, which stopped (then closed) before it ran it: the
    # next loop the bus starts on reports it (its job, left on the dead loop, counts it as finished).
    failures: list[HandlerError] = []
    bus = EventBus(on_failure=failures.append)
    started = threading.Event()
    go = threading.Event()

    @bus.on("x")
    def fails(event: Event) -> None:
        started.set()
        assert go.wait(5)
        raise ValueError("the loop stopped before it heard this")

    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(bus.start())
        bus.emit("x", 1)
        first.run_until_complete(asyncio.to_thread(started.wait, 5))
        go.set()  # the loop is not running: the failure waits in its queue
        deadline = monotonic() + 5
        while not first._ready:  # type: ignore[attr-defined]  # asyncio's queue of callbacks
            assert monotonic() < deadline
            go.wait(0.001)
    finally:
        first.close()
    [pending] = bus._pending_work()  # what a settle, or the process's exit, would say now
    assert pending.endswith(", failed, its failure not reported yet")

    async def second() -> None:
        await bus.start()
        await asyncio.sleep(0)  # what the start queued for this loop
        assert [(type(f).__name__, f.event.payload, str(f.__cause__)) for f in failures] == [
            ("HandlerError", 1, "the loop stopped before it heard this")
        ]
        await bus.aclose()

    asyncio.run(second())


def test_an_async_failure_hook_hears_of_the_jobs_of_a_loop_that_closed() -> None:
    heard: list[str] = []

    async def hook(error: HandlerError) -> None:
        heard.append(str(error).split(": ", 1)[-1])

    bus = EventBus(on_failure=hook)

    @bus.on("x")
    async def handler(event: Event) -> None: ...

    async def second() -> None:
        await bus.start()  # reports the dead job; the hook runs on this loop
        await bus.aclose()

    _leave_a_job_on_a_closed_loop(bus, 1)
    asyncio.run(second())
    assert heard == ["its event loop closed before it finished; it is lost"]


def test_a_failure_hook_that_emits_hears_of_the_jobs_of_a_loop_that_closed_with_a_tap_on() -> None:
    # The report is made as the bus binds the next loop; a tapped emit of the hook took the bus's
    # lock, which the binding held: the thread starting the bus hung for good.
    bus = EventBus(on_failure=lambda error: bus.emit("handler.failed", error.handler))
    tapped: list[str] = []
    bus.tap(lambda event: tapped.append(event.name))  # what capture() does
    failed: list[str] = []

    @bus.on("x")
    async def handler(event: Event) -> None: ...

    @bus.on("handler.failed")
    async def on_failed(event: Event) -> None:
        failed.append(event.payload)

    async def second() -> None:
        await bus.start()  # reports the dead job; the hook emits
        await bus.aclose()

    _leave_a_job_on_a_closed_loop(bus, 1)
    tapped.clear()
    thread = threading.Thread(target=asyncio.run, args=(second(),), daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert tapped == ["handler.failed"]
    assert [name.rsplit(".", 1)[-1] for name in failed] == ["handler"]


def test_outside_events_accepted_as_a_loop_stopped_are_handled_on_the_next(recorder: Recorder) -> None:
    # The loop stops in the tick that accepted the first event, so the callback that would spawn
    # its job never runs. Before the fix, its flag kept this and every later outside event waiting
    # until a drain.
    bus = EventBus()

    @bus.on("x")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    loop = asyncio.new_event_loop()

    def emit_as_the_loop_stops() -> None:
        bus.emit("x", 1)
        loop.stop()

    try:
        loop.run_until_complete(bus.start())
        loop.call_soon(emit_as_the_loop_stops)
        loop.run_forever()
    finally:
        loop.close()
    assert bus.loop is loop and not bus.loop_is_open()

    async def second() -> None:
        await bus.start()
        bus.emit("x", 2)
        assert await recorder.wait_count(2) == [1, 2]
        await bus.aclose()

    asyncio.run(second())


def test_events_a_thread_handed_to_a_stopped_loop_are_handled_on_the_next(recorder: Recorder) -> None:
    # The loop stopped (it is not closed yet): a thread's event is queued for it, and closing the
    # loop discards the queue. Before the fix, the event was lost without a word.
    bus = EventBus()

    @bus.on("x")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(bus.start())
        thread = threading.Thread(target=bus.emit, args=("x", 1))
        thread.start()
        thread.join()
    finally:
        loop.close()

    async def second() -> None:
        await bus.start()
        bus.emit("x", 2)
        assert sorted(await recorder.wait_count(2)) == [1, 2]
        await bus.aclose()

    asyncio.run(second())


@pytest.mark.anyio
async def test_drain_takes_what_a_thread_handed_over_before_the_loop_did(recorder: Recorder) -> None:
    bus = EventBus()

    @bus.on("x")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    await bus.start()
    with bus._lock:  # a thread's emit, caught between queuing its event and waking the loop
        bus._handed_over.append((None, ("x", 1, 0, None)))
    await bus.aclose()
    assert recorder.items == [1]


@pytest.mark.anyio
async def test_what_a_thread_handed_over_as_the_bus_closed_is_logged_as_dropped(
    recorder: Recorder, records: Records
) -> None:
    bus = EventBus()

    @bus.on("x")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    await bus.start()
    await bus.drain()
    with bus._lock:  # handed over after the drain's last look, before the close (another thread)
        bus._handed_over.append((None, ("x", 1, 0, None)))
    bus._close_runner()  # what aclose() does next, with no await in between
    record = await records.wait_for("event 'x' was dropped because the bus is closed")
    assert record.levelno == logging.ERROR
    bus._runner.shutdown()  # the rest of aclose()
    assert recorder.items == []
    bus.emit("x", 2)  # from now on dropped at once, also from threads
    thread = threading.Thread(target=bus.emit, args=("x", 3))
    thread.start()
    thread.join()
    dropped = [r.getMessage() for r in records.recorder.items]
    assert dropped.count("event 'x' was dropped because the bus is closed") == 3


@pytest.mark.anyio
async def test_a_job_that_outlives_a_restart_gives_back_no_slot_of_the_new_count() -> None:
    bus = EventBus(handler_timeout=None, drain_timeout=0.05, limits=Limits(max_concurrency=1))
    cleaning_up = asyncio.Event()
    cleaned_up = asyncio.Event()

    @bus.on("stubborn")
    async def stubborn(event: Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning_up.set()
            await cleaned_up.wait()  # clean-up that outlives the drain's cancellation

    await bus.start()
    bus.emit("stubborn")
    await anyio.wait_all_tasks_blocked()
    await bus.aclose()  # the drain bound cuts the job off; it swallows the cancellation
    await cleaning_up.wait()
    await bus.start()  # counts slots afresh
    runner = bus._runner
    assert runner._running == 0
    cleaned_up.set()
    await anyio.wait_all_tasks_blocked()  # the old job ends
    assert runner._running == 0  # not -1: the limit of one still holds
    await bus.aclose()


@pytest.mark.anyio
async def test_closing_a_bus_that_never_started() -> None:
    bus = EventBus()
    await bus.aclose()
    assert bus.state is BusState.CLOSED
    await bus.drain()  # nothing to drain: returns at once


@pytest.mark.anyio
async def test_the_drain_bound_reports_queued_jobs_and_outside_events_too() -> None:
    bus = EventBus(handler_timeout=None, limits=Limits(max_concurrency=1))
    entered = asyncio.Event()

    @bus.on("stuck")
    async def hangs(event: Event) -> None:
        entered.set()
        await asyncio.Event().wait()

    await bus.start()
    bus.emit("stuck", 1)
    await entered.wait()
    bus.emit("stuck", 2)  # its job waits for the only slot
    await asyncio.sleep(0)
    bus.emit("stuck", 3)  # still queued outside any job when the bound runs out
    with pytest.raises(DrainTimeoutError) as caught:
        await bus.drain(timeout=0.05)
    assert sorted(p.event.payload for p in caught.value.pending) == [1, 2, 3]
    await bus.aclose()


@pytest.mark.anyio
async def test_the_drain_bound_stops_a_sync_batch_before_its_next_call() -> None:
    bus = EventBus(handler_timeout=None)
    release = threading.Event()
    started = Recorder()

    @bus.on("work")
    def blocking(event: Event) -> None:
        started.add(event.payload)
        release.wait(5)

    async with bus:
        for i in range(3):
            bus.emit("work", i)
        await started.wait_count(1)
        with pytest.raises(DrainTimeoutError) as caught:
            await bus.drain(timeout=0.05)
        assert [p.event.payload for p in caught.value.pending] == [0, 1, 2]
        release.set()
    assert started.items == [0]  # the calls after the cut-off never ran


@pytest.mark.anyio
async def test_a_request_task_cancelled_mid_handlers_reports_what_did_not_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[HandlerError] = []
    bus = EventBus(on_failure=failures.append)
    entered = asyncio.Event()

    @bus.on("a")
    async def hangs(event: Event) -> None:
        entered.set()
        await asyncio.Event().wait()

    @bus.on("a")
    async def later(event: Event) -> None: ...

    async with bus:
        task = asyncio.create_task(run_inline(bus, _scope_with(bus, "a")))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [type(f) for f in failures] == [HandlerCancelledError, HandlerCancelledError]
    assert [f.handler.rsplit(".", 1)[-1] for f in failures] == ["hangs", "later"]
    assert "cancelled with 2 call(s) unfinished" in caplog.text
    assert all(r.levelno == logging.ERROR for r in caplog.records)


async def run_inline(bus: EventBus, job: Job) -> None:
    """What the middleware does with a finished request's job, in the current task."""
    if bus.request_job(job):
        await bus.run_job(job)


def _scope_with(bus: EventBus, name: str) -> Job:
    from time import time_ns

    return Job(bus, [(name, None, time_ns(), None)])


@pytest.mark.anyio
async def test_bus_emit_inside_a_request_is_buffered_like_emit() -> None:
    from tidings._core.dispatcher import Scope, reset_scope, set_scope

    bus = EventBus()
    async with bus:
        scope = Scope(bus, [])
        token = set_scope(scope)
        try:
            bus.emit("buffered", 1, headers={"correlation-id": "c"})
        finally:
            reset_scope(token)
        assert scope.buffer is not None
        assert [(r[0], r[1], r[3]) for r in scope.buffer] == [("buffered", 1, {"correlation-id": "c"})]


def test_pending_delivery_value_semantics() -> None:
    event = Event("a", timestamp_ns=0)
    one, same = PendingDelivery(event, "h"), PendingDelivery(event, "h")
    assert one == same and hash(one) == hash(same)
    assert one != PendingDelivery(event, "other")
    assert one != "h"
    assert repr(one) == f"PendingDelivery(event='a', id={event.id}, handler='h')"


@pytest.mark.anyio
async def test_on_failure_hears_of_a_call_the_drain_bound_cut_off() -> None:
    failures: list[HandlerError] = []
    bus = EventBus(drain_timeout=0.2, handler_timeout=None, on_failure=failures.append)
    started = asyncio.Event()

    @bus.on("stuck")
    async def hang_forever(event: Event) -> None:
        started.set()
        await asyncio.Event().wait()

    with anyio.fail_after(5):
        async with bus:
            bus.emit("stuck")
            await started.wait()
        # aclose() drained for 0.2 s, cancelled the call, logged it ... and told on_failure?
    assert [(type(f), f.handler.rsplit(".", 1)[-1], f.event.name) for f in failures] == [
        (HandlerCancelledError, "hang_forever", "stuck")
    ]


@pytest.mark.anyio
async def test_a_start_while_aclose_winds_down_waits_for_it(recorder: Recorder) -> None:
    release = asyncio.Event()

    async def hook(error: HandlerError) -> None:
        if "after the bus closed" in str(error):
            await release.wait()  # aclose() waits for it (within its bound), the bus closed already

    bus = EventBus(on_failure=hook)

    @bus.on("x", retry=RetryPolicy(max_attempts=2, backoff=60, jitter=0))  # abandoned by aclose()
    async def handler(event: Event) -> None:
        if event.payload == 1:
            raise RuntimeError("reported to the hook")
        recorder.add(event.payload)

    await bus.start()
    await bus.emit_now("x", 1)
    closing = asyncio.create_task(bus.aclose())
    await anyio.wait_all_tasks_blocked()
    assert bus.state.value == "closed"
    with pytest.raises(BusStateError, match="is closing"):
        bus.ensure_running()  # a request without lifespan: refused, not a run closed under it
    starting = asyncio.create_task(bus.start())
    await anyio.wait_all_tasks_blocked()
    assert not starting.done()  # the new run waits for the old one to be closed
    release.set()
    await closing
    await starting
    assert bus.state.value == "running"
    bus.emit("x", 2)
    assert await recorder.wait_count(1) == [2]
    await bus.aclose()


class _StallAfterRelease:
    """The bus's lock, but the thread named ``stalled`` stops once it has released it, until ``go``."""

    def __init__(self, lock: Any, stalled: threading.Event, go: threading.Event) -> None:
        self.lock, self.stalled, self.go = lock, stalled, go

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.lock.release()
        if threading.current_thread().name == "stalled" and not self.stalled.is_set():
            self.stalled.set()
            self.go.wait(5)


@pytest.mark.anyio
async def test_a_sync_handlers_event_joins_its_job_while_another_thread_hands_one_over() -> None:
    # Another thread has queued its event and is about to wake the loop: a sync handler's emit
    # that finds the wake-up pending must still reach its job before the handler's hop ends.
    bus = EventBus()
    stalled, go, emitted = threading.Event(), threading.Event(), threading.Event()
    jobs: dict[str, object] = {}
    child_ran = asyncio.Event()

    @bus.on("parent")
    def parent(event: Event) -> None:
        jobs["parent"] = current_scope()
        bus.emit("child")
        emitted.set()

    @bus.on("child")
    async def child(event: Event) -> None:
        jobs["child"] = current_scope()
        child_ran.set()

    @bus.on("other")
    async def other(event: Event) -> None: ...

    async with bus:
        bus._lock = _StallAfterRelease(bus._lock, stalled, go)  # type: ignore[assignment]
        thread = threading.Thread(target=bus.emit, args=("other",), name="stalled")
        thread.start()
        assert await anyio.to_thread.run_sync(stalled.wait, 5)
        bus.emit("parent")
        assert await anyio.to_thread.run_sync(emitted.wait, 5)
        assert await bus._runner.wait_idle(monotonic() + 5)  # the parent's job has ended
        go.set()
        await anyio.to_thread.run_sync(thread.join, 5)
        with anyio.fail_after(5):
            await child_ran.wait()
        await bus.drain()
    assert jobs["child"] is jobs["parent"]


def test_a_plain_def_call_that_fails_after_its_loop_closed_is_logged(records: Records) -> None:
    # Cut off at shutdown, it ran on in its thread; when it failed, the loop it would report to was
    # gone, and the failure went nowhere
    bus = EventBus(drain_timeout=0.01)
    entered, release = threading.Event(), threading.Event()

    @bus.on("x")
    def slow(event: Event) -> None:
        entered.set()
        release.wait(5)
        raise ValueError("too late")

    async def main() -> None:
        await bus.start()
        bus.emit("x")
        assert await anyio.to_thread.run_sync(entered.wait, 5)
        await bus.aclose()

    asyncio.run(main())
    release.set()
    record = asyncio.run(records.wait_for("raised ValueError: too late after its event loop closed"))
    assert record.levelno == logging.ERROR


_EXITS_RUNNING = """
import asyncio, threading
from tidings import EventBus

bus = EventBus(name="never-closed")

@bus.on("slow")
async def slow(event):
    await asyncio.Event().wait()

@bus.on("later")
def later(event):
    pass

@bus.on("idle")
async def idle(event):
    pass

async def main():
    await bus.start()
    bus.emit("slow", 1)  # its job is still running when the loop closes
    for _ in range(3):
        await asyncio.sleep(0)
    bus.emit("later", 2)  # accepted, its job never runs

asyncio.run(main())
closed = EventBus(name="closed-properly")

async def properly():
    async with closed:
        closed.emit("idle")

asyncio.run(properly())

stopped = EventBus(name="loop-stopped")

@stopped.on("queued")
async def queued(event):
    pass

loop = asyncio.new_event_loop()
loop.run_until_complete(stopped.start())
stopped.emit("queued", 3)  # accepted as its loop stopped: it waits for the loop to run again
print("exiting")
"""


def test_a_process_exiting_with_a_bus_never_closed_logs_what_it_leaves_unfinished() -> None:
    # No drain ran (no lifespan, no `async with bus`): the events it accepted and never finished
    # are lost, but not in silence.
    result = subprocess.run(
        [sys.executable, "-c", _EXITS_RUNNING], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == "exiting\n"
    [line] = [line for line in result.stderr.splitlines() if "never-closed" in line]
    assert "was still running when the process exited" in line
    assert "later <- later (" in line  # its job never ran
    assert "slow" not in line  # asyncio.run cancelled its job, which reported it
    assert any(
        "handler __main__.slow did not finish: its job was cancelled" in x for x in result.stderr.splitlines()
    )
    assert "closed-properly" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "loop-stopped" in line]
    assert line.endswith("1 call(s) never finished; they are lost: queued (not started yet)")
