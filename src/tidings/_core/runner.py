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
the call). A job publishes the call it is awaiting; the watchdog notes the tick at which it first sees
that call and cancels it once it has seen it for longer than its timeout. A tick is a quarter of the
smallest timeout, at most 0.5 s, so a call is cancelled between its timeout and its timeout plus two
ticks: never before, and never a call the job has not started yet (a job waiting for its task to
start, or for a concurrency slot, is awaiting no call). A sync call past its timeout cannot be
cancelled: the watchdog reports it and leaves it behind in its thread, and the job's other sync calls
go on in a new hop.

A failed call (raised, timed out, cancelled itself) is retried by its handler's
:class:`~tidings.RetryPolicy` in a job of its own, after a backoff timer; after its last attempt it
becomes a dead letter in the bus's store. With a durable store, a job records its (event, handler)
deliveries before it runs them and completes them after; the failure path updates them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import logging
import sys
import threading
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from threading import get_ident
from time import monotonic, time
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import (
    HandlerCancelledError,
    HandlerError,
    HandlerTimeoutError,
    PendingDelivery,
    StoreError,
)
from ..store.base import DeadLetter, Delivery, delivery_id
from .dispatcher import Scope, current_scope, set_scope
from .envelope import EMPTY_HEADERS, Event, Prebuilt, new_sequence
from .logs import described, fields
from .registry import HandlerSpec, Registry
from .threads import DaemonThreadPool

new_object = object.__new__

if sys.version_info >= (3, 12):
    from asyncio import current_task as task_of
else:
    # asyncio.current_task is a Python function on 3.11 (a frame per call, on every request); the
    # dict it reads is the C module's, and its get is what it does with a loop given
    _current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] = asyncio.tasks._current_tasks  # type: ignore[attr-defined]
    task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = _current_tasks.get

if TYPE_CHECKING:
    from ..integrations.opentelemetry import Tracing
    from ..store.base import Store
    from .bus import EventBus
    from .dispatcher import Record
    from .policies import Limits

__all__ = ["Call", "FailureHook", "Job", "Runner", "awaited", "call_for", "deliveries_of", "make_event"]

logger = logging.getLogger("tidings")

FailureHook = Callable[[HandlerError], object]
"""Called on the event loop with every failed handler call. What it raises is logged. An ``async
def`` hook's call runs as a task of the bus, which drain waits for; a plain one's return value is
ignored."""

Call = tuple[HandlerSpec, Any]  # (handler, Event) or (batch handler, tuple[Event, ...])
SyncCall = tuple[HandlerSpec, Any, float, int]  # a sync call in progress: its monotonic start, index

# What a handler may raise that is not its own failure: the process is stopping. (fastapi-events'
# errors derive from BaseException, so the rest of BaseException counts as a failure.)
_FATAL: Final = (KeyboardInterrupt, SystemExit, GeneratorExit)
_MAX_TICK: Final = 0.5
_MIN_TICK: Final = 0.005
# The states of a _ThreadedCall
_QUEUED: Final = 0
_RUNNING: Final = 1
_LEFT_BEHIND: Final = 2
_GIVEN_UP: Final = 3
_ENDED: Final = 4
# How long shutdown waits, past its drain bound, for the log to take the cut-off deliveries it did
# not hold yet: a store that is down must not hold up shutdown for good.
KEEP_BOUND: Final = 1.0


def _events_of(spec: HandlerSpec, arg: Any) -> list[Event]:
    return list(arg) if spec.batch else [arg]


def make_event(record: Record) -> Event:
    name, payload, timestamp_ns, headers = record
    if type(headers) is Prebuilt:
        return headers.event
    return Event(name, payload, headers or EMPTY_HEADERS, timestamp_ns)


def call_for(spec: HandlerSpec, event: Event) -> Call:
    """The call that delivers one event to ``spec`` (a batch of one for a batch handler)."""
    return (spec, (event,)) if spec.batch else (spec, event)


def deliveries_of(calls: Iterable[Call]) -> list[tuple[Event, str]]:
    """The (event, handler name) deliveries that ``calls`` make."""
    return [(event, spec.name) for spec, arg in calls for event in _events_of(spec, arg)]


def _store_failed(exc: Exception, doing: str, deliveries: Sequence[tuple[str, str]], outcome: str) -> None:
    """Log a write that the store raised on (instead of queuing it and logging its own failure)."""
    logger.error(
        "the event log could not %s %s (%s: %s); %s",
        doing,
        ", ".join(delivery_id(event_id, handler) for event_id, handler in deliveries),
        type(exc).__name__,
        exc,
        outcome,
        exc_info=exc,
        extra=fields(None, *deliveries[0]) if len(deliveries) == 1 else fields(None),
    )


def _raised(spec: HandlerSpec, arg: Any, exc: BaseException) -> HandlerError:
    """The error of a call that raised ``exc``."""
    return HandlerError(
        f"handler {spec.name} raised {described(exc)}", events=_events_of(spec, arg), handler=spec.name
    )


def _cancelled_error(spec: HandlerSpec, arg: Any) -> HandlerCancelledError:
    """The error of a call that was cancelled, not by its timeout nor by a drain."""
    return HandlerCancelledError(
        f"handler {spec.name} was cancelled", events=_events_of(spec, arg), handler=spec.name
    )


def _failed_after_the_loop(handler: str, cause: BaseException) -> None:
    logger.error(
        "handler %s raised %s after its event loop closed: it is not retried, nor passed to on_failure",
        handler,
        described(cause),
        exc_info=cause,
        extra=fields(None, None, handler),
    )


def _log_refused(refused: Mapping[str, str], deliveries: Sequence[tuple[Event, str]], outcome: str) -> None:
    """Log each event the log refused to write (by id, with why), and what becomes of it."""
    names = {event.id: event.name for event, _ in deliveries}
    for event_id, reason in refused.items():
        logger.error("%s; %s", reason, outcome, extra=fields(names.get(event_id), event_id))


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
    waiters.clear()


class _LeftBehind:
    """A sync call past its timeout that its job went on without, and what it emitted since.

    Its thread appends to ``records`` (:meth:`keep`) while it is ``open``; whoever closes it takes
    them. The lock keeps an event from landing in a list already taken.
    """

    __slots__ = ("call", "ended", "lock", "on_end", "open", "records", "rest", "rest_scope", "then")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.lock = threading.Lock()
        self.open = True
        self.records: list[Record] = []
        # what is left of the call once its thread returned (call_in_thread's `then`), in its context
        self.then: tuple[Callable[[], Awaitable[object]], contextvars.Context] | None = None
        # once its thread returned: the task running that rest, and the scope of what the call
        # emitted (its thread's events first), still the call's until the rest ends
        self.rest: asyncio.Task[None] | None = None
        self.rest_scope: Job | None = None
        # on the loop: how it ended (its failure, or None; and whether it was reported unfinished
        # instead), and who waits to hear it (the span of an async call left behind, when tracing)
        self.ended: tuple[BaseException | None, bool] | None = None
        self.on_end: Callable[[BaseException | None, bool], None] | None = None

    def keep(self, record: Record) -> bool:
        """Keep an event the call emitted; ``False`` once closed (it goes the usual way then)."""
        with self.lock:
            if self.open:
                self.records.append(record)
            return self.open

    def close(self, then: Callable[[list[Record]], object] | None = None) -> list[Record]:
        """What the call emitted; nothing is kept from now on.

        ``then`` gets them first, under the lock: a close elsewhere waits until it has returned.
        """
        with self.lock:
            self.open = False
            records, self.records = self.records, []
            if then is not None:
                then(records)
            return records

    def when_ended(self, callback: Callable[[BaseException | None, bool], None]) -> None:
        """On the loop: call ``callback`` with how the call ended, once it has (now, if it has)."""
        if self.ended is None:
            self.on_end = callback
        else:
            _tell_end(callback, *self.ended)

    def end(self, failure: BaseException | None, unfinished: bool) -> None:
        """On the loop: the call ended (or was reported unfinished); tell who waits."""
        if self.ended is None:
            self.ended = (failure, unfinished)
            callback, self.on_end = self.on_end, None
            if callback is not None:
                _tell_end(callback, failure, unfinished)


def _await_in_loop(awaitable: Awaitable[Any], loop: asyncio.AbstractEventLoop) -> None:
    """Run what a plain ``def`` handler returned on ``loop``, waiting for it in this worker thread.

    A plain ``def`` that returns an awaitable is, most often, a decorator's synchronous wrapper of
    an ``async def`` handler (one made without ``functools.wraps`` support for coroutines). Left
    alone, the coroutine would never run and the event would be lost with only a "never awaited"
    warning; run on the loop the handlers serve (where their clients and pools live) and waited for
    here, it fails, times out and is retried as the call it belongs to.
    """
    if loop.is_closed():
        if inspect.iscoroutine(awaitable):
            awaitable.close()  # it will never run: no "never awaited" warning on top of the error
        raise RuntimeError("the handler returned an awaitable, and its event loop is closed")
    asyncio.run_coroutine_threadsafe(awaited(awaitable), loop).result()


async def awaited(awaitable: Awaitable[Any]) -> Any:
    """``awaitable`` as a coroutine (``run_coroutine_threadsafe`` takes nothing else)."""
    return await awaitable


def _tell_end(callback: Callable[[BaseException | None, bool], None], *ended: Any) -> None:
    try:
        callback(*ended)
    except Exception:  # an observer's failure (tracing's): never the call's, nor the runner's
        logger.debug("could not tell how a call left behind ended", exc_info=True)


class _ThreadedCall:
    """The plain def body of an async call, run in a handler thread (:meth:`Runner.call_in_thread`).

    Who settles the call is decided under the lock: the call awaiting it, or, once the timeout
    left it behind (or before its thread took it, gave it up), its thread on its own.
    """

    __slots__ = ("failure", "lock", "outcome", "state", "thread")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = _QUEUED
        self.thread = 0
        self.outcome: Any = None  # what it returned, once it ended (unless left behind)
        self.failure: BaseException | None = None  # or what it raised

    def start(self) -> bool:
        """In its thread: ``False`` if the call gave it up before it started."""
        with self.lock:
            if self.state == _GIVEN_UP:
                return False
            self.state = _RUNNING
            self.thread = get_ident()
            return True

    def end(self, outcome: Any, failure: BaseException | None) -> bool:
        """In its thread, once it returned or raised: whether the call was left behind meanwhile."""
        with self.lock:
            left = self.state == _LEFT_BEHIND
            self.state = _ENDED
            if not left:
                self.outcome, self.failure = outcome, failure
            return left


class _Retry:
    """A failed call waiting for its backoff timer."""

    __slots__ = ("attempt", "call", "due", "handle")

    def __init__(self, call: Call, attempt: int, due: float) -> None:
        self.call = call
        self.attempt = attempt  # the attempt it will be
        self.due = due  # monotonic
        self.handle: asyncio.TimerHandle | None = None


class Job(Scope):
    """A scope whose events are being handled: one request's, or one batch emitted outside requests.

    The request's scope *is* its job, so a request with events allocates nothing more. The job state
    below is read by the watchdog and by drain's report of unfinished work. Its defaults live on the
    class (this subclass has a ``__dict__``) and are immutable, so a job that never needs a field
    never sets it.
    """

    task: asyncio.Task[Any] | None = None
    response_status = 0  # the status of the response started, 0 before; set when request_errors="drop"
    # An exception the app answered with an error response of its own, so that the middleware never
    # sees it raised (Litestar's exception handling): its class name, and how many events the
    # request had emitted before it. Set under request_errors="drop", for the response to judge.
    answered_error: tuple[str, int] | None = None
    # A request's: the scope it was opened in, e.g. the request of an outer middleware serving
    # another bus, whose events must still wait for that request's response (EventBus._route).
    parent: Scope | None = None
    cut_off = False  # its unfinished calls were reported: drain cut it off, or it was cancelled
    reported_buffer = 0  # how many of `buffer`'s events that report named already
    # async calls: `current` is the one in progress (or, until the next starts, the one that just
    # ended: nothing awaits in between), so those from it on are unfinished; before the first
    # starts it is None, and so it is again once the last has ended (and `async_calls` is empty)
    async_calls: Sequence[Call] = ()
    current: Call | None = None
    timed_out = False
    # timed_out or cut_off is set: after each call the run loop reads this one flag, not both
    interrupted = False
    # `current` ran past its timeout in a thread (call_in_thread) and was left behind there: it is
    # reported already, and ends by itself
    current_left: _LeftBehind | None = None
    ended_by: BaseException | None = None  # what a timed-out or cut-off call ended with, if not done
    seen: Call | None = None  # the watchdog's note of `current`, and the time it first saw it
    seen_at = 0.0
    # sync calls, run in one thread hop; `sync_current` is published by the worker thread
    sync_calls: Sequence[Call] = ()
    sync_index = 0
    sync_current: SyncCall | None = None
    sync_thread = 0  # the worker thread of its latest thread hop
    sync_reported: SyncCall | None = None
    sync_stop = False
    sync_reported_from = 0  # the first sync call a take-over reported (those before it finished)
    taken_over: list[PendingDelivery] | None = None  # what the take-over reported as unfinished
    # A call past its timeout is left behind in its thread; the rest go on in a new hop. Who
    # settles a call, its thread (it returned) or the watchdog (it left it behind), is decided by
    # who pops it from the hop's `sync_running_calls` first: dict.pop is atomic, and cheaper than
    # a lock per call.
    sync_hop = 0  # the number of the job's latest hop
    sync_running_calls: dict[int, bool] | None = None  # the index of the call in progress
    sync_waiter: asyncio.Future[None] | None = None  # done when the job's latest hop is
    sync_context: contextvars.Context | None = None  # the job's context, for every hop of a run
    sync_left_behind: dict[int, _LeftBehind] | None = None  # by thread: calls left behind, running
    late_done: list[Call] | None = None  # calls left behind that returned, to complete in the log
    # retries and the event log
    attempt = 1  # the attempt number of the job's own calls (a retry job's are > 1)
    durable = False  # its deliveries are in a durable log
    recorded = False  # its current calls are in the log already (retried, resubmitted, revived)
    done: list[Call] | None = None  # async calls that succeeded, to complete in the log
    sync_done: list[Call] | None = None  # the same for sync calls; appended by the worker thread
    sync_running = False  # a thread hop of this job has started and not been awaited to its end
    record_error: StoreError | None = None  # the log refused its deliveries (flush() raises it)
    record_waiters: list[asyncio.Future[None]] | None = None  # EventBus.flush() callers
    failed: list[Call] | None = None  # calls that failed, kept when someone asked (replays)
    errors: list[HandlerError] | None = None  # their errors, kept when someone asked (emit_now)
    unbounded = False  # runs without a concurrency slot (emit_now: its caller may hold one)

    def unfinished(
        self, resolve: Callable[[str], tuple[HandlerSpec, ...]], sync_from: int | None = None
    ) -> list[PendingDelivery]:
        """Every (event, handler) call this job has not finished, in the order it was due."""
        pending: list[PendingDelivery] = []
        sync_index = self.sync_index if sync_from is None else sync_from
        async_index = self.async_index()
        if self.current_left is not None:  # the call in progress, left behind in its thread, is
            async_index += 1  # Runner.left_behind's
        for calls, start in ((self.async_calls, async_index), (self.sync_calls, sync_index)):
            for spec, arg in calls[start:]:
                pending.extend(PendingDelivery(event, spec.name) for event in _events_of(spec, arg))
        for record in self.buffer or ():
            event = make_event(record)
            pending.extend(PendingDelivery(event, spec.name) for spec in resolve(event.name))
        return pending

    def async_index(self) -> int:
        """The index in ``async_calls`` of the call in progress, or of the next to start.

        Found from ``current`` rather than kept up to date: run_job would store it once per call,
        and it is read only when unfinished work is reported. By identity: each call is a tuple
        of its own.
        """
        current = self.current
        if current is not None:
            for index, call in enumerate(self.async_calls):
                if call is current:
                    return index
        return 0

    def reported_unfinished(self, sync_index: int) -> bool:
        """Whether its sync call at ``sync_index`` was among those a take-over reported unfinished."""
        return self.cut_off and sync_index >= self.sync_reported_from

    def take_over(self, resolve: Callable[[str], tuple[HandlerSpec, ...]]) -> list[PendingDelivery]:
        """The unfinished calls, for the caller to report: the job runs none of them any more.

        What a call among them does after this (fails, emits) is not reported again; a call
        that finished before it (its failure may still be on its way from its thread) is not
        among them, and is reported as usual.
        """
        self.sync_reported_from = self.sync_index  # read once: its thread may move on meanwhile
        pending = self.unfinished(resolve, self.sync_reported_from)
        self.taken_over = pending
        self.cut_off = self.interrupted = True
        self.sync_stop = True  # its worker thread stops before its next call
        self.reported_buffer = len(self.buffer or ())
        return pending


class Runner:
    """Executes jobs for one bus. Owned by :class:`~tidings.EventBus`; not public."""

    def __init__(
        self,
        bus: EventBus,
        registry: Registry,
        limits: Limits,
        on_failure: FailureHook | None,
        store: Store,
        lease: float,
    ) -> None:
        self.bus = bus
        self.registry = registry
        self.cached = registry.cached  # (_sort: a C call where resolve() is a method call)
        self.limits = limits
        self.on_failure = on_failure
        self.store = store
        self.durable = store.durable
        self.lease = lease
        self.jobs: set[Job] = set()
        self.retries: set[_Retry] = set()
        # outbox events handed to the bus whose job has not recorded them yet (their log rows
        # exist; their leases need renewing meanwhile), by id; until a job takes them, or they are
        # dropped or reported unfinished (the log runs them again once their lease is out)
        self.released: dict[str, Event] = {}
        # cut-off calls reported unfinished by their own job's task (what it emitted as the drain
        # cancelled it), for the next keep_unfinished() to write to the log with the drain's own
        self.unkept: list[PendingDelivery] = []
        # sync calls past their timeout, still running in a thread their job no longer waits for
        # (a dict: reported in the order left behind)
        self.left_behind: dict[tuple[Job, Call], _LeftBehind] = {}
        # tasks running what is left of such a call once its thread returned (it stays left behind
        # until they end; held here, as the loop keeps only weak references to tasks)
        self.rests: set[asyncio.Task[None]] = set()
        # calls of an async def on_failure hook; drain waits for them within its bound, and they
        # are not cancelled at shutdown (the report of what the bound cut off is among them)
        self.hook_tasks: set[asyncio.Task[None]] = set()
        self._hooks_overdue: set[asyncio.Task[None]] = set()  # those a drain named as still running
        self.closed = False  # shut down: nothing is scheduled any more
        self.loop: asyncio.AbstractEventLoop | None = None
        # what worker threads passed to the loop (a failure, the end of a call left behind) that
        # it has not run yet, by a key of their own: a loop that stops before running them never
        # will, so bind() runs them on the next one
        self.in_transit: dict[int, tuple[Callable[..., None], tuple[Any, ...]]] = {}
        self._transit_keys = itertools.count()
        self._executor: DaemonThreadPool | None = None
        self._running = 0
        # bind() starts counting slots afresh: a job still running from before (it outlived a drain
        # cut-off) must not give back a slot of the new count
        self._slot_generation = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._watch_handle: asyncio.TimerHandle | None = None
        self._tick = _MAX_TICK
        # Set by the bus at start while it traces: _sort and run_calls then hand out handlers whose
        # calls are wrapped in spans. Read once per sorted batch, never per call.
        self.tracing: Tracing | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def bind(self, loop: asyncio.AbstractEventLoop) -> tuple[list[Job], list[_LeftBehind]]:
        """Serve ``loop``; return the jobs and the calls left behind of a loop that closed, for
        :meth:`report_dead` to report.

        Jobs of an event loop that closed under the bus (a test client's, without a lifespan
        shutdown) can never finish, nor can a call left behind whose rest (its background tasks)
        ran there: they are reported at once rather than have drain wait out its bound (and
        then fail to cancel a task of a closed loop), but not here: the bus binds under its
        lock, and the failure hook or a logging handler may emit.
        """
        self.loop = loop  # first: an async failure hook's reports of them run here
        dead = [job for job in self.jobs if job.task is not None and job.task.get_loop().is_closed()]
        for job in dead:
            self.jobs.discard(job)
        dead_calls: list[_LeftBehind] = []
        for (job, call), left in tuple(self.left_behind.items()):
            if left.rest is not None and left.rest.get_loop().is_closed():
                del self.left_behind[job, call]
                self.rests.discard(left.rest)
                dead_calls.append(left)
        self.hook_tasks = {task for task in self.hook_tasks if not task.get_loop().is_closed()}
        self._hooks_overdue &= self.hook_tasks
        self.closed = False
        for key in list(self.in_transit):  # passed to a loop that stopped before running them
            loop.call_soon(self._arrived, key)
        self._running = 0
        self._slot_generation += 1
        self._slot_waiters.clear()
        self._watch_handle = None
        if self._executor is None:
            self._executor = DaemonThreadPool(self.limits.max_threads, "tidings-handler")
        return dead, dead_calls

    def report_dead(self, dead: list[Job], dead_calls: list[_LeftBehind]) -> None:
        """Report the unfinished calls of the jobs, and the calls left behind (with what they
        emitted since), that :meth:`bind` found on a closed loop."""
        resolve = self.registry.resolve
        where = "it stays in the event log" if self.durable else "it is lost"
        why = f"its event loop closed before it finished; {where}"
        for job in dead:
            self.report_unfinished(job.take_over(resolve), why)
        for left in dead_calls:
            left.end(None, True)
            spec, arg = left.call
            scope = left.rest_scope
            assert scope is not None  # (it has a rest)
            records, scope.buffer = scope.buffer or [], None
            pending = [PendingDelivery(event, spec.name) for event in _events_of(spec, arg)]
            self.report_unfinished([*pending, *Job(self.bus, records).unfinished(resolve)], why)

    def shutdown(self) -> None:
        self.closed = True
        self.released.clear()
        self.unkept.clear()
        for left in self.left_behind.values():
            left.end(None, True)
        self.left_behind.clear()
        self.abandon_retries()
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
        tick = _MAX_TICK if smallest is None else max(_MIN_TICK, min(_MAX_TICK, smallest / 4))
        shorter, self._tick = tick < self._tick, tick
        loop = self.loop
        if shorter and self._watch_handle is not None and loop is not None and not loop.is_closed():
            # a handler registered while jobs run: its timeout must not wait out the longer tick
            loop.call_soon_threadsafe(self._rearm_watch)

    def _rearm_watch(self) -> None:
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = self.loop.call_later(  # type: ignore[union-attr]  # bound
                self._tick, self._watch, context=contextvars.Context()
            )

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
        self._track(job)
        return True

    def _track(self, job: Job) -> None:
        if self.durable:
            job.durable = True
            job.done = []
            job.sync_done = []
        self.jobs.add(job)
        if self._watch_handle is None:
            self._arm_watch()

    def _arm_watch(self) -> None:
        if self.loop is not None:
            # in a context of its own: armed in a job's, it would keep that job (and its request's
            # context variables) alive for as long as it runs
            self._watch_handle = self.loop.call_later(self._tick, self._watch, context=contextvars.Context())

    def spawn(self, job: Job) -> None:
        """Run a started job in a task of its own, in a clean context whose scope is the job."""
        assert self.loop is not None
        context = contextvars.Context()
        context.run(set_scope, job)
        job.task = self.loop.create_task(self.run_job(job), context=context)

    def run_calls(self, calls: Sequence[Call], *, attempt: int, recorded: bool) -> Job:
        """Start a job of given calls (retries, resubmitted or replayed deliveries) in a task."""
        job = Job(self.bus, [])
        job.attempt = attempt
        job.recorded = recorded
        if self.tracing is not None:
            calls = self.tracing.traced_calls(calls)
        job.async_calls = [call for call in calls if call[0].is_async]
        sync_calls = [call for call in calls if not call[0].is_async]
        if sync_calls:
            job.sync_calls = sync_calls
        self._track(job)
        self.spawn(job)
        return job

    def run_deliveries(self, deliveries: Iterable[Delivery]) -> list[Job]:
        """Start the deliveries the log handed back, one job per attempt count.

        A delivery whose handler is no longer registered is logged and left in the log.
        """
        by_attempt: dict[int, list[Call]] = {}
        for delivery in deliveries:
            spec = self.registry.named(delivery.handler)
            if spec is None:
                logger.error(
                    "delivery %s from the event log (event %r, id %s) was not run: no handler named "
                    "%r is registered",
                    delivery.id,
                    delivery.event.name,
                    delivery.event.id,
                    delivery.handler,
                    extra=fields(delivery.event.name, delivery.event.id, delivery.handler),
                )
                continue
            event = delivery.event
            event.payload = self.bus.schemas.revive(event.name, event.payload)
            by_attempt.setdefault(delivery.attempts + 1, []).append(call_for(spec, event))
        return [self.run_calls(calls, attempt=a, recorded=True) for a, calls in by_attempt.items()]

    def request_job(self, job: Job) -> bool:
        """:meth:`start_job` for a finished request, to be run in the request's own task."""
        return self.start_job(job, task_of(self.loop))  # type: ignore[arg-type]  # bound

    async def run_job(self, job: Job, request_task: asyncio.Task[Any] | None = None) -> None:
        """Run a started job to completion in the current task.

        With ``request_task`` (the current task, which the middleware has at hand) the job is a
        finished request's scope, not started yet: it is sorted and tracked here first, as
        :meth:`start_job` does (so a request costs one coroutine, not a call and a coroutine), and
        ends at once when nobody handles its events.

        Deliberately one flat coroutine: each extra layer of ``await`` costs more per request than
        the work of delivering one event (bench/README.md). For the same reason the common case
        (in memory, every handler async) reads as few job attributes as it can: ``durable`` guards
        everything the event log needs.
        """
        if request_task is not None:
            if self.closed:  # the request outlived the bus: its events go where late emits go
                self.bus.adopt(job)  # (logged and dropped, each by name)
                return
            # never empty: the middleware runs a request's job only once it emitted
            emitted: list[Record] = job.buffer  # type: ignore[assignment]
            if not self._sort(emitted, job):
                job.buffer = None
                return
            emitted.clear()  # sorted: the same list takes what the handlers emit (one list less)
            job.task = request_task
            # _track(), inlined: a call less per request
            durable = self.durable
            if durable:
                job.durable = True
                job.done = []
                job.sync_done = []
            # Set on the job itself, the flag read after every call is cheap to read: a class
            # default read through an instance costs several times an instance attribute's.
            job.interrupted = False
            unbounded = False  # only emit_now's and replay's jobs are, never a request's
            self.jobs.add(job)
            if self._watch_handle is None:
                self._arm_watch()
        else:
            durable = job.durable  # set once, when the job was tracked
            unbounded = job.unbounded
        slot = 0  # the generation of the slot the job holds (bind() makes them 1, 2, ...), if any
        recording = False  # writing the events its handlers emitted to the log
        try:
            # In the log before it waits for a slot: a crash while it waits must not lose it, and
            # flush() in a handler (which holds a slot) must not wait for a slot it holds itself.
            if durable and not job.recorded:
                if not await self._record(job):
                    # the log failed to take what a call left behind emitted (this job's first
                    # calls): that call stays in it, leased, to run again and emit them again
                    job.done = []
                job.recorded = True
                if job.record_waiters:
                    _wake(job.record_waiters)
            if unbounded:
                pass
            elif self._running < self.limits.max_concurrency:
                self._running += 1
                slot = self._slot_generation
            else:
                await self._wait_for_slot()
                slot = self._slot_generation
            while True:
                sync_future = self._start_sync(job, 0) if job.sync_calls else None
                for call in job.async_calls:
                    job.current = call
                    spec, arg = call
                    try:
                        await spec.call(arg)
                    except asyncio.CancelledError as exc:
                        if job.timed_out:
                            job.ended_by = exc  # where it hung: the timeout's traceback
                        else:
                            if job.task is not None and job.task.cancelling():
                                raise  # cancelled from outside (drain bound, server): not ours
                            self._handler_cancelled(job, spec, arg, exc)
                    except _FATAL:
                        raise
                    except BaseException as exc:  # a handler's BaseException is its own failure
                        if job.timed_out or job.cut_off:
                            # raised on its way out of the cancellation (a clean-up that failed):
                            # part of the timeout or cut-off, reported once, as that
                            job.ended_by = exc
                        else:
                            self._handler_failed(job, spec, arg, exc)
                    else:
                        if durable and not job.timed_out:  # a timed-out call is retried, not done
                            job.done.append(call)  # type: ignore[union-attr]  # durable jobs have it
                    # (`current` stays set until the next call or the loop's end: nothing can
                    # look at it before, as nothing here awaits)
                    if job.interrupted:
                        if job.timed_out:
                            self._handler_timed_out(job, spec, arg)
                        if job.cut_off:  # drain took the job over while a handler swallowed the cancel
                            self._cut_off_call_ended(job, spec)
                            raise asyncio.CancelledError
                job.current = None
                job.async_calls = ()
                if sync_future is not None:
                    try:
                        await sync_future
                    except asyncio.CancelledError:
                        job.sync_stop = True  # the thread stops before its next call
                        raise
                    job.sync_calls = ()
                    job.sync_running = False
                    job.sync_context = None  # no more hops this round (and no cycle through it)
                records = job.buffer  # events the handlers emitted: same job, right after
                # calls left behind that returned by now: their events are in `records` (or
                # before); they stay in `late_done`, leased, until those are in the log
                late = len(job.late_done) if durable and job.late_done else 0
                if not records:
                    if durable:
                        if late:
                            self._take_late(job, late)
                        if job.done or job.sync_done:
                            self._complete(job)
                    break
                if job.cut_off:
                    raise asyncio.CancelledError
                job.buffer = []
                job.attempt = 1  # chained events are new: their first attempt
                recorded = True
                if self._sort(records, job) and durable:
                    recording = True  # cut off meanwhile, the parents stay in the log (finally)
                    recorded = await self._record(job)
                    recording = False
                if not recorded:
                    # The children go into the log before their parents leave it: a crash in
                    # between must not lose the events a finished handler emitted. The log
                    # failed to take them, so the parents stay in it, leased: run again once
                    # their lease is out, they emit the children again (at least once beats lost).
                    job.done = []
                    job.sync_done = []  # the hop is over: its thread appends to it no more
                    if late:  # calls left behind whose events were among them stay too
                        del job.late_done[:late]  # type: ignore[union-attr]  # late > 0: it is a list
                        late = 0
                if durable:
                    if late:
                        self._take_late(job, late)
                    if job.done or job.sync_done:
                        self._complete(job)
        except asyncio.CancelledError:
            if not job.cut_off:
                self._cancelled(job)
            elif job.buffer and len(job.buffer) > job.reported_buffer:
                # drain reported the rest; these were emitted while it cancelled us
                leftovers = Job(job.bus, job.buffer[job.reported_buffer :]).unfinished(self.registry.resolve)
                self.report_unfinished(leftovers, "the drain bound ran out")
                if durable:  # kept in the log with the rest of the cut-off (keep_unfinished)
                    self.unkept.extend(leftovers)
            raise
        finally:
            unrecorded = job.buffer
            job.buffer = None  # later emits from this context go straight to the bus
            # A finished call whose emitted events never reached the log stays in it, leased:
            # run again later, it emits them again (at least once beats lost).
            if durable:
                if unrecorded:
                    # an event nobody handles has no delivery to write: it keeps no call in the log
                    resolve = self.registry.resolve
                    unrecorded = [record for record in unrecorded if resolve(record[0])]
                # (and its own calls must be in the log: a job of a late call's events may be
                # cut off before it recorded them, with that call in `done` already)
                if not unrecorded and job.recorded and not recording:
                    # Cut off (or cancelled) before it awaited its thread hop: the plain def calls
                    # the hop finished returned all the same, and must leave the log (else they run
                    # again after a restart, reported nowhere). One the hop finishes from now on was
                    # reported unfinished, and stays in the log. So must the calls left behind
                    # that returned while it ran: what they emitted is in the log, or needs no row.
                    if job.late_done:
                        self._take_late(job, len(job.late_done))
                    if job.done or job.sync_done:
                        job.sync_running = False
                        self._complete(job)
                if job.record_waiters:  # it ended before its record step (cut off): stop waiting
                    _wake(job.record_waiters)
            if slot == self._slot_generation:
                if self._slot_waiters:
                    self._release_slot()
                else:
                    self._running -= 1
            self.jobs.discard(job)
            # The job can outlive its run: a context copied while it ran holds it (a task the
            # request started, or a server's timer: uvicorn's keep-alive one, armed in the request's
            # send(), waits in the loop's heap after it is cancelled). Holding its task too, it would
            # keep the task's coroutine and context alive; and a task run in a copy of the job's
            # context (spawn(), request_handlers="task") would make a cycle only the GC frees.
            job.task = None
            if self._idle_waiters:
                self._wake_idle_waiters()

    @staticmethod
    def _take_late(job: Job, count: int) -> None:
        """Move the first ``count`` calls of ``job.late_done`` to ``job.done``, to be completed."""
        assert job.late_done is not None
        assert job.done is not None
        job.done.extend(job.late_done[:count])
        del job.late_done[:count]

    async def wait_recorded(self) -> list[StoreError]:
        """Wait until every durable job tracked now has tried to write its first calls to the log.

        Returns:
            The log's refusals (empty when every write succeeded).
        """
        assert self.loop is not None
        waiters = []
        jobs = [job for job in self.jobs if job.durable and not job.recorded]
        for job in jobs:
            waiter = self.loop.create_future()
            if job.record_waiters is None:
                job.record_waiters = []
            job.record_waiters.append(waiter)
            waiters.append(waiter)
        if waiters:
            await asyncio.wait(waiters)
        return [job.record_error for job in jobs if job.record_error is not None]

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
        cached = self.cached
        if self.tracing is not None:  # one check per batch of events; nothing more when off
            records = self.tracing.prepare(records)
            cached = self.tracing.resolve  # never None
        async_calls: list[Call] = []
        sync_calls: list[Call] | None = None  # most jobs have none: no list for them
        batches: dict[HandlerSpec, list[Event]] | None = None
        for name, payload, timestamp_ns, headers in records:
            handlers = cached(name)
            if not handlers:
                if handlers is None:  # not looked up yet
                    handlers = self.registry.resolve(name)
                if not handlers:
                    if type(headers) is Prebuilt:  # a committed outbox event nobody here handles
                        self.released.pop(headers.event.id, None)
                    continue
            if headers is None:  # what emit() makes: checked first, so it costs no more than before
                # Event(name, payload, EMPTY_HEADERS, timestamp_ns) without the type call, whose
                # __init__ runs in a frame of its own (CPython 3.11 inlines plain calls, not that)
                event = new_object(Event)
                event.name = name
                event.payload = payload
                event.headers = EMPTY_HEADERS
                event.timestamp_ns = timestamp_ns
                event._seq = new_sequence()
                event._id = None
            elif type(headers) is Prebuilt:
                event = headers.event
                # from here the job renews its lease (or, should the job die, the lease runs out)
                self.released.pop(event.id, None)
            else:
                event = Event(name, payload, headers or EMPTY_HEADERS, timestamp_ns)
            for spec in handlers:
                if spec.batch:
                    if batches is None:
                        batches = {}
                    batches.setdefault(spec, []).append(event)
                elif spec.is_async:
                    async_calls.append((spec, event))
                elif sync_calls is None:
                    sync_calls = [(spec, event)]
                else:
                    sync_calls.append((spec, event))
        if batches:
            for spec, events in batches.items():
                # a tuple: the handler gets its own list (HandlerSpec.call copies), we keep ours
                if spec.is_async:
                    async_calls.append((spec, tuple(events)))
                elif sync_calls is None:
                    sync_calls = [(spec, tuple(events))]
                else:
                    sync_calls.append((spec, tuple(events)))
        job.async_calls = async_calls
        if sync_calls is None:
            job.sync_calls = ()  # even none: run_job reads it, and an instance's is cheaper to read
            return bool(async_calls)
        job.sync_calls = sync_calls
        job.sync_index = 0
        return True

    def _complete(self, job: Job) -> None:
        """Tell the log which calls succeeded (sync ones only once the worker thread is done)."""
        done, job.done = job.done or [], []
        sync_done = job.sync_done
        if sync_done and not job.sync_running:  # the hop is over: nobody appends to it any more
            done += sync_done
            job.sync_done = []
        if done:
            self._complete_calls(done)

    def _complete_calls(self, calls: list[Call]) -> None:
        """Delete the deliveries of calls that succeeded from the log."""
        deliveries = [(event.id, name) for event, name in deliveries_of(calls)]
        try:
            self.store.complete(deliveries)
        except Exception as exc:  # a failure of the log, never of the job that succeeded
            _store_failed(exc, "complete", deliveries, "they stay in it, to run again (at least once)")

    async def _record(self, job: Job) -> bool:
        """Write the job's current calls to the log before they run (they run even if it fails).

        Returns:
            ``False`` if the log failed (it may take them on a later try); ``True`` if it took
            them, or refused some for good (a payload it cannot encode is never going to fit).
        """
        deliveries = deliveries_of(job.async_calls) + deliveries_of(job.sync_calls)
        try:
            refused = await self.store.record(deliveries, lease=self.lease)
        except Exception as exc:  # whatever the log raised, it is the log's failure: the calls still run
            if isinstance(exc, StoreError):
                error = exc
            else:
                what = described(exc)
                error = StoreError(f"the event log failed to record {len(deliveries)} deliveries: {what}")
                error.__cause__ = exc
            logger.error("%s; %d deliveries run without being durable", error, len(deliveries), exc_info=exc)
            job.record_error = error
            return False
        if refused:
            job.record_error = StoreError(
                f"{len(refused)} event(s) could not be written to the log: " + "; ".join(refused.values())
            )
            _log_refused(refused, deliveries, "it is handled now, but not durably")
        return True

    def _handler_failed(self, job: Job, spec: HandlerSpec, arg: Any, exc: BaseException) -> None:
        self.failed(job, (spec, arg), _raised(spec, arg, exc), exc)

    def _handler_cancelled(self, job: Job, spec: HandlerSpec, arg: Any, exc: BaseException) -> None:
        self.failed(job, (spec, arg), _cancelled_error(spec, arg), exc)

    def failed(
        self,
        job: Job,
        call: Call,
        error: HandlerError,
        cause: BaseException | None,
        attempt: int | None = None,
    ) -> None:
        """A call failed: report it, then retry it later or make dead letters of it.

        Runs on the loop (a worker thread's failures are passed here with ``call_soon_threadsafe``,
        with the attempt its hop ran: a call left behind may fail after its job went on).
        """
        spec, arg = call
        policy = spec.retry
        if attempt is None:
            attempt = job.attempt
        error.attempt = attempt
        delay: float | None = None
        # A timeout or a cancellation is judged as the HandlerError it became, whatever ended it.
        subject = cause if isinstance(cause, Exception) and type(error) is HandlerError else error
        if attempt < policy.max_attempts and policy.retries(subject):
            delay = policy.delay(attempt)
            deadline = policy.deadline
            if deadline is not None and time() + delay - error.event.timestamp_ns / 1e9 > deadline:
                delay = None
        if delay is not None and self.closed:  # failed after shutdown (a thread that ran on)
            error.retry_in = None
            if job.failed is not None:
                job.failed.append(call)
            self.report(error, cause)
            where = "it stays in the event log, to run after the next start" if job.durable else "it is lost"
            self.report_unfinished(
                [PendingDelivery(event, spec.name) for event in _events_of(spec, arg)],
                f"it failed after the bus closed, so it was not retried; {where}",
            )
            return
        error.retry_in = delay
        if delay is None:
            text = described(subject)
            trace = "".join(traceback.format_exception(cause)) if cause is not None else ""
            now = DeadLetter.now()
            error.dead_letters = tuple(
                DeadLetter(event, spec.name, attempt, text, trace, now) for event in _events_of(spec, arg)
            )
        if job.failed is not None:
            job.failed.append(call)
        if job.errors is not None:
            job.errors.append(error)
        self.report(error, cause)
        if delay is not None:
            self._retry_later(call, attempt, delay, job.durable)
        else:
            try:
                self.store.bury(error.dead_letters)
            except Exception as exc:  # a failure of the log, never of the job (its other calls still run)
                letters = [(letter.event.id, letter.handler) for letter in error.dead_letters]
                _store_failed(
                    exc,
                    "write the dead letters of",
                    letters,
                    "they are not kept (one the log holds as pending runs again when its lease runs out)",
                )

    def _sync_call_failed(
        self, job: Job, call: Call, index: int, error: HandlerError, cause: BaseException, attempt: int
    ) -> None:
        if job.reported_unfinished(index):
            self._cut_off_call_ended(job, call[0], cause)
        else:
            self.failed(job, call, error, cause, attempt)

    @staticmethod
    def _cut_off_call_ended(job: Job, spec: HandlerSpec, cause: BaseException | None = None) -> None:
        """A call reported as unfinished (its job cut off or cancelled) ended after all: log how."""
        if cause is None:
            cause, job.ended_by = job.ended_by, None
        if cause is not None:  # it is reported already (not finished, no retry): only logged here
            logger.warning(
                "handler %s raised %s after it was reported as unfinished (its job was cut off)",
                spec.name,
                type(cause).__name__,
                exc_info=cause,
                extra=fields(None, None, spec.name),
            )

    def _retry_later(self, call: Call, attempt: int, delay: float, durable: bool) -> None:
        assert self.loop is not None
        spec, arg = call
        if durable:
            for event in _events_of(spec, arg):
                try:
                    self.store.retry_later(
                        event.id, spec.name, attempts=attempt, due_in=delay, lease=self.lease
                    )
                except Exception as exc:  # a failure of the log: the retry below still comes
                    _store_failed(
                        exc, "note the failed attempt of", [(event.id, spec.name)], "retried all the same"
                    )
        retry = _Retry(call, attempt + 1, monotonic() + delay)
        retry.handle = self.loop.call_later(delay, self._retry_due, retry)
        self.retries.add(retry)

    def _retry_due(self, retry: _Retry) -> None:
        self.retries.discard(retry)
        self.run_calls([retry.call], attempt=retry.attempt, recorded=self.durable)
        if self._idle_waiters:  # the retry was what a drain waited for; now a job is
            self._wake_idle_waiters()

    def abandon_retries(self) -> list[PendingDelivery]:
        """Cancel every retry still waiting for its timer (the bus is closing): report and list them.

        Drain waits for retries due within its bound (they fire and become jobs); these are due
        after it.
        """
        pending: list[PendingDelivery] = []
        for retry in sorted(self.retries, key=lambda r: r.due):
            if retry.handle is not None:
                retry.handle.cancel()
            spec, arg = retry.call
            pending.extend(PendingDelivery(event, spec.name) for event in _events_of(spec, arg))
        self.retries.clear()
        if pending:
            where = "it stays in the event log, to run after the next start" if self.durable else "it is lost"
            self.report_unfinished(pending, f"its retry was due after the bus closed; {where}")
        return pending

    def _handler_timed_out(self, job: Job, spec: HandlerSpec, arg: Any) -> None:
        """The watchdog cancelled this call: take the cancellation back and report the timeout."""
        task = job.task
        assert task is not None
        job.timed_out = False
        job.interrupted = job.cut_off
        task.uncancel()
        cause, job.ended_by = job.ended_by, None
        if job.current_left is not None:  # reported as past its timeout: it ends in its thread
            job.current_left = None
            if cause is not None and not isinstance(cause, asyncio.CancelledError):
                # its outcome is its thread's: this failure (a dependency's clean-up) is only logged
                logger.error(
                    "handler %s: what ran after it was left behind past its timeout raised %s",
                    spec.name,
                    described(cause),
                    exc_info=cause,
                    extra=fields(None, None, spec.name),
                )
        elif not job.cut_off:  # a cut-off job's unfinished calls, this one included, are reported
            message = f"handler {spec.name} timed out after {spec.timeout}s and was cancelled"
            error = HandlerTimeoutError(message, events=_events_of(spec, arg), handler=spec.name)
            self.failed(job, (spec, arg), error, cause)
        if task.cancelling():  # someone else cancelled it too: that one stands
            # this call is reported already: not among the unfinished that the cancellation reports
            job.async_calls, job.current = job.async_calls[job.async_index() + 1 :], None
            raise asyncio.CancelledError

    def _start_sync(self, job: Job, start: int) -> asyncio.Future[None]:
        """Run the job's sync calls from ``start`` on in a worker thread; return the job's waiter.

        The waiter (one per job run, whichever hops it takes) is done when the job's latest hop
        is: a hop left behind with a call past its timeout no longer counts.
        """
        loop = self.loop
        assert loop is not None
        assert self._executor is not None
        job.sync_hop += 1
        hop = job.sync_hop
        job.sync_index = start
        job.sync_current = None
        running: dict[int, bool] = {}
        job.sync_running_calls = running
        if start == 0:
            job.sync_stop = False
            job.sync_running = True
            job.sync_waiter = loop.create_future()
            # The thread sees the job's context, so sync handlers can emit and their events chain.
            # A later hop (the watchdog starts it, in its own context) gets a copy of the same:
            # the thread left behind is still inside the first.
            context = job.sync_context = contextvars.copy_context()
        else:
            assert job.sync_context is not None
            context = job.sync_context = job.sync_context.copy()
        future = loop.run_in_executor(
            self._executor, context.run, self._run_sync_calls, job, running, start, job.attempt
        )
        future.add_done_callback(lambda ended: self._hop_ended(job, hop, ended))
        assert job.sync_waiter is not None
        return job.sync_waiter

    def _hop_ended(self, job: Job, hop: int, ended: asyncio.Future[None]) -> None:
        error = None if ended.cancelled() else ended.exception()  # retrieved, so never "unretrieved"
        waiter = job.sync_waiter
        if hop != job.sync_hop or waiter is None or waiter.done():
            if error is not None:  # a hop left behind, stopped by what stops the process
                logger.error("a worker thread of bus %r stopped: %r", self.bus.name, error)
            return
        if ended.cancelled():
            waiter.cancel()
        elif error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(None)

    def _run_sync_calls(self, job: Job, running: dict[int, bool], start: int, attempt: int) -> None:
        """Runs in a worker thread: the job's sync calls from ``start`` on, in order."""
        loop = self.loop
        assert loop is not None
        calls = job.sync_calls
        job.sync_thread = get_ident()
        for index in range(start, len(calls)):
            if job.sync_stop:
                return
            call = calls[index]
            spec, arg = call
            job.sync_index = index
            # one attribute, so the watchdog never pairs one call's handler with another's event
            running[index] = True  # before the watchdog can see it
            job.sync_current = (spec, arg, monotonic(), index)
            failure: tuple[HandlerError, BaseException] | None = None
            try:
                result = spec.call(arg)
                if result is not None and inspect.isawaitable(result):
                    _await_in_loop(result, loop)
            except _FATAL:
                if not running.pop(index, False):
                    self._hand_back(job, call, False, None, attempt)
                raise
            except BaseException as exc:  # a handler's BaseException is its own failure
                failure = (_raised(spec, arg, exc), exc)
            if not running.pop(index, False):
                # The watchdog left this call behind: the job went on without it (this thread
                # no longer touches the job's state), so its end is passed on by itself.
                self._hand_back(job, call, failure is None, failure, attempt)
                return
            job.sync_current = None
            if failure is not None:
                # Finished before its failure is passed on: the loop may report the failure and
                # take the job over before this thread goes on, and must not report it twice.
                job.sync_index = index + 1
                try:
                    self._pass_to_loop(self._sync_call_failed, job, call, index, *failure, attempt)
                except RuntimeError:  # its loop closed (the bus was closed meanwhile): said here, then
                    _failed_after_the_loop(spec.name, failure[1])
                    return
                continue
            if job.sync_done is not None:
                job.sync_done.append(call)  # read by the loop once this hop is over
            job.sync_index = index + 1  # finished: a take-over from now on does not report it
        job.sync_index = len(calls)

    def _pass_to_loop(
        self, callback: Callable[..., None], *args: Any, taking: _LeftBehind | None = None
    ) -> None:
        """From a worker thread: have the loop run ``callback(*args)``, kept until it does.

        A loop that closed under a bus still open (no shutdown ran) leaves it kept: the next loop
        the bus starts on runs it (:meth:`bind`), and reports of what is pending list it meanwhile.
        ``taking`` is a call left behind whose events go with it, into the list that ends ``args``:
        taken and kept in one step under the call's lock, so that a cut-off closing the call
        either takes them itself or finds them kept (:meth:`ends_on_their_way`), never neither.

        Raises:
            RuntimeError: the loop has closed and so has the bus (the caller says what is lost).
        """
        assert self.loop is not None
        key = next(self._transit_keys)  # (one step under the GIL, as the dict's set and pop)
        if taking is None:
            self.in_transit[key] = (callback, args)
        else:
            into: list[Record] = args[-1]

            def keep(records: list[Record]) -> None:
                into.extend(records)
                self.in_transit[key] = (callback, args)

            taking.close(keep)
        try:
            self.loop.call_soon_threadsafe(self._arrived, key)
        except RuntimeError:
            if not self.closed:
                return  # for the next loop (or it ran there already)
            if self.in_transit.pop(key, None) is None:
                return  # the next loop ran it meanwhile
            raise

    def _arrived(self, key: int) -> None:
        passed = self.in_transit.pop(key, None)
        if passed is not None:  # else it ran already (scheduled again by bind(), on the next loop)
            callback, args = passed
            callback(*args)

    def _hand_back(
        self,
        job: Job,
        call: Call,
        succeeded: bool,
        failure: tuple[HandlerError, BaseException] | None,
        attempt: int,
    ) -> None:
        """Runs in the thread of a call left behind, once it has returned or raised.

        ``failure`` is the call's failure; what stops the process is none (nor a success).
        """
        assert self.loop is not None
        # the watchdog put it there before it took the call over; this thread may serve a hop next
        left = job.sync_left_behind.pop(get_ident(), None) if job.sync_left_behind else None
        records: list[Record] = []  # what it emitted since, taken with its end in transit
        try:
            # after the events it emitted before it was left behind (scheduled the same way)
            self._pass_to_loop(
                self._left_behind_ended, job, call, succeeded, failure, attempt, records, taking=left
            )
        except RuntimeError:  # the loop has closed: nobody waits for this call any more...
            if failure is not None:
                self._cut_off_call_ended(job, call[0], failure[1])
            if records:  # ...nor handles what it emitted: each is logged as dropped
                self.bus.adopt(Job(self.bus, records))

    def _leave_behind(self, job: Job, sync_call: SyncCall) -> None:
        """Go on without a sync call past its timeout: its thread keeps it, a new hop the rest.

        Threads cannot be interrupted, so the call runs on; but the calls queued behind it, the
        job (a request's handlers, their concurrency slot) and drain do not wait for it beyond
        the drain bound. It stays in the log meanwhile (its lease renewed), and counts as
        unfinished until it returns.
        """
        running = job.sync_running_calls
        if running is None or self.closed or job.sync_stop or job.cut_off:
            return
        spec, arg, _, index = sync_call
        left = _LeftBehind((spec, arg))
        if job.sync_left_behind is None:
            job.sync_left_behind = {}
        # Before the call is taken over: from now on what its thread emits (and logs) is the
        # call's own, whoever wins the pop below.
        thread = job.sync_thread
        job.sync_left_behind[thread] = left
        if not running.pop(index, False):  # it has just returned: its thread goes on
            del job.sync_left_behind[thread]
            for record in left.close():  # emitted as it returned: the job's, behind what came before
                self.loop.call_soon(self.bus.append_to, job, record)  # type: ignore[union-attr]
            return
        job.sync_current = None
        self.left_behind[job, left.call] = left
        self._take_queued()
        rest = index + 1
        if rest < len(job.sync_calls):
            self._start_sync(job, rest)
        else:
            job.sync_index = rest
            if job.sync_waiter is not None and not job.sync_waiter.done():
                job.sync_waiter.set_result(None)

    def _take_queued(self) -> None:
        """On the loop, as a take-over settles who owns a call: take in what threads queued for it.

        What the call's thread emitted as its job's may still be queued, behind the job's wake-up
        or behind a job that ends in this very task step: taken in after that, it would find the
        job ended and go on as an outside event, while the call is completed in the log before
        that event is recorded. Taken now, it is in the job's buffer while the job still runs.
        The thread's last look at whether its call was left behind (EventBus._hand_over) is under
        the lock this takes, so what it queues after this is the call's.
        """
        self.bus._take_handed_over()

    async def call_in_thread(
        self, work: Callable[[], Any], then: Callable[[], Awaitable[object]] | None = None
    ) -> Any:
        """Run ``work``, the plain def body of the async call in progress, in the handler threads.

        For an integration whose handler call is async around a plain def handler (FastAPI
        solves dependencies on the loop). The thread sees the caller's context, so the handler's
        emits chain. Past the call's timeout, the call is what a plain def call is then: reported
        as run past its timeout, and left behind in its thread, where its return completes it and
        its failure is retried or made a dead letter; the await raises ``CancelledError`` as
        the timeout's (the async part ends: the integration's clean-up runs) and the job goes on.
        Outside a job's call (no job of this bus is running one in this task), ``work`` simply
        runs in the threads.

        ``then`` is what the caller runs once ``work`` returned (FastAPI's background tasks): for
        a call left behind, the runner runs it when the thread returns, as part of the call (a
        failure of it is the call's, and the call is completed only after it).
        """
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        job = current_scope()
        call = job.current if type(job) is Job and job.bus is self.bus else None
        if call is None or job.task is not task_of(loop):  # type: ignore[union-attr]
            return await loop.run_in_executor(self._executor, context.run, work)
        assert type(job) is Job
        threaded = _ThreadedCall()
        future = loop.run_in_executor(
            self._executor, context.run, self._run_threaded, job, call, job.attempt, threaded, work
        )
        try:
            return await future
        except asyncio.CancelledError:
            if not self._thread_call_cancelled(job, call, threaded, then):
                raise
        # It ended as its timeout came, before its end reached this task: how it ended stands.
        failure, threaded.failure = threaded.failure, None  # (no cycle through its traceback)
        if failure is not None:
            raise failure
        return threaded.outcome

    def _thread_call_cancelled(
        self,
        job: Job,
        call: Call,
        threaded: _ThreadedCall,
        then: Callable[[], Awaitable[object]] | None,
    ) -> bool:
        """The wait of :meth:`call_in_thread` was cancelled: settle the call in its thread.

        Returns:
            ``True`` if the cancellation was the call's timeout, which came after its thread had
            ended it: the timeout is taken back (unless someone else cancelled the task too), and
            the call ends as its thread ended it.
        """
        timed_out = job.timed_out and job.current is call and not (job.cut_off or self.closed)
        left: _LeftBehind | None = None
        with threaded.lock:
            state = threaded.state
            if state == _QUEUED:  # not started: it never will (its timeout is reported as usual)
                threaded.state = _GIVEN_UP
            elif state == _RUNNING and timed_out:
                left = _LeftBehind(call)
                if job.sync_left_behind is None:
                    job.sync_left_behind = {}
                # from now on what its thread emits goes with it (as for a sync call left behind)
                job.sync_left_behind[threaded.thread] = left
                threaded.state = _LEFT_BEHIND
        if left is not None or (state == _ENDED and timed_out):
            # what it emitted as the job's (all of it, if it ended first) is in the job's buffer
            # before this task goes on, and maybe ends the job
            self._take_queued()
        if left is not None:
            if then is not None:
                left.then = (then, contextvars.copy_context())
            self._report_past_timeout(job, *call)
            self.left_behind[job, call] = left
            job.current_left = left
            return False
        if state != _ENDED or not timed_out:
            return False
        task = job.task
        assert task is not None
        job.timed_out = False
        job.interrupted = job.cut_off
        job.seen_at = monotonic()  # what the call does next (a clean-up) has a timeout of its own
        task.uncancel()
        return not task.cancelling()

    def _run_threaded(
        self, job: Job, call: Call, attempt: int, threaded: _ThreadedCall, work: Callable[[], Any]
    ) -> Any:
        """Runs in a worker thread: ``work`` for :meth:`call_in_thread`, or its end handed back."""
        if not threaded.start():
            return None
        try:
            result = work()
        except _FATAL as exc:
            if threaded.end(None, exc):
                self._hand_back(job, call, False, None, attempt)
            raise
        except BaseException as exc:  # a handler's BaseException is its own failure
            if not threaded.end(None, exc):
                raise
            self._hand_back(job, call, False, (_raised(*call, exc), exc), attempt)
            return None
        if threaded.end(result, None):
            self._hand_back(job, call, True, None, attempt)
        return result

    def _left_behind_ended(
        self,
        job: Job,
        call: Call,
        succeeded: bool,
        failure: tuple[HandlerError, BaseException] | None,
        attempt: int,
        records: list[Record],
    ) -> None:
        """A call left behind past its timeout has returned, or raised (a failure of its own).

        The events it emitted since are handled, and it is completed in the log only once they
        are recorded (a crash in between must not lose them): by its job if that still runs, else
        by a job of their own.
        """
        left = self.left_behind.get((job, call))
        if left is None:  # the drain bound reported it; it stays in the log
            if failure is not None:
                self._cut_off_call_ended(job, call[0], failure[1])
            if records:
                self.bus.adopt(Job(self.bus, records))  # handled, or logged as dropped when closed
            return
        if succeeded and left.then is not None:  # the rest of the call first; it stays left behind
            self._run_rest(left, job, attempt, records)
            return
        del self.left_behind[job, call]
        left.end(None if failure is None else failure[1], False)
        if failure is not None:
            self.failed(job, call, *failure, attempt)
        completing = succeeded and job.durable
        if job in self.jobs and job.buffer is not None:
            job.buffer.extend(records)
            if completing:
                if job.late_done is None:
                    job.late_done = []
                job.late_done.append(call)
        else:
            late = Job(self.bus, records)
            if records and self.start_job(late, None):
                if completing:
                    assert late.done is not None
                    late.done.append(call)  # completed once the job has recorded its own calls
                self.spawn(late)
            elif completing:
                self._complete_calls([call])
        if self._idle_waiters:
            self._wake_idle_waiters()

    def _run_rest(self, left: _LeftBehind, job: Job, attempt: int, records: list[Record]) -> None:
        """Run what is left of a call left behind whose thread returned, then let it end as it did."""
        assert self.loop is not None
        assert left.then is not None
        then, context = left.then
        left.then = None
        call = left.call
        # What it emits is the call's, as what its thread emitted: recorded before the call is
        # completed (its job has most likely ended: its events would go on by themselves). Kept on
        # `left` meanwhile, for a cut-off to report them with the call.
        emitted = left.rest_scope = Job(self.bus, records)

        async def rest() -> None:
            set_scope(emitted)  # (this task's own copy of the call's context)
            failure: tuple[HandlerError, BaseException] | None = None
            try:
                await then()
            except asyncio.CancelledError as exc:
                if left.ended is not None:
                    # the cut-off's own cancellation: it reported the call unfinished, and took
                    # what it emitted; a handler's failure this is not
                    return
                failure = (_cancelled_error(*call), exc)
            except _FATAL:
                raise
            except BaseException as exc:  # as any failure of the call's own
                failure = (_raised(*call, exc), exc)
            if self.bus._handed_over:  # what its thread pool's threads emitted, not taken yet
                self.bus._take_handed_over()
            later, emitted.buffer = emitted.buffer or [], None  # from now on they go on by themselves
            if self.tracing is not None and later:
                # under the call's span, current here: its job (if it still runs) would give them
                # the context of whichever of its handlers runs when they join it
                later = self.tracing.prepare(later)
            self._left_behind_ended(job, call, failure is None, failure, attempt, later)

        task = left.rest = self.loop.create_task(rest(), context=context)
        self.rests.add(task)
        task.add_done_callback(self.rests.discard)

    # -- timeouts ----------------------------------------------------------------------------------
    def _watch(self) -> None:
        self._watch_handle = None
        try:
            self._check_timeouts()
        finally:  # whatever happened to one job, the others' timeouts are still watched
            if self.jobs and self.loop is not None and not self.loop.is_closed():
                self._watch_handle = self.loop.call_later(self._tick, self._watch)

    def _check_timeouts(self) -> None:
        now = monotonic()
        for job in tuple(self.jobs):
            call = job.current
            if call is not None and not job.timed_out and job.task is not None:
                if call is not job.seen:
                    job.seen, job.seen_at = call, now
                else:
                    timeout = call[0].timeout
                    if timeout is not None and now - job.seen_at > timeout:
                        job.timed_out = job.interrupted = True
                        job.task.cancel()
            sync_call = job.sync_current
            if sync_call is not None and sync_call is not job.sync_reported:
                spec, arg, started, _ = sync_call
                if spec.timeout is not None and now - started > spec.timeout:
                    job.sync_reported = sync_call
                    self._report_past_timeout(job, spec, arg)
                    self._leave_behind(job, sync_call)

    def _report_past_timeout(self, job: Job, spec: HandlerSpec, arg: Any) -> None:
        """Report a plain def call past its timeout, left to run on in its thread: not its outcome."""
        message = (
            f"handler {spec.name} has run past its timeout of {spec.timeout}s; a plain "
            "def handler cannot be interrupted, so it keeps its worker thread until it "
            "returns, and the other handlers go on without it"
        )
        error = HandlerTimeoutError(message, events=_events_of(spec, arg), handler=spec.name)
        error.attempt = job.attempt
        self.report(error, None)
        if job.errors is not None:  # emit_now's caller hears of it too
            job.errors.append(error)
        if job.failed is not None:  # a replay's caller: it did not succeed in time
            job.failed.append((spec, arg))

    # -- reporting ---------------------------------------------------------------------------------
    def report(self, error: HandlerError, cause: BaseException | None) -> None:
        """Log a failed call with its traceback and pass it to the failure hook."""
        if cause is not None:
            error.__cause__ = cause
        event = error.event
        if error.retry_in is not None:
            outcome = f"; attempt {error.attempt}, retrying in {error.retry_in:.3g}s"
        elif error.dead_letters:
            outcome = f"; attempt {error.attempt}, now a dead letter"
        else:
            outcome = ""
        logger.error(
            "%s (event %r, id %s)%s",
            error,
            event.name,
            event.id,
            outcome,
            exc_info=cause if cause is not None else False,
            extra=fields(event.name, event.id, error.handler),
        )
        hook = self.on_failure
        if hook is not None:
            try:
                result = hook(error)
                if inspect.isawaitable(result):
                    self._await_hook(result, error)
            except _FATAL:
                raise
            except BaseException as exc:  # like a handler's: never into the job, the watchdog, the server
                self._hook_failed(exc, error)

    def _hook_failed(self, exc: BaseException, error: HandlerError) -> None:
        event = error.event
        logger.error(
            "the on_failure hook raised while reporting %s (event %r, id %s)",
            error,
            event.name,
            event.id,
            exc_info=exc,
            extra=fields(event.name, event.id, error.handler),
        )

    def _await_hook(self, result: Awaitable[object], error: HandlerError) -> None:
        """Run an ``async def`` failure hook's call as a task of the bus (drain waits for it)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            if inspect.iscoroutine(result):
                result.close()  # never to run: no "never awaited" warning on top of this error
            logger.error("the on_failure hook for %s could not run: the event loop has closed", error)
            return
        if get_ident() != self.bus.loop_thread:  # a report made by a worker thread
            loop.call_soon_threadsafe(self._await_hook, result, error)
            return

        async def run() -> None:
            try:
                await result
            except _FATAL:
                raise
            except asyncio.CancelledError:
                logger.error("the on_failure hook was cancelled while reporting %s", error)
            except BaseException as exc:
                self._hook_failed(exc, error)

        task = loop.create_task(run(), context=contextvars.Context())
        self.hook_tasks.add(task)
        task.add_done_callback(self._hook_ended)

    def _hook_ended(self, task: asyncio.Task[None]) -> None:
        self.hook_tasks.discard(task)
        self._hooks_overdue.discard(task)

    def _cancelled(self, job: Job) -> None:
        pending = job.take_over(self.registry.resolve)
        if not pending:
            return
        logger.error(
            "a handler job was cancelled with %d call(s) unfinished: %s",
            len(pending),
            ", ".join(f"{p.handler} <- {p.event.name} ({p.event.id})" for p in pending),
        )
        self.report_unfinished(pending, "its job was cancelled")

    def report_unfinished(self, pending: Iterable[PendingDelivery], why: str) -> None:
        """Report each call that will not finish to the failure hook (and the log).

        A committed outbox event among them that no job had taken yet is no longer this bus's to
        run: its lease is not renewed any more, so that once it runs out the log hands it to a
        relay again (this bus's, while it runs), rather than it waiting for the process to stop.
        """
        released = self.released
        for item in pending:
            if released:
                released.pop(item.event.id, None)
            message = f"handler {item.handler} did not finish: {why}"
            self.report(HandlerCancelledError(message, events=[item.event], handler=item.handler), None)

    async def keep_unfinished(self, pending: Sequence[PendingDelivery]) -> None:
        """With a durable log: write the cut-off calls it does not hold yet, to run after the next start.

        A job cut off before it wrote its deliveries (a drain with no time left), and events
        accepted but not taken by a job yet, were reported unfinished; the log is to keep what the
        drain bound cut off, so they go into it too. A delivery the log holds already is left as it
        is (its attempts, lease and status). Bounded by :data:`KEEP_BOUND` seconds.
        """
        pending = [*self.unkept, *pending]
        self.unkept.clear()
        if not self.durable or not pending:
            return
        deliveries = [(item.event, item.handler) for item in pending]
        try:
            refused = await asyncio.wait_for(self.store.record(deliveries, lease=self.lease), KEEP_BOUND)
        except Exception as exc:  # the log's failure (or it took too long): they were reported unfinished
            if isinstance(exc, TimeoutError):
                exc = StoreError(f"the event log did not answer within {KEEP_BOUND}s")
            _store_failed(
                exc,
                "keep the cut-off deliveries",
                [(event.id, handler) for event, handler in deliveries],
                "they were reported unfinished, and may not run after the next start",
            )
            return
        _log_refused(refused, deliveries, "it was cut off and is not kept for the next start")

    def in_flight(self) -> list[tuple[str, str]]:
        """(event id, handler) of every delivery of a durable job or retry not finished yet."""
        resolve = self.registry.resolve
        pairs = [
            (item.event.id, item.handler)
            for job in self.jobs
            if job.durable
            for item in job.unfinished(resolve)
        ]
        for job in self.jobs:  # finished, not yet completed in the log (it waits for its siblings)
            for calls in (job.done, job.sync_done, job.late_done):
                if calls:
                    pairs.extend((event.id, name) for event, name in deliveries_of(list(calls)))
        # committed by the outbox, waiting for a response; list(): a session committed in another
        # thread adds to it meanwhile (copying is one step under the GIL, iterating is not)
        for event in list(self.released.values()):
            pairs.extend((event.id, spec.name) for spec in resolve(event.name))
        for retry in self.retries:
            spec, arg = retry.call
            pairs.extend((event.id, spec.name) for event in _events_of(spec, arg))
        for job, (spec, arg) in self.left_behind:  # run on: not to be taken over meanwhile
            if job.durable:
                pairs.extend((event.id, spec.name) for event in _events_of(spec, arg))
        return pairs

    # -- drain -------------------------------------------------------------------------------------
    def idle(self, until: float = 0.0) -> bool:
        """Whether no job runs other than the caller's own, no call left behind past its timeout
        runs on (but the caller's own: the rest of one is part of it), and no retry is due by
        ``until``."""
        current = asyncio.current_task()
        return (
            all(job.task is current for job in self.jobs)
            and all(left.rest is current for left in self.left_behind.values())
            and all(r.due > until for r in self.retries)
        )

    async def wait_hooks(self, until: float) -> bool:
        """Wait until the calls of an async failure hook running now have ended, or ``until``.

        Not from a job, the rest of a call left behind or a hook call itself: a hook may wait for
        the job or the call (a drain of its own), and would wait for itself.
        """
        current = asyncio.current_task()
        if (
            current in self.hook_tasks
            or current in self.rests
            or any(job.task is current for job in self.jobs)
        ):
            return True
        tasks = set(self.hook_tasks)
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, until - monotonic()))
        overdue = pending - self._hooks_overdue  # each named once, though drains follow each other
        self._hooks_overdue |= overdue
        if overdue:
            logger.error(
                "bus %r: %d call(s) of the on_failure hook still running when the drain bound ran "
                "out; they go on while the event loop runs",
                self.bus.name,
                len(overdue),
            )
        return not pending

    async def wait_idle(self, until: float) -> bool:
        """Wait until :meth:`idle` (retries due by ``until`` included) or ``until`` (monotonic)."""
        assert self.loop is not None
        while not self.idle(until):
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

    def cut_off(self) -> list[PendingDelivery]:
        """Take every job and call left behind off (but the caller's own): list its unfinished
        calls, then cancel it.

        The list is made here, before any cancellation runs, so it holds the calls of jobs whose
        task never started and of handlers that swallow cancellation as well.
        """
        current = asyncio.current_task()
        pending: list[PendingDelivery] = []
        for job in tuple(self.jobs):
            if job.task is current:
                continue
            pending.extend(job.take_over(self.registry.resolve))
            self.jobs.discard(job)
            if job.task is not None:
                job.task.cancel()
                job.task.add_done_callback(functools.partial(self._taken_over_task_ended, job))
        resolve = self.registry.resolve
        # past their timeouts, running on; and what they emitted meanwhile (from now on what they
        # emit goes the usual way). Not the call whose rest drains: it runs on, as the caller's job would.
        closed = [
            (key, left, left.close()) for key, left in self.left_behind.items() if left.rest is not current
        ]
        # read once they are closed: a thread that took its call's events first passed them on
        ends = self.ends_on_their_way()
        for key, left, records in closed:
            spec, arg = left.call
            pending.extend(PendingDelivery(event, spec.name) for event in _events_of(spec, arg))
            left.end(None, True)
            passed = ends.get(key)
            if passed:  # its thread returned, its end not taken yet: which is to hand nothing on
                records += passed
                passed.clear()
            rest, scope = left.rest, left.rest_scope
            if rest is not None and scope is not None:
                # its thread returned and the rest of the call runs on the loop: unlike the
                # thread, that can be stopped, as the jobs are
                records += scope.buffer or ()
                scope.buffer = None
                rest.cancel()
            for record in records:
                event = make_event(record)
                pending.extend(PendingDelivery(event, handler.name) for handler in resolve(event.name))
            del self.left_behind[key]
        return pending

    def ends_on_their_way(self) -> dict[tuple[Job, Call], list[Record]]:
        """The calls left behind whose threads passed their ends to the loop, which has not taken
        them yet: with what each emitted since it was left behind (the list its end hands on)."""
        return {
            (args[0], args[1]): args[-1]
            for callback, args in list(self.in_transit.values())  # (copied at once: threads add to it)
            if callback == self._left_behind_ended
        }

    def _taken_over_task_ended(self, job: Job, task: asyncio.Task[Any]) -> None:
        """Do what ``run_job``'s end does, for a job whose task was cancelled before it ran."""
        if job.buffer is None:  # run_job's end did it
            return
        leftovers, job.buffer = job.buffer[job.reported_buffer :], None  # later emits go on by themselves
        if leftovers:
            self.report_unfinished(
                Job(job.bus, leftovers).unfinished(self.registry.resolve), "the drain bound ran out"
            )
        if job.record_waiters:
            _wake(job.record_waiters)

    def _wake_idle_waiters(self) -> None:
        _wake(self._idle_waiters)
