"""Runs handler calls: error isolation, timeouts, one thread hop per job, tracking for drain.

A *job* is one unit of handler work: a request's events after its response was sent (run in the
request's own task, so no task is created per request) or a batch of events emitted outside requests
(run in one task per event-loop tick). A job runs its events in emit order; events its handlers emit
are appended to the job's buffer and run by the same job afterwards.

Per job: every ``async def`` call runs on the loop in order; every plain ``def`` call of the job goes
to a worker thread in one hop, started first so it overlaps the async calls; batch handlers get one
call with all their events. One failing call is logged, reported to ``on_failure`` and skipped; the
others still run.

Timeouts are enforced by one watchdog timer per bus (not a timer per call, which would cost more than
the call): each job records which call it is in and since when, and the watchdog cancels calls that
overran. Its precision is a quarter of the smallest timeout, at most 0.5 s.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import (
    HandlerCancelledError,
    HandlerError,
    HandlerTimeoutError,
    PendingDelivery,
)
from .envelope import EMPTY_HEADERS, Event
from .registry import HandlerSpec, Registry

if TYPE_CHECKING:
    from .dispatcher import Record, Scope
    from .policies import Limits

__all__ = ["FailureHook", "Job", "Runner", "make_event"]

logger = logging.getLogger("tidings")

FailureHook = Callable[[HandlerError], object]
"""Called on the event loop with every failed handler call; its return value is ignored."""

Call = tuple[HandlerSpec, Any]  # (handler, Event) or (batch handler, list[Event])

_MAX_TICK: Final = 0.5
_MIN_TICK: Final = 0.005


def _events_of(spec: HandlerSpec, arg: Any) -> list[Event]:
    return list(arg) if spec.batch else [arg]


class Job:
    """The state of one job, read by the watchdog and by drain's report of unfinished work."""

    __slots__ = (
        "arg",
        "async_calls",
        "async_index",
        "scope",
        "spec",
        "started",
        "sync_arg",
        "sync_calls",
        "sync_index",
        "sync_reported",
        "sync_spec",
        "sync_started",
        "sync_stop",
        "task",
        "timed_out",
    )

    def __init__(self, scope: Scope, task: asyncio.Task[Any] | None) -> None:
        self.scope = scope
        self.task = task
        # the async call in progress (set on the loop)
        self.spec: HandlerSpec | None = None
        self.arg: Any = None
        self.started = 0.0
        self.timed_out = False
        self.async_calls: list[Call] = []
        self.async_index = 0
        # the sync call in progress (set from the worker thread)
        self.sync_spec: HandlerSpec | None = None
        self.sync_arg: Any = None
        self.sync_started = 0.0
        self.sync_reported = False
        self.sync_calls: list[Call] = []
        self.sync_index = 0
        self.sync_stop = False

    def unfinished(self, resolve: Callable[[str], tuple[HandlerSpec, ...]]) -> list[PendingDelivery]:
        """Every (event, handler) call this job has not finished, in the order it was due."""
        pending: list[PendingDelivery] = []
        for calls, start in (
            (self.async_calls, self.async_index),
            (self.sync_calls, self.sync_index),
        ):
            for spec, arg in calls[start:]:
                pending.extend(PendingDelivery(event, spec.name) for event in _events_of(spec, arg))
        for record in self.scope.buffer or ():
            event = make_event(record, self.scope.headers)
            pending.extend(PendingDelivery(event, spec.name) for spec in resolve(event.name))
        return pending


def make_event(record: Record, scope_headers: Mapping[str, str] | None) -> Event:
    name, payload, timestamp_ns, headers = record
    return Event(
        name,
        payload,
        headers=headers or scope_headers or EMPTY_HEADERS,
        timestamp_ns=timestamp_ns,
    )


class Runner:
    """Executes jobs for one bus. Owned by :class:`~tidings.EventBus`; not public."""

    def __init__(self, registry: Registry, limits: Limits, on_failure: FailureHook | None) -> None:
        self.registry = registry
        self.limits = limits
        self.on_failure = on_failure
        self.jobs: set[Job] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._watch_handle: asyncio.TimerHandle | None = None
        self._tick = _MAX_TICK
        # calls cut short by drain; collected so drain can report them in one error
        self.lost: list[PendingDelivery] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._running = 0
        self._slot_waiters.clear()
        self._watch_handle = None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.limits.max_threads, thread_name_prefix="tidings-handler"
            )

    def shutdown(self) -> None:
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = None
        if self._executor is not None:
            # Threads cannot be interrupted: a hung sync handler keeps its thread; we do not wait.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def timeouts_changed(self, timeouts: Iterable[float | None]) -> None:
        smallest = min((t for t in timeouts if t is not None), default=None)
        self._tick = _MAX_TICK if smallest is None else max(_MIN_TICK, min(_MAX_TICK, smallest / 4))

    # -- running jobs ------------------------------------------------------------------------------
    def add_job(self, job: Job) -> None:
        self.jobs.add(job)
        if self._watch_handle is None and self.loop is not None:
            self._watch_handle = self.loop.call_later(self._tick, self._watch)

    async def run_job(self, job: Job) -> None:
        """Run ``job`` to completion in the current task (the job must already be added)."""
        try:
            if self._running < self.limits.max_concurrency:
                self._running += 1
            else:
                await self._wait_for_slot()
            try:
                scope = job.scope
                while scope.buffer:
                    records, scope.buffer = scope.buffer, []
                    await self._deliver(records, job)
            except asyncio.CancelledError:
                self._cancelled(job)
                raise
            finally:
                job.scope.buffer = None  # later emits from this context go straight to the bus
                self._release_slot()
        finally:
            self.jobs.discard(job)
            if self._idle_waiters:
                self._wake_idle_waiters()

    async def _wait_for_slot(self) -> None:
        assert self.loop is not None
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # the slot was handed to us as we were cancelled: pass it on
            else:
                self._slot_waiters.remove(waiter)
            raise

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter; the count stays
                return
        self._running -= 1

    async def _deliver(self, records: list[Record], job: Job) -> None:
        resolve = self.registry.resolve
        scope_headers = job.scope.headers
        async_calls: list[Call] = []
        sync_calls: list[Call] = []
        batches: dict[HandlerSpec, list[Event]] | None = None
        for record in records:
            handlers = resolve(record[0])
            if not handlers:
                continue
            event = make_event(record, scope_headers)
            for spec in handlers:
                if spec.batch:
                    if batches is None:
                        batches = {}
                    batches.setdefault(spec, []).append(event)
                elif spec.is_async:
                    async_calls.append((spec, event))
                else:
                    sync_calls.append((spec, event))
        if batches:
            for spec, events in batches.items():
                (async_calls if spec.is_async else sync_calls).append((spec, events))

        job.async_calls = async_calls
        job.async_index = 0
        sync_future: asyncio.Future[None] | None = None
        if sync_calls:
            job.sync_calls = sync_calls
            job.sync_index = 0
            sync_future = self._start_sync(job)
        if async_calls:
            await self._run_async_calls(job)
        if sync_future is not None:
            try:
                await sync_future
            except asyncio.CancelledError:
                job.sync_stop = True  # the thread stops before its next call
                raise
            job.sync_calls = []

    async def _run_async_calls(self, job: Job) -> None:
        task = job.task
        assert task is not None
        calls = job.async_calls
        for index in range(len(calls)):
            spec, arg = calls[index]
            job.async_index = index
            job.spec = spec
            job.arg = arg
            job.started = monotonic()
            try:
                await spec.call(arg)
            except asyncio.CancelledError as exc:
                if not job.timed_out:
                    if task.cancelling():
                        raise  # cancelled from outside (drain bound, server): not ours to swallow
                    self.report(
                        HandlerCancelledError(
                            f"handler {spec.name} was cancelled",
                            events=_events_of(spec, arg),
                            handler=spec.name,
                        ),
                        exc,
                    )
            except Exception as exc:
                self.report(
                    HandlerError(
                        f"handler {spec.name} raised {type(exc).__name__}: {exc}",
                        events=_events_of(spec, arg),
                        handler=spec.name,
                    ),
                    exc,
                )
            if job.timed_out:
                job.timed_out = False
                task.uncancel()
                self.report(
                    HandlerTimeoutError(
                        f"handler {spec.name} timed out after {spec.timeout}s and was cancelled",
                        events=_events_of(spec, arg),
                        handler=spec.name,
                    ),
                    None,
                )
                if task.cancelling():
                    raise asyncio.CancelledError
        job.spec = None
        job.async_index = len(calls)
        job.async_calls = []

    def _start_sync(self, job: Job) -> asyncio.Future[None]:
        assert self.loop is not None
        assert self._executor is not None
        # The thread sees the job's context, so sync handlers can emit and their events chain.
        context = contextvars.copy_context()
        return self.loop.run_in_executor(self._executor, context.run, self._run_sync_calls, job)

    def _run_sync_calls(self, job: Job) -> None:
        """Runs in a worker thread: every sync call of the job, in order."""
        loop = self.loop
        assert loop is not None
        calls = job.sync_calls
        for index in range(len(calls)):
            if job.sync_stop:
                return
            spec, arg = calls[index]
            job.sync_index = index
            job.sync_started = monotonic()
            job.sync_reported = False
            job.sync_arg = arg
            job.sync_spec = spec  # set last: the watchdog reads spec first
            try:
                spec.call(arg)
            except Exception as exc:
                error = HandlerError(
                    f"handler {spec.name} raised {type(exc).__name__}: {exc}",
                    events=_events_of(spec, arg),
                    handler=spec.name,
                )
                loop.call_soon_threadsafe(self.report, error, exc)
            job.sync_spec = None
        job.sync_index = len(calls)

    # -- timeouts ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        self._watch_handle = None
        now = monotonic()
        for job in tuple(self.jobs):
            spec = job.spec
            if (
                spec is not None
                and spec.timeout is not None
                and not job.timed_out
                and now - job.started > spec.timeout
                and job.task is not None
            ):
                job.timed_out = True
                job.task.cancel()
            sync_spec = job.sync_spec
            if (
                sync_spec is not None
                and sync_spec.timeout is not None
                and not job.sync_reported
                and now - job.sync_started > sync_spec.timeout
            ):
                job.sync_reported = True
                self.report(
                    HandlerTimeoutError(
                        f"handler {sync_spec.name} has run past its timeout of {sync_spec.timeout}s; "
                        "a plain def handler cannot be interrupted, so it keeps its worker thread "
                        "until it returns",
                        events=_events_of(sync_spec, job.sync_arg),
                        handler=sync_spec.name,
                    ),
                    None,
                )
        if self.jobs and self.loop is not None and not self.loop.is_closed():
            self._watch_handle = self.loop.call_later(self._tick, self._watch)

    # -- reporting ---------------------------------------------------------------------------------
    def report(self, error: HandlerError, cause: BaseException | None) -> None:
        """Log a failed call with its traceback and pass it to the failure hook."""
        if cause is not None:
            error.__cause__ = cause
        event = error.event
        logger.error(
            "%s (event %r, id %s)",
            error,
            event.name,
            event.id,
            exc_info=cause if cause is not None else False,
            extra={
                "tidings_event": event.name,
                "tidings_event_id": event.id,
                "tidings_handler": error.handler,
            },
        )
        hook = self.on_failure
        if hook is not None:
            try:
                hook(error)
            except Exception:
                logger.exception("the on_failure hook raised while reporting %s", error)

    def _cancelled(self, job: Job) -> None:
        pending = job.unfinished(self.registry.resolve)
        if not pending:
            return
        if self.lost is not None:
            self.lost.extend(pending)
            return
        logger.error(
            "a handler job was cancelled with %d call(s) unfinished: %s",
            len(pending),
            ", ".join(f"{p.handler} <- {p.event.name} ({p.event.id})" for p in pending),
        )
        for item in pending:
            self.report(
                HandlerCancelledError(
                    f"handler {item.handler} did not run: its job was cancelled",
                    events=[item.event],
                    handler=item.handler,
                ),
                None,
            )

    # -- drain -------------------------------------------------------------------------------------
    def idle(self) -> bool:
        """Whether no job runs other than the caller's own."""
        current = asyncio.current_task()
        return all(job.task is current for job in self.jobs)

    async def wait_idle(self, until: float) -> bool:
        """Wait until no job runs (other than the caller's own) or ``until`` (monotonic) passes."""
        assert self.loop is not None
        while not self.idle():
            remaining = until - monotonic()
            if remaining <= 0:
                return False
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._idle_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return False
            finally:
                if waiter in self._idle_waiters:
                    self._idle_waiters.remove(waiter)
        return True

    def _wake_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
