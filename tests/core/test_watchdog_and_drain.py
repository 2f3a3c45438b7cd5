"""Regressions: the watchdog and drain must only ever act on calls a job has actually started."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

import anyio
import pytest

from tidings import (
    DrainTimeoutError,
    Event,
    EventBus,
    HandlerCancelledError,
    HandlerError,
    Limits,
)

from ..conftest import Recorder, Records

pytestmark = pytest.mark.anyio


async def test_a_watchdog_tick_before_a_job_starts_cancels_nothing(
    recorder: Recorder, failures: list[HandlerError]
) -> None:
    bus = EventBus(handler_timeout=0.01, on_failure=failures.append)

    @bus.on("x")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    async with bus:
        runner = bus._runner
        for i in range(50):
            bus.emit("x", i)
            bus._spawn_outside_job()  # the job is tracked, its task has not run a step yet
            time.sleep(0.012)  # noqa: ASYNC251 - past the handler's timeout, as a busy loop would be
            runner._watch()  # a tick in the same loop iteration
            runner._watch()
        await recorder.wait_count(50)
    assert sorted(recorder.items) == list(range(50))
    assert failures == []


async def test_jobs_waiting_for_a_slot_are_not_timed_out(
    recorder: Recorder, failures: list[HandlerError]
) -> None:
    bus = EventBus(handler_timeout=0.05, limits=Limits(max_concurrency=1), on_failure=failures.append)
    gate = asyncio.Event()

    @bus.on("first", timeout=None)
    async def holds_the_slot(event: Event) -> None:
        await gate.wait()

    @bus.on("second")
    async def quick(event: Event) -> None:
        recorder.add("second")

    # the watchdog's ticks, spied on: the wait below ends at its first tick past six timeouts
    runner = bus._runner
    watch = runner._watch
    late_tick = asyncio.Event()
    late = float("inf")

    def watched() -> None:
        watch()
        if time.monotonic() > late:
            late_tick.set()

    runner._watch = watched  # type: ignore[method-assign]
    async with bus:
        bus.emit("first")
        await asyncio.sleep(0)
        bus.emit("second")  # its job waits for the only slot, far longer than its timeout
        late = time.monotonic() + 6 * 0.05
        with anyio.fail_after(10):
            await late_tick.wait()
        gate.set()
        await recorder.wait_count(1)
    assert failures == []


async def test_a_drain_with_no_time_left_reports_jobs_that_never_started(
    failures: list[HandlerError],
) -> None:
    bus = EventBus(on_failure=failures.append)

    @bus.on("x")
    async def handler(event: Event) -> None: ...

    await bus.start()
    bus.emit("x", 1)
    with pytest.raises(DrainTimeoutError) as caught:
        await bus.drain(timeout=0)
    assert [(p.event.payload, p.handler.rsplit(".", 1)[-1]) for p in caught.value.pending] == [(1, "handler")]
    assert [type(f) for f in failures] == [HandlerCancelledError]
    assert not bus._runner.jobs  # nothing left behind to stall the next drain
    await bus.aclose()


async def test_a_loop_stall_is_not_blamed_on_the_next_handler(failures: list[HandlerError]) -> None:
    bus = EventBus(on_failure=failures.append)
    done = asyncio.Event()

    @bus.on("x", timeout=None)
    async def stalls_the_loop(event: Event) -> None:
        time.sleep(0.3)  # noqa: ASYNC251 - blocks the loop: a bug in a handler, but it happens

    @bus.on("x", timeout=0.05)
    async def quick(event: Event) -> None:
        await asyncio.sleep(0.01)
        done.set()

    async with bus:
        bus.emit("x")
        await done.wait()
    assert failures == []


async def test_a_timeout_and_an_outside_cancel_report_the_call_once(failures: list[HandlerError]) -> None:
    bus = EventBus(handler_timeout=None, on_failure=failures.append)
    started = asyncio.Event()

    @bus.on("x", timeout=0.05)
    async def hangs(event: Event) -> None:
        started.set()
        await asyncio.Event().wait()

    @bus.on("x")
    async def next_in_line(event: Event) -> None: ...

    runner = bus._runner
    watch = runner._watch

    def watch_then_cancel_too() -> None:
        watch()
        for job in runner.jobs:
            if job.timed_out and job.task is not None:
                job.task.cancel()  # someone else cancels in the same tick as the watchdog

    runner._watch = watch_then_cancel_too  # type: ignore[method-assign]  # the point of the test
    async with bus:
        bus.emit("x")
        await started.wait()
        (job,) = runner.jobs
        task = job.task  # the job lets go of its task when it ends
        assert task is not None
        await asyncio.wait({task})
    kinds = [(type(f).__name__, f.handler.rsplit(".", 1)[-1]) for f in failures]
    assert kinds == [("HandlerTimeoutError", "hangs"), ("HandlerCancelledError", "next_in_line")]


async def test_a_batch_handler_may_empty_its_list(failures: list[HandlerError], recorder: Recorder) -> None:
    bus = EventBus(on_failure=failures.append)

    class Greedy:
        async def handle_many(self, events: list[Event]) -> None:
            events.clear()
            raise RuntimeError("after clearing")

    bus.subscribe(Greedy(), "x")

    @bus.on("x")
    async def other(event: Event) -> None:
        recorder.add(event.payload)

    async with bus:
        bus.emit("x", 1)
        bus.emit("x", 2)
        await bus.drain()
    assert recorder.items == [1, 2]
    assert [e.payload for e in failures[0].events] == [1, 2]


async def test_closing_a_bus_that_never_started_says_what_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    bus.emit("waiting", 1)
    await bus.aclose()
    assert "event 'waiting' was dropped because the bus was closed without ever being started" in caplog.text
    # first the warning that an event waits on a running loop for a bus nobody started, then the drop
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.ERROR]


async def test_events_emitted_while_a_job_is_cut_off_are_reported(failures: list[HandlerError]) -> None:
    from tidings import emit

    bus = EventBus(handler_timeout=None, on_failure=failures.append)
    started = asyncio.Event()

    @bus.on("order.charge")
    async def charge(event: Event) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            emit("order.charge_aborted")  # the handler's own clean-up announces something
            raise

    @bus.on("order.charge_aborted")
    async def audit(event: Event) -> None: ...

    async with bus:
        bus.emit("order.charge")
        await started.wait()
        with pytest.raises(DrainTimeoutError):
            await bus.drain(timeout=0.01)
    reported = sorted((f.handler.rsplit(".", 1)[-1], f.event.name) for f in failures)
    assert reported == [("audit", "order.charge_aborted"), ("charge", "order.charge")]


async def test_chained_events_waiting_in_a_cut_off_job_are_reported_once(
    failures: list[HandlerError],
) -> None:
    from tidings import emit

    bus = EventBus(handler_timeout=None, on_failure=failures.append)
    started = asyncio.Event()

    @bus.on("order.placed")
    async def place(event: Event) -> None:
        emit("order.audit")  # waits in the job's buffer until this handler returns
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            emit("order.aborted")  # emitted while the cut-off cancels it: reported on its own
            raise

    @bus.on("order.audit", "order.aborted")
    async def audit(event: Event) -> None: ...

    async with bus:
        bus.emit("order.placed")
        await started.wait()
        (job,) = bus._runner.jobs
        task = job.task  # the job lets go of its task when it ends
        with pytest.raises(DrainTimeoutError) as caught:
            await bus.drain(timeout=0.01)
        assert task is not None
        await asyncio.wait({task})
    reported = [(f.event.name, f.event.id) for f in failures]
    assert sorted(name for name, _ in reported) == ["order.aborted", "order.audit", "order.placed"]
    # the drain's own list and the hook name the same events, each once
    assert {(p.event.name, p.event.id) for p in caught.value.pending} <= set(reported)


async def test_events_accepted_as_the_drain_cuts_off_are_reported_not_run_after_close(
    failures: list[HandlerError],
) -> None:
    from tidings import BusState

    bus = EventBus(drain_timeout=0.05, on_failure=failures.append)
    handled: list[int] = []
    handled_closed: list[int] = []

    @bus.on("slow")
    async def slow(event: Event) -> None:
        await asyncio.Event().wait()  # holds the drain until its bound runs out

    @bus.on("tick")
    async def tick(event: Event) -> None:
        handled.append(event.payload)
        if bus.state is BusState.CLOSED:
            handled_closed.append(event.payload)

    async def ticker() -> list[int]:  # a lifespan task, emitting every loop iteration
        emitted: list[int] = []
        while bus.state is not BusState.CLOSED:
            bus.emit("tick", len(emitted))
            emitted.append(len(emitted))
            await asyncio.sleep(0)
        return emitted

    await bus.start()
    bus.emit("slow")
    ticking = asyncio.create_task(ticker())
    await bus.aclose()  # cut off; the ticker's emit in the cut-off's own tick is the case
    emitted = await ticking
    reported = [f.event.payload for f in failures if f.event.name == "tick"]
    assert handled_closed == []
    assert sorted(handled + reported) == emitted  # each one handled or reported, once


async def test_a_handler_swallowing_the_cut_off_does_not_run_the_rest(
    recorder: Recorder, failures: list[HandlerError]
) -> None:
    bus = EventBus(handler_timeout=None, on_failure=failures.append)
    started = asyncio.Event()

    @bus.on("x")
    async def stubborn(event: Event) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # swallowed

    @bus.on("x")
    async def after(event: Event) -> None:
        recorder.add("after ran")

    async with bus:
        bus.emit("x")
        await started.wait()
        (job,) = bus._runner.jobs
        task = job.task  # the job lets go of its task when it ends
        with pytest.raises(DrainTimeoutError) as caught:
            await bus.drain(timeout=0.01)
        assert task is not None
        await asyncio.wait({task})
    assert recorder.items == []  # reported as unfinished, so it must not run after all
    assert sorted(p.handler.rsplit(".", 1)[-1] for p in caught.value.pending) == ["after", "stubborn"]


async def test_a_timed_out_call_cut_off_in_the_same_tick_is_reported_once(
    failures: list[HandlerError],
) -> None:
    bus = EventBus(on_failure=failures.append)
    started = asyncio.Event()

    @bus.on("x", timeout=0.05)
    async def hangs(event: Event) -> None:
        started.set()
        await asyncio.Event().wait()

    async with bus:
        bus.emit("x")
        await started.wait()
        runner = bus._runner
        (job,) = runner.jobs
        task = job.task  # the job lets go of its task when it ends
        job.seen, job.seen_at = job.current, 0.0  # the watchdog has seen it for ages
        runner._watch()  # marks it timed out and cancels it ...
        pending = runner.cut_off()  # ... and drain cuts the job off before it resumes
        runner.report_unfinished(pending, "the drain bound ran out")
        assert task is not None
        await asyncio.wait({task})
    assert [(type(f).__name__, f.handler.rsplit(".", 1)[-1]) for f in failures] == [
        ("HandlerCancelledError", "hangs")
    ]


async def test_a_handler_registered_while_jobs_run_gets_the_shorter_tick_at_once() -> None:
    bus = EventBus(handler_timeout=None)
    release = asyncio.Event()

    @bus.on("background")
    async def long_running(event: Event) -> None:
        await release.wait()

    async with bus:
        bus.emit("background")
        await anyio.wait_all_tasks_blocked()  # its job is tracked: the watchdog runs, slowly
        runner, loop = bus._runner, asyncio.get_running_loop()
        assert runner._watch_handle is not None

        @bus.on("quick", timeout=0.04)
        async def quick(event: Event) -> None: ...

        await anyio.wait_all_tasks_blocked()  # the re-arm is scheduled thread-safely
        # the next tick is due within the new tick (a quarter of 0.04 s), not the old 0.5 s
        # (with room for uvloop's clock, which counts in milliseconds)
        assert runner._watch_handle is not None
        assert runner._watch_handle.when() < loop.time() + 0.1
        release.set()


async def test_a_job_cancelled_from_outside_runs_none_of_the_sync_calls_it_reported(
    recorder: Recorder, failures: list[HandlerError]
) -> None:
    import threading

    # one worker thread: a later hop runs only once the cancelled job's hop has ended
    bus = EventBus(handler_timeout=None, on_failure=failures.append, limits=Limits(max_threads=1))
    started, gate = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()

    @bus.on("x")
    def first(event: Event) -> None:
        loop.call_soon_threadsafe(started.set)
        gate.wait(5)
        recorder.add("first")

    @bus.on("x")
    def second(event: Event) -> None:  # pragma: no cover - reported as unfinished, so never run
        recorder.add("second")

    @bus.on("x")
    async def waits(event: Event) -> None:
        await asyncio.Event().wait()

    @bus.on("probe")
    def probe(event: Event) -> None:
        recorder.add("probe")

    async with bus:
        bus.emit("x")
        await started.wait()
        (job,) = bus._runner.jobs
        assert job.task is not None
        job.task.cancel()  # from outside: a server cancelling a request's task, say
        await asyncio.wait({job.task})
        gate.set()
        bus.emit("probe")
        assert await recorder.wait_count(2) == ["first", "probe"]
    reported = sorted(f.handler.rsplit(".", 1)[-1] for f in failures)
    assert reported == ["first", "second", "waits"]  # "first" was running when its job was cancelled


async def test_a_request_job_cut_off_before_its_task_ran_lets_later_emits_through(recorder: Recorder) -> None:
    from tidings import emit
    from tidings._core.dispatcher import reset_scope, set_scope

    bus = EventBus(request_handlers="task")

    @bus.on("req", "late")
    async def handler(event: Event) -> None:
        recorder.add(event.name)

    async with bus:
        events = bus.open_request()  # what the middleware does for a request
        token = set_scope(events)
        try:
            emit("req")
            bus.spawn_request_job(events)  # the response is sent; its job's task has not run yet
            task = events.task  # the job lets go of its task when it ends
            with pytest.raises(DrainTimeoutError) as caught:
                await bus.drain(0)  # the bound runs out in that same tick
            assert task is not None
            await asyncio.wait({task})
            emit("late")  # a task the request started, after it finished: not lost
        finally:
            reset_scope(token)
        assert await recorder.wait_count(1) == ["late"]
    assert [p.event.name for p in caught.value.pending] == ["req"]


async def test_an_emit_now_started_as_the_drain_cuts_off_is_cut_off_at_close(
    failures: list[HandlerError],
) -> None:
    # Found by tests/core/test_accounting.py (seeds 9 and 34): the emit_now() ran its first step
    # in the tick the cut-off gives its cancellations, so its job escaped the cut-off and ran
    # after the bus closed; its plain def handler then found no worker threads, and the call
    # ended in nothing at all (an AssertionError in a task nobody awaited).
    bus = EventBus(drain_timeout=0, on_failure=failures.append)
    ran: list[str] = []

    @bus.on("slow")
    async def slow(event: Event) -> None:
        await asyncio.Event().wait()  # holds the drain until its bound runs out

    @bus.on("now", name="async_handler")
    async def async_handler(event: Event) -> None:
        ran.append("async_handler")

    @bus.on("now", name="sync_handler")
    def sync_handler(event: Event) -> None:
        ran.append("sync_handler")

    await bus.start()
    bus.emit("slow")
    late = asyncio.create_task(bus.emit_now("now"))  # its first step runs in the cut-off's tick
    await bus.aclose()
    errors = await late
    reported = sorted(f.handler for f in failures if f.event.name == "now")
    assert ran == []  # nothing runs on a closed bus...
    assert reported == ["async_handler", "sync_handler"]  # ...and what did not run is reported
    assert sorted(e.handler for e in errors) == reported  # to emit_now's caller as well


async def test_a_request_that_ends_while_the_bus_closes_drops_its_events_by_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found by tests/core/test_accounting.py: between the close and the end of aclose() (here:
    # waiting for an async failure hook), a request's job still started, and ran its handlers on
    # a closed bus, with no drain to wait for them and no worker threads for its plain def ones.
    from tidings import BusState, emit
    from tidings._core.dispatcher import reset_scope, set_scope

    states: list[BusState] = []

    async def hook(error: HandlerError) -> None:  # runs while aclose() waits for it, after the close
        states.append(bus.state)
        await bus.run_job(events, asyncio.current_task())  # the request's response is sent now

    bus = EventBus(drain_timeout=0.01, on_failure=hook)
    ran: list[str] = []

    @bus.on("slow")
    async def slow(event: Event) -> None:
        await asyncio.Event().wait()

    @bus.on("req")
    async def handler(event: Event) -> None:
        ran.append(event.name)

    await bus.start()
    events = bus.open_request()  # what the middleware does for a request
    token = set_scope(events)
    try:
        emit("req")
    finally:
        reset_scope(token)
    bus.emit("slow")
    with caplog.at_level(logging.ERROR, logger="tidings"):
        await bus.aclose()
    assert states == [BusState.CLOSED]
    assert ran == []
    assert any("'req' was dropped because the bus is closed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # its loop's call_soon_threadsafe can be wrapped
async def test_a_sync_failure_reported_just_before_a_take_over_is_not_reported_unfinished_too(
    anyio_backend: str, recorder: Recorder
) -> None:
    # The thread passed the failure to the loop and was then held up before it marked the call
    # finished: the loop reported the failure, a drain took the job over, and reported the same
    # call unfinished as well (two outcomes for one call; seed 40 of the accounting test).
    bus = EventBus(on_failure=recorder.add)

    @bus.on("x")
    def broken(event: Event) -> None:
        raise ValueError("broken")

    passed_on, go_on = threading.Event(), threading.Event()
    async with bus:
        loop = asyncio.get_running_loop()
        schedule = loop.call_soon_threadsafe

        def held_up_after_the_failure(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
            # (a thread passes what the loop is to run by a key of bus._runner.in_transit; read before
            # the loop can run it and take it out)
            passed = bus._runner.in_transit.get(args[0]) if args else None
            handle = schedule(callback, *args, **kwargs)
            if passed is not None and passed[0] == bus._runner._sync_call_failed:
                passed_on.set()
                go_on.wait(5)
            return handle

        loop.call_soon_threadsafe = held_up_after_the_failure  # type: ignore[method-assign, assignment]
        try:
            bus.emit("x")
            assert await anyio.to_thread.run_sync(passed_on.wait, 5)
            [failure] = await recorder.wait_count(1)  # the loop reported it; the thread is held up
            with contextlib.suppress(DrainTimeoutError):
                await bus.drain(0)  # takes the job over: its hop has not ended
        finally:
            go_on.set()
            loop.call_soon_threadsafe = schedule  # type: ignore[method-assign]
    assert [type(item) for item in recorder.items] == [HandlerError]
    assert "raised ValueError: broken" in str(failure)


async def test_a_sync_failure_after_the_take_over_reported_the_call_is_listed_as_only_logged(
    records: Records,
) -> None:
    # The drain bound cut the job off while the call ran, and reported it unfinished. Its failure,
    # on its way from the thread, is not reported again (no on_failure, no retry, no dead letter):
    # it is only logged, and that is what a report of pending work says of it meanwhile.
    started, go, pause = threading.Event(), threading.Event(), threading.Event()
    failures = Recorder()
    bus = EventBus(on_failure=failures.add)

    @bus.on("x", name="fails")
    def fails(event: Event) -> None:
        started.set()
        assert go.wait(5)
        raise ValueError("down")

    async with bus:
        bus.emit("x")
        assert await anyio.to_thread.run_sync(started.wait, 5)
        with pytest.raises(DrainTimeoutError) as raised:
            await bus.drain(0)
        go.set()
        deadline = time.monotonic() + 5
        while not bus._runner.in_transit:  # blocking: the loop must not run the failure first
            assert time.monotonic() < deadline
            pause.wait(0.001)
        [pending] = bus._pending_work()  # what settle, or the exit report, would say now
        logged = await records.wait_for("after it was reported as unfinished")
        letters = await bus.dead_letters.list()
    assert pending.startswith("fails <- x (")
    assert pending.endswith(
        ", reported unfinished (its job was cut off), then failed: its failure only logged"
    ), pending
    assert [p.handler for p in raised.value.pending] == ["fails"]
    assert [(type(f).__name__, f.handler) for f in failures.items] == [("HandlerCancelledError", "fails")]
    assert "handler fails raised ValueError" in logged.getMessage() and letters == []
