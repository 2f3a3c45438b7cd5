"""The awaitable emit, the default bus, taps, and Arguments payloads through the event log."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import tidings
from tidings import Arguments, BusStateError, DrainTimeoutError, Event, EventBus, RetryPolicy
from tidings._core.default import reset_default_bus
from tidings.store import SQLiteStore
from tidings.store.codec import decode_event, encode_payload
from tidings.testing import settle

from ..conftest import Recorder, Records

pytestmark = pytest.mark.anyio


async def test_emit_now_waits_for_handlers_and_their_chained_events(
    bus: EventBus, recorder: Recorder
) -> None:
    @bus.on("order.placed")
    async def reserve(event: Event) -> None:
        await asyncio.sleep(0)
        recorder.add("reserved")
        tidings.emit("stock.reserved", event.payload)

    @bus.on("stock.reserved")
    def ship(event: Event) -> None:
        recorder.add(("shipped", event.payload))

    async with bus:
        assert await bus.emit_now("order.placed", 7) == ()
        assert recorder.items == ["reserved", ("shipped", 7)]  # no waiting needed: it is done


async def test_emit_now_returns_first_attempt_failures_and_retries_as_usual(
    bus: EventBus, recorder: Recorder
) -> None:
    attempts: list[int] = []

    @bus.on("flaky", retry=RetryPolicy(max_attempts=2, backoff=0.01, jitter=0))
    async def flaky(event: Event) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first time")
        recorder.add("second")

    @bus.on("flaky")
    async def fine(event: Event) -> None:
        recorder.add("fine")

    async with bus:
        (failure,) = await bus.emit_now("flaky")
        assert failure.handler.endswith("flaky") and failure.retry_in is not None
        assert "fine" in recorder.items
        await recorder.wait_for(lambda items: "second" in items)


async def test_emit_now_edge_cases(recorder: Recorder) -> None:
    bus = EventBus(name="edges")
    assert await bus.emit_now("nobody.listens") == ()  # starts the bus lazily on this loop
    assert bus.state is tidings.BusState.RUNNING
    await bus.aclose()
    with pytest.raises(BusStateError, match="is closed"):
        await bus.emit_now("x")

    disabled = EventBus(enabled=False)

    @disabled.on("x")
    async def never(event: Event) -> None:
        recorder.add(event)

    assert await disabled.emit_now("x") == ()
    assert recorder.items == []


async def test_emit_now_with_a_typed_event_and_schema(bus: EventBus, recorder: Recorder) -> None:
    from dataclasses import dataclass

    @dataclass
    class Paid:
        amount: float

    @bus.on(Paid)
    async def handler(paid: Paid) -> None:
        recorder.add(paid)

    async with bus:
        await bus.emit_now(Paid(1.0))
        await bus.emit_now("Paid", {"amount": "2.5"})
        with pytest.raises(tidings.EventValidationError):
            await bus.emit_now("Paid", {"amount": "lots"})
    assert recorder.items == [Paid(1.0), Paid(2.5)]


@pytest.fixture
def fresh_default_bus() -> Iterator[None]:
    reset_default_bus()
    yield
    reset_default_bus()


@pytest.mark.usefixtures("fresh_default_bus")
async def test_the_default_bus_takes_decorators_at_import_time(recorder: Recorder) -> None:
    @tidings.on("payment.processed")
    async def settle(payment_id: str, status: str, amount: float) -> None:
        recorder.add((payment_id, status, amount))

    bus = tidings.default_bus()
    assert bus is tidings.default_bus()
    assert bus.name == "default"
    async with bus:
        assert await bus.emit_now("payment.processed", "payment_123", "success", 99.99) == ()
        with pytest.raises(BusStateError, match="is running"):
            reset_default_bus()
    assert recorder.items == [("payment_123", "success", 99.99)]


@pytest.mark.usefixtures("fresh_default_bus")
def test_two_default_buses_are_never_made_by_racing_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        buses = set(map(id, pool.map(lambda _: tidings.default_bus(), range(64))))
    assert len(buses) == 1


async def test_taps_see_every_emit_at_emit_time(bus: EventBus) -> None:
    seen: list[tuple[str, object]] = []
    untap = bus.tap(lambda event: seen.append((event.name, event.payload)))

    def broken(event: Event) -> None:
        raise RuntimeError("a tap that fails")

    bus.tap(broken)
    bus.emit("before.start", 1)  # nobody listens, the bus has not started: still seen
    async with bus:
        await bus.emit_now("now", 2)
        tidings.emit("scoped", 3)
    untap()
    bus.emit("after", 4)
    assert seen == [("before.start", 1), ("now", 2), ("scoped", 3)]
    assert bus.inspects_emits  # the broken tap is still there


async def test_an_event_a_thread_emits_is_pending_by_the_time_a_tap_sees_it(bus: EventBus) -> None:
    # capture() records with a tap: a test that saw the event captured, then settles the bus, must
    # find its handler work pending, although the thread has not handed it to the loop yet
    pending_when_tapped: list[bool] = []
    bus.tap(lambda event: pending_when_tapped.append(bus._waiting()))

    @bus.on("x")
    async def handler(event: Event) -> None: ...

    async with bus:
        thread = threading.Thread(target=bus.emit, args=("x",))
        thread.start()
        thread.join()
        assert bus._waiting()  # handed over, not taken by the loop yet (it was blocked here)
        await bus.drain()
        assert not bus._waiting()
    assert pending_when_tapped == [True]


@pytest.mark.parametrize("waiter", ["drain", "settle"])
async def test_a_threads_emit_stuck_in_a_tap_holds_a_drain_or_settle_no_longer_than_its_bound(
    bus: EventBus, waiter: str
) -> None:
    in_tap, release = threading.Event(), threading.Event()

    def slow_tap(event: Event) -> None:
        in_tap.set()
        release.wait(10)

    bus.tap(slow_tap)

    @bus.on("x")
    async def handler(event: Event) -> None: ...

    thread = threading.Thread(target=bus.emit, args=("x",))
    try:
        async with bus:
            thread.start()
            assert await asyncio.to_thread(in_tap.wait, 5)
            with anyio.fail_after(5):  # the bound below is 0.05s: it spun until the tap returned
                if waiter == "drain":
                    with pytest.raises(DrainTimeoutError):
                        await bus.drain(0.05)
                else:
                    with pytest.raises(TimeoutError, match=r"1 emit\(s\) in another thread, still in a tap"):
                        await settle(bus, timeout=0.05)
            release.set()
            await asyncio.to_thread(thread.join, 5)
    finally:
        release.set()


async def test_released_outbox_events_are_tapped(bus: EventBus) -> None:
    seen: list[Event] = []
    bus.tap(seen.append)
    event = Event("order.placed", {"id": 1})
    bus.release(event)
    assert seen == [event]


def test_arguments_survive_the_codec() -> None:
    event = Event("payment.processed", Arguments(("p-1", 9.5), {"currency": "EUR"}))
    text = encode_payload(event)
    back = decode_event(event.id, event.name, text, "{}", event.timestamp_ns)
    assert back.payload == Arguments(("p-1", 9.5), {"currency": "EUR"})
    plain = decode_event(event.id, event.name, '{"$tidings.arguments": 1, "other": 2}', "{}", 0)
    assert plain.payload == {"$tidings.arguments": 1, "other": 2}


async def test_arguments_handlers_run_again_from_the_log(recorder: Recorder, tmp_path: Path) -> None:
    path = str(tmp_path / "log.db")
    first = EventBus(store=SQLiteStore(path), name="first")

    @first.on("payment.processed", name="settle")
    async def fails(payment_id: str, amount: float) -> None:
        raise RuntimeError("bank is down")

    async with first:
        await first.emit_now("payment.processed", "p-1", amount=9.5)

    second = EventBus(store=SQLiteStore(path), name="second")

    @second.on("payment.processed", name="settle")
    async def settle(payment_id: str, amount: float) -> None:
        recorder.add((payment_id, amount))

    async with second:
        result = await second.dead_letters.replay(all=True)
    assert len(result.succeeded) == 1
    assert recorder.items == [("p-1", 9.5)]


async def test_a_sync_call_cut_off_then_failing_is_among_emit_now_errors(records: Records) -> None:
    import threading

    bus = EventBus(handler_timeout=None)
    sync_started, async_started, thread_done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    release = threading.Event()
    loop = asyncio.get_running_loop()

    @bus.on("x", name="sync_part")
    def sync_part(event: Event) -> None:
        loop.call_soon_threadsafe(sync_started.set)
        release.wait(5)
        raise RuntimeError("failed after the cut-off")

    @bus.on("x", name="async_part")
    async def async_part(event: Event) -> None:
        async_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await thread_done.wait()  # the job ends only once the sync call has finished
            raise

    async with bus:
        emitting = asyncio.create_task(bus.emit_now("x"))
        await sync_started.wait()
        await async_started.wait()
        with pytest.raises(DrainTimeoutError):
            await bus.drain(0.01)
        release.set()
        await records.wait_for("after it was reported as unfinished")
        thread_done.set()
        errors = await emitting
    # both were cut off, as the drain reported: neither counts as done for emit_now's caller
    assert sorted((type(e).__name__, e.handler) for e in errors) == [
        ("HandlerCancelledError", "async_part"),
        ("HandlerCancelledError", "sync_part"),
    ]
