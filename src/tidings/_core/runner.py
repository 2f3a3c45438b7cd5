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
the call): each job records which call it is in and since which watchdog tick, and the watchdog cancels
calls that overran. A tick is a quarter of the smallest timeout, at most 0.5 s; a call is cancelled
between its timeout and its timeout plus two ticks, never before.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from asyncio import current_task
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from time import monotonic
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import (
    HandlerCancelledError,
    HandlerError,
    HandlerTimeoutError,
    PendingDelivery,
)
from .dispatcher import Scope
from .envelope import EMPTY_HEADERS, Event
from .registry import HandlerSpec, Registry
from .threads import DaemonThreadPool

if TYPE_CHECKING:
    from .bus import EventBus
    from .dispatcher import Record
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


class Job(Scope):
    """A scope whose events are being handled: one request's, or one batch emitted outside requests.

    The request's scope *is* its job, so a request with events allocates nothing more. The job state
    below is read by the watchdog and by drain's report of unfinished work; its defaults live on the
    class (this subclass has a ``__dict__``), so a job that never needs a field never sets it.
    """

    task: asyncio.Task[Any] | None = None
    # the async call in progress: async_calls[async_index], since watchdog time `started` (the loop)
    async_calls: list[Call] = []  # noqa: RUF012 - replaced, never mutated
    async_index = 0
    started = 0.0
    timed_out = False
    # the sync calls, run in one thread hop; the one in progress is set from the worker thread
    sync_calls: list[Call] = []  # noqa: RUF012 - replaced, never mutated
    sync_index = 0
    sync_spec: HandlerSpec | None = None
    sync_arg: Any = None
    sync_started = 0.0
    sync_reported = False
    sync_stop = False

    def __init__(
        self, bus: EventBus, buffer: list[Record] | None, headers: Mapping[str, str] | None = None
    ) -> None:
        self.bus = bus
        self.buffer = buffer
        self.headers = headers

    def unfinished(self, resolve: Callable[[str], tuple[HandlerSpec, ...]]) -> list[PendingDelivery]:
        """Every (event, handler) call this job has not finished, in the order it was due."""
        pending: list[PendingDelivery] = []
        for calls, start in ((self.async_calls, self.async_index), (self.sync_calls, self.sync_index)):
            for spec, arg in calls[start:]:
                pending.extend(PendingDelivery(event, spec.name) for event in _events_of(spec, arg))
        for record in self.buffer or ():
            event = make_event(record, self.headers)
            pending.extend(PendingDelivery(event, spec.name) for spec in resolve(event.name))
        return pending


def make_event(record: Record, scope_headers: Mapping[str, str] | None) -> Event:
    name, payload, timestamp_ns, headers = record
    return Event(name, payload, headers or scope_headers or EMPTY_HEADERS, timestamp_ns)


class Runner:
    """Executes jobs for one bus. Owned by :class:`~tidings.EventBus`; not public."""

    def __init__(self, registry: Registry, limits: Limits, on_failure: FailureHook | None) -> None:
        self.registry = registry
        self.limits = limits
        self.on_failure = on_failure
        self.jobs: set[Job] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._executor: DaemonThreadPool | None = None
        self._running = 0
        self._max_concurrency = limits.max_concurrency
        # monotonic time as of the last watchdog tick: what a call's start is measured in
        self.now = monotonic()
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
            self._executor = DaemonThreadPool(self.limits.max_threads, "tidings-handler")

    def shutdown(self) -> None:
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = None
        if self._executor is not None:
            # Threads cannot be interrupted: a hung sync handler keeps its (daemon) thread; the drain
            # bound has reported it, so we do not wait for it.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def timeouts_changed(self, timeouts: Iterable[float | None]) -> None:
        smallest = min((t for t in timeouts if t is not None), default=None)
        self._tick = _MAX_TICK if smallest is None else max(_MIN_TICK, min(_MAX_TICK, smallest / 4))

    # -- running jobs ------------------------------------------------------------------------------
    def start_job(self, job: Job, task: asyncio.Task[Any] | None) -> bool:
        """Sort ``job``'s buffered events into calls and track it; ``False`` if nobody handles them.

        A job with nothing to call is not tracked and must not be run: events nobody listens to cost
        a dictionary lookup each, not a job.
        """
        records, job.buffer = job.buffer or [], []
        if not self._sort(records, job):
            job.buffer = None
            return False
        job.task = task
        self.jobs.add(job)
        if self._watch_handle is None and self.loop is not None:
            self.now = monotonic()
            self._watch_handle = self.loop.call_later(self._tick, self._watch)
        return True

    def request_job(self, job: Job) -> bool:
        """:meth:`start_job` for a finished request, to be run in the request's own task."""
        return self.start_job(job, current_task(self.loop))

    async def run_job(self, job: Job) -> None:
        """Run a started job to completion in the current task.

        Deliberately one flat coroutine: each extra layer of ``await`` costs more per request than
        the work of delivering one event (bench/README.md).
        """
        has_slot = False
        try:
            if self._running < self._max_concurrency:
                self._running += 1
            else:
                await self._wait_for_slot()
            has_slot = True
            while True:
                sync_future = self._start_sync(job) if job.sync_calls else None
                for index, (spec, arg) in enumerate(job.async_calls):
                    job.async_index = index
                    job.started = self.now
                    try:
                        await spec.call(arg)
                    except asyncio.CancelledError as exc:
                        if not job.timed_out:
                            if job.task is not None and job.task.cancelling():
                                raise  # cancelled from outside (drain bound, server): not ours
                            self._handler_cancelled(spec, arg, exc)
                    except Exception as exc:
                        self._handler_failed(spec, arg, exc)
                    if job.timed_out:
                        self._handler_timed_out(job, spec, arg)
                job.async_calls = []
                if sync_future is not None:
                    try:
                        await sync_future
                    except asyncio.CancelledError:
                        job.sync_stop = True  # the thread stops before its next call
                        raise
                    job.sync_calls = []
                records = job.buffer  # events the handlers emitted: same job, right after
                if not records:
                    break
                job.buffer = []
                self._sort(records, job)
        except asyncio.CancelledError:
            self._cancelled(job)  # whether it ran or waited for a slot: say what did not run
            raise
        finally:
            job.buffer = None  # later emits from this context go straight to the bus
            if has_slot:
                if self._slot_waiters:
                    self._release_slot()
                else:
                    self._running -= 1
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
            elif waiter in self._slot_waiters:  # a release may have popped it already
                self._slot_waiters.remove(waiter)
            raise

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter; the count stays
                return
        self._running -= 1

    def _sort(self, records: list[Record], job: Job) -> bool:
        """Sort the calls for ``records`` into ``job``; ``False`` if there is nothing to call."""
        resolve = self.registry.resolve
        scope_headers = job.headers or EMPTY_HEADERS
        async_calls: list[Call] = []
        sync_calls: list[Call] = []
        batches: dict[HandlerSpec, list[Event]] | None = None
        for name, payload, timestamp_ns, headers in records:
            handlers = resolve(name)
            if not handlers:
                continue
            event = Event(name, payload, headers or scope_headers, timestamp_ns)
            for spec in handlers:
                if spec.batch:
                    if batches is None:
                        batches = {}
                    batches.setdefault(spec, []).append(event)
                else:
                    (async_calls if spec.is_async else sync_calls).append((spec, event))
        if batches:
            for spec, events in batches.items():
                (async_calls if spec.is_async else sync_calls).append((spec, events))
        job.async_calls = async_calls
        job.async_index = 0
        if sync_calls:
            job.sync_calls = sync_calls
            job.sync_index = 0
        return bool(async_calls or sync_calls)

    def _handler_failed(self, spec: HandlerSpec, arg: Any, exc: Exception) -> None:
        message = f"handler {spec.name} raised {type(exc).__name__}: {exc}"
        self.report(HandlerError(message, events=_events_of(spec, arg), handler=spec.name), exc)

    def _handler_cancelled(self, spec: HandlerSpec, arg: Any, exc: BaseException) -> None:
        message = f"handler {spec.name} was cancelled"
        error = HandlerCancelledError(message, events=_events_of(spec, arg), handler=spec.name)
        self.report(error, exc)

    def _handler_timed_out(self, job: Job, spec: HandlerSpec, arg: Any) -> None:
        """The watchdog cancelled this call: take the cancellation back and report the timeout."""
        task = job.task
        assert task is not None
        job.timed_out = False
        task.uncancel()
        message = f"handler {spec.name} timed out after {spec.timeout}s and was cancelled"
        self.report(HandlerTimeoutError(message, events=_events_of(spec, arg), handler=spec.name), None)
        if task.cancelling():  # someone else cancelled it too: that one stands
            raise asyncio.CancelledError

    def _start_sync(self, job: Job) -> asyncio.Future[None]:
        job.sync_index = 0
        job.sync_stop = False
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
        self.now = now = monotonic()
        # job.started is the previous tick's time, so allow one tick more: never cancel early
        slack = self._tick
        for job in tuple(self.jobs):
            calls, index = job.async_calls, job.async_index
            if index < len(calls) and not job.timed_out and job.task is not None:
                timeout = calls[index][0].timeout
                if timeout is not None and now - job.started > timeout + slack:
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
        self.report_unfinished(pending, "its job was cancelled")

    def report_unfinished(self, pending: Iterable[PendingDelivery], why: str) -> None:
        """Report each call that will not finish to the failure hook (and the log)."""
        for item in pending:
            message = f"handler {item.handler} did not finish: {why}"
            self.report(HandlerCancelledError(message, events=[item.event], handler=item.handler), None)

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
