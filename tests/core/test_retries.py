"""Retry policies and dead letters, on the default in-memory store."""

from __future__ import annotations

import asyncio
import logging

import anyio
import pytest

from tidings import (
    BusStateError,
    ConfigurationError,
    DrainTimeoutError,
    Event,
    EventBus,
    HandlerCancelledError,
    HandlerError,
    HandlerTimeoutError,
    Limits,
    RetryPolicy,
)
from tidings.store import MemoryStore

from ..conftest import Recorder, Records

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_attempts=4, backoff=0.001, jitter=0)


class Flaky:
    """Fails its first ``failures`` calls, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"failure {self.calls}")


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_handler_failing_n_times_then_succeeding_takes_n_plus_one_attempts(
    kind: str, recorder: Recorder, failures: list[HandlerError]
) -> None:
    bus = EventBus(on_failure=failures.append, retry=FAST)
    flaky = Flaky(failures=2)
    if kind == "async":

        @bus.on("charge")
        async def charge(event: Event) -> None:
            flaky()
            recorder.add(event.payload)

    else:

        @bus.on("charge")
        def charge_sync(event: Event) -> None:
            flaky()
            recorder.add(event.payload)

    async with bus:
        bus.emit("charge", 7)
        await recorder.wait_count(1)
        await bus.drain()
        assert await bus.dead_letters.list() == []
    assert flaky.calls == 3
    assert [f.attempt for f in failures] == [1, 2]
    assert all(f.retry_in is not None and f.dead_letters == () for f in failures)
    assert [str(f.__cause__) for f in failures] == ["failure 1", "failure 2"]


async def test_a_handler_that_always_fails_ends_as_exactly_one_dead_letter_and_replays(
    recorder: Recorder, failures: list[HandlerError]
) -> None:
    bus = EventBus(on_failure=failures.append, retry=FAST)
    broken = True

    @bus.on("invoice.due", name="billing.send")
    async def send(event: Event) -> None:
        if broken:
            raise ConnectionError("mail server down")
        recorder.add(event.payload)

    async with bus:
        bus.emit("invoice.due", {"invoice": 7})
        await bus.drain()
        letters = await bus.dead_letters.list()
        assert len(letters) == 1
        letter = letters[0]
        assert letter.handler == "billing.send"
        assert letter.event.name == "invoice.due"
        assert letter.event.payload == {"invoice": 7}
        assert letter.attempts == 4
        assert letter.error == "ConnectionError: mail server down"
        assert "raise ConnectionError" in letter.traceback
        assert letter.id == f"{letter.event.id}/billing.send"
        assert await bus.dead_letters.get(letter.id) == letter
        assert [f.attempt for f in failures] == [1, 2, 3, 4]
        assert failures[-1].retry_in is None
        assert failures[-1].dead_letters == (letter,)

        broken = False
        result = await bus.dead_letters.replay([letter.id])
        assert result.succeeded == (letter,)
        assert result.failed == result.skipped == ()
        assert recorder.items == [{"invoice": 7}]
        assert await bus.dead_letters.list() == []
        assert (await bus.dead_letters.replay([letter.id])).succeeded == ()  # gone: nothing runs twice
    assert recorder.items == [{"invoice": 7}]


async def test_a_replay_that_fails_again_makes_a_dead_letter_again(failures: list[HandlerError]) -> None:
    bus = EventBus(on_failure=failures.append)

    @bus.on("x", name="always")
    def always(event: Event) -> None:
        raise ValueError("still broken")

    async with bus:
        bus.emit("x")
        await bus.drain()
        [letter] = await bus.dead_letters.list()
        result = await bus.dead_letters.replay(all=True)
        assert result.failed == (letter,)
        [again] = await bus.dead_letters.list()
        assert again.id == letter.id
        assert again.attempts == 1


@pytest.mark.parametrize(
    ("policy", "attempts"),
    [
        (RetryPolicy(max_attempts=5, backoff=0.001, fail_on=(ValueError,)), 1),
        (RetryPolicy(max_attempts=5, backoff=0.001, retry_on=(ConnectionError,)), 1),
        (RetryPolicy(max_attempts=5, backoff=0.001, retry_on=(ValueError,)), 5),
        (RetryPolicy(max_attempts=5, backoff=10, deadline=1), 1),  # the retry would start too late
    ],
    ids=["fail_on", "not-in-retry_on", "retry_on", "deadline"],
)
async def test_which_failures_retry(policy: RetryPolicy, attempts: int, failures: list[HandlerError]) -> None:
    bus = EventBus(on_failure=failures.append)

    @bus.on("x", retry=policy)
    async def handler(event: Event) -> None:
        raise ValueError("bad")

    async with bus:
        bus.emit("x")
        await bus.drain()
        [letter] = await bus.dead_letters.list()
    assert letter.attempts == attempts
    assert len(failures) == attempts


async def test_a_timed_out_attempt_is_retried_with_the_attempt_timeout(
    recorder: Recorder, failures: list[HandlerError]
) -> None:
    bus = EventBus(on_failure=failures.append, handler_timeout=None)
    attempts = 0

    @bus.on("slow", retry=RetryPolicy(max_attempts=2, backoff=0.001, attempt_timeout=0.05))
    async def slow(event: Event) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.Event().wait()  # hangs: the attempt times out
        recorder.add("done")

    async with bus:
        bus.emit("slow")
        await recorder.wait_count(1)
    assert [type(f) for f in failures] == [HandlerTimeoutError]
    assert failures[0].retry_in is not None


async def test_a_handler_cancelling_itself_is_a_failure_that_retries(
    recorder: Recorder, failures: list[HandlerError]
) -> None:
    bus = EventBus(on_failure=failures.append, retry=FAST)
    calls = 0

    @bus.on("x")
    async def handler(event: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError
        recorder.add(calls)

    async with bus:
        bus.emit("x")
        await recorder.wait_count(1)
    assert [type(f) for f in failures] == [HandlerCancelledError]


async def test_a_batch_handler_is_retried_with_its_batch_and_dead_letters_each_event(
    failures: list[HandlerError],
) -> None:
    bus = EventBus(on_failure=failures.append, retry=RetryPolicy(max_attempts=2, backoff=0.001))
    seen: list[list[object]] = []

    class Forwarder:
        async def handle_many(self, events: list[Event]) -> None:
            seen.append([e.payload for e in events])
            raise ConnectionError("broker down")

    bus.subscribe(Forwarder(), "a", name="forward")
    async with bus:
        bus.emit("a", 1)
        bus.emit("a", 2)
        await bus.drain()
        letters = await bus.dead_letters.list()
    assert seen == [[1, 2], [1, 2]]
    assert [(letter.event.payload, letter.handler, letter.attempts) for letter in letters] == [
        (1, "forward", 2),
        (2, "forward", 2),
    ]


async def test_retries_of_chained_events_start_at_attempt_one(failures: list[HandlerError]) -> None:
    bus = EventBus(on_failure=failures.append, retry=RetryPolicy(max_attempts=2, backoff=0.001))
    first = True

    @bus.on("parent")
    async def parent(event: Event) -> None:
        nonlocal first
        if first:
            first = False
            raise ValueError("once")
        bus.emit("child")

    @bus.on("child")
    async def child(event: Event) -> None:
        raise ValueError("child fails")

    async with bus:
        bus.emit("parent")
        await bus.drain()
        letters = await bus.dead_letters.list()
    assert [(letter.event.name, letter.attempts) for letter in letters] == [("child", 2)]
    assert [(f.event.name, f.attempt) for f in failures] == [("parent", 1), ("child", 1), ("child", 2)]


async def test_drain_waits_for_a_retry_due_within_its_bound(recorder: Recorder) -> None:
    bus = EventBus(retry=RetryPolicy(max_attempts=2, backoff=0.05, jitter=0))
    calls = 0

    @bus.on("x")
    async def handler(event: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("once")
        recorder.add("ok")

    async with bus:
        bus.emit("x")
        await bus.drain(5)
        assert recorder.items == ["ok"]


async def test_a_retry_due_after_shutdown_is_reported_not_silently_lost(failures: list[HandlerError]) -> None:
    bus = EventBus(
        on_failure=failures.append, retry=RetryPolicy(max_attempts=2, backoff=3600), drain_timeout=1
    )

    @bus.on("x", name="later")
    async def handler(event: Event) -> None:
        raise ValueError("once")

    async with bus:
        bus.emit("x")
        await bus.drain()  # the retry is an hour away: drain does not wait for it, nor cancel it
        assert len(bus._runner.retries) == 1
    assert [type(f) for f in failures] == [HandlerError, HandlerCancelledError]
    assert "retry was due after the bus closed; it is lost" in str(failures[1])
    assert bus._runner.retries == set()


async def test_replay_and_purge_need_a_filter_and_a_running_bus() -> None:
    bus = EventBus()

    @bus.on("a.one", "a.two", "b", name="h")
    async def handler(event: Event) -> None:
        raise ValueError(event.name)

    with pytest.raises(ConfigurationError, match="all=True"):
        await bus.dead_letters.replay()
    with pytest.raises(ConfigurationError, match="all=True"):
        await bus.dead_letters.purge()
    with pytest.raises(ConfigurationError, match="sequence"):
        await bus.dead_letters.purge("one-id")  # a str is a Sequence[str]: refused at run time
    async with bus:
        for name in ("a.one", "a.two", "b"):
            bus.emit(name)
        await bus.drain()
        assert [d.event.name for d in await bus.dead_letters.list(event="a.*")] == ["a.one", "a.two"]
        assert await bus.dead_letters.list(handler="other") == []
        assert await bus.dead_letters.purge(event="a.*") == 2
        assert [d.event.name for d in await bus.dead_letters.list()] == ["b"]
        assert await bus.dead_letters.get("nope/h") is None
    with pytest.raises(BusStateError, match="not running"):
        await bus.dead_letters.replay(all=True)
    async with bus:
        assert await bus.dead_letters.purge(all=True) == 1


async def test_a_dead_letter_whose_handler_is_gone_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    first = EventBus(store=store)

    @first.on("x", name="old.name")
    async def handler(event: Event) -> None:
        raise ValueError("x")

    async with first:
        first.emit("x")
        await first.drain()
    second = EventBus(store=store)
    async with second:
        result = await second.dead_letters.replay(all=True)
        assert [letter.handler for letter in result.skipped] == ["old.name"]
        assert len(await second.dead_letters.list()) == 1
    assert "no handler is named 'old.name'" in caplog.text


async def test_the_memory_store_keeps_a_bounded_number_of_dead_letters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus(store=MemoryStore(max_dead_letters=2))

    @bus.on("x")
    async def handler(event: Event) -> None:
        raise ValueError(event.payload)

    async with bus:
        for i in range(3):
            bus.emit("x", i)
        await bus.drain()
        assert [d.event.payload for d in await bus.dead_letters.list()] == [1, 2]
    assert "was dropped: the in-memory store keeps at most 2" in caplog.text


async def test_the_failure_log_says_what_happens_next(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="tidings")
    bus = EventBus(retry=RetryPolicy(max_attempts=2, backoff=0.001, jitter=0))

    @bus.on("x")
    async def handler(event: Event) -> None:
        raise ValueError("nope")

    async with bus:
        bus.emit("x")
        await bus.drain()
    assert "attempt 1, retrying in 0.001s" in caplog.text
    assert "attempt 2, now a dead letter" in caplog.text


def test_handler_names_must_be_unique() -> None:
    bus = EventBus()

    def make() -> object:
        def handler(event: Event) -> None: ...

        return handler

    bus.subscribe(make(), "x")
    with pytest.raises(ConfigurationError, match="give one of them name="):
        bus.subscribe(make(), "y")
    bus.subscribe(make(), "y", name="second")
    same = make()
    bus.subscribe(same, "z", name="third")
    bus.subscribe(same, "w", name="third")  # the same handler again is fine
    for bad in ("a/b", "", "a\x00b", "a\udc80b", 3):
        with pytest.raises(ConfigurationError, match="without '/' or NUL that UTF-8 can encode"):
            bus.subscribe(make(), "v", name=bad)  # type: ignore[arg-type]  # 3 is wrong on purpose


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": True},
        {"backoff": -1},
        {"max_backoff": float("inf")},
        {"multiplier": 0.5},
        {"jitter": 2},
        {"deadline": 0},
        {"attempt_timeout": -1},
        {"retry_on": ValueError},
        {"fail_on": ("x",)},
    ],
)
def test_bad_retry_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_bad_bus_retry_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="RetryPolicy"):
        EventBus(retry=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="resubmit_after"):
        EventBus(resubmit_after=0)
    with pytest.raises(ConfigurationError, match="RetryPolicy"):
        EventBus().subscribe(lambda e: None, "x", retry="never")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_dead_letters"):
        MemoryStore(max_dead_letters=0)


def test_backoff_grows_is_capped_and_jittered() -> None:
    policy = RetryPolicy(backoff=1, multiplier=2, max_backoff=5, jitter=0.5)
    assert [policy.delay(n, rand=1.0) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
    assert policy.delay(2, rand=0.0) == 1.0
    assert 1.0 <= policy.delay(2) <= 2.0
    assert RetryPolicy(multiplier=1e300, max_backoff=7).delay(5, rand=1.0) == 7  # no overflow


async def test_a_timed_out_handler_whose_clean_up_raises_is_one_failure_retried_once(
    failures: list[HandlerError],
) -> None:
    bus = EventBus(on_failure=failures.append)
    runs: list[int] = []

    @bus.on("x", timeout=0.05, retry=RetryPolicy(max_attempts=2, backoff=0.001, jitter=0))
    async def hangs_once(event: Event) -> None:
        runs.append(len(runs) + 1)
        if len(runs) == 1:
            try:
                await asyncio.Event().wait()
            finally:
                raise RuntimeError("clean-up failed while cancelled")

    async with bus:
        errors = await bus.emit_now("x")
        await bus.drain()
    assert [type(e) for e in errors] == [HandlerTimeoutError]
    assert [(type(f), f.attempt) for f in failures] == [(HandlerTimeoutError, 1)]
    assert isinstance(failures[0].__cause__, RuntimeError)  # what ended it, with its traceback
    assert runs == [1, 2]  # one retry, as the policy says


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_call_the_drain_reported_unfinished_is_not_retried_when_it_fails_after(
    failures: list[HandlerError], records: Records, kind: str
) -> None:
    import threading

    bus = EventBus(handler_timeout=None, on_failure=failures.append)
    runs: list[int] = []
    started, release = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()
    retry = RetryPolicy(max_attempts=3, backoff=0.001, jitter=0)

    if kind == "async":

        @bus.on("x", retry=retry)
        async def handler(event: Event) -> None:
            runs.append(1)
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                raise RuntimeError("clean-up failed while cut off")

    else:

        @bus.on("x", retry=retry)
        def sync_handler(event: Event) -> None:
            runs.append(1)
            loop.call_soon_threadsafe(started.set)
            release.wait(5)
            raise RuntimeError("failed after the drain bound")

    async with bus:
        bus.emit("x")
        await started.wait()
        with pytest.raises(DrainTimeoutError) as caught:
            await bus.drain(0.01)
        release.set()
        # what it raised is logged, with its traceback, and not reported or retried again
        logged = await records.wait_for("after it was reported as unfinished")
        assert logged.exc_info is not None
        assert not bus._runner.retries
    assert [p.event.name for p in caught.value.pending] == ["x"]
    assert [type(f) for f in failures] == [HandlerCancelledError]  # reported once, as unfinished
    assert runs == [1]


async def test_a_handler_may_replay_dead_letters_with_every_slot_taken(recorder: Recorder) -> None:
    bus = EventBus(limits=Limits(max_concurrency=1), handler_timeout=None)
    broken = True

    @bus.on("work")
    async def work(event: Event) -> None:
        if broken:
            raise ValueError("down")
        recorder.add("worked")

    @bus.on("admin.replay")
    async def replay_all(event: Event) -> None:  # holds the only slot
        result = await asyncio.wait_for(bus.dead_letters.replay(all=True), 5)
        recorder.add(len(result.succeeded))

    async with bus:
        bus.emit("work")
        await bus.drain()
        broken = False
        bus.emit("admin.replay")
        assert await recorder.wait_count(2) == ["worked", 1]


async def test_a_replayed_call_that_does_not_succeed_in_time_counts_as_failed(
    failures: list[HandlerError],
) -> None:
    import threading

    bus = EventBus(on_failure=failures.append, handler_timeout=None)
    release = threading.Event()
    broken = True

    @bus.on("sync.work", timeout=0.05)
    def sync_work(event: Event) -> None:
        if broken:
            raise ValueError("down")
        release.wait(5)  # runs past its timeout in the replay

    @bus.on("async.work")
    async def async_work(event: Event) -> None:
        if broken:
            raise ValueError("down")
        await asyncio.Event().wait()  # until the drain bound cuts it off

    async with bus:
        bus.emit("sync.work")
        bus.emit("async.work")
        await bus.drain()
        broken = False
        timed_out = await bus.dead_letters.replay(event="sync.work")
        release.set()
        assert (len(timed_out.succeeded), len(timed_out.failed)) == (0, 1)
        replay = asyncio.create_task(bus.dead_letters.replay(event="async.work"))
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(DrainTimeoutError):
            await bus.drain(0.01)
        cut_off = await replay
        assert (len(cut_off.succeeded), len(cut_off.failed)) == (0, 1)


async def test_a_sync_call_of_a_cancelled_job_failing_after_is_not_reported_or_retried_again(
    failures: list[HandlerError], records: Records
) -> None:
    import threading

    bus = EventBus(handler_timeout=None, on_failure=failures.append)
    started, release = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()

    @bus.on("x", retry=RetryPolicy(max_attempts=3, backoff=0.001, jitter=0))
    def sync_handler(event: Event) -> None:
        loop.call_soon_threadsafe(started.set)
        release.wait(5)
        raise RuntimeError("failed after its job was cancelled")

    async with bus:
        bus.emit("x")
        await started.wait()
        (job,) = bus._runner.jobs
        assert job.task is not None
        job.task.cancel()  # from outside: a server cancelling a request's task, say
        await asyncio.wait({job.task})
        assert [type(f) for f in failures] == [HandlerCancelledError]  # "its job was cancelled"
        release.set()
        await records.wait_for("after it was reported as unfinished")
        assert not bus._runner.retries
    assert len(failures) == 1
