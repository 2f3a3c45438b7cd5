"""The event bus: handler registry, emit entry points and lifecycle."""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import enum
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from time import monotonic, time_ns
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ..exceptions import (
    BusStateError,
    ConfigurationError,
    DrainTimeoutError,
    HandlerCancelledError,
    HandlerError,
    PendingDelivery,
    StoreError,
)
from ..store.memory import MemoryStore
from ..store.url import store_from_url
from .dead_letters import DeadLetters
from .dispatcher import (
    Record,
    Scope,
    current_scope,
    emit_disabled_by_env,
    live_buses,
    normalize_name,
    register_running,
    running_buses,
    unregister_running,
)
from .envelope import EMPTY_HEADERS, Arguments, Event, Prebuilt
from .logs import fields
from .policies import NO_RETRY, Limits, RequestErrorPolicy, RequestHandlerMode, RetryPolicy, is_seconds
from .registry import HandlerSpec, Registry, is_pattern
from .runner import FailureHook, Job, Runner, _events_of, make_event, task_of
from .schemas import Schema, SchemaRegistry, event_name_of, is_event_class

if TYPE_CHECKING:
    from types import TracebackType

    from opentelemetry.trace import TracerProvider

    from ..integrations.opentelemetry import Tracing
    from ..store.base import Store
    from .binding import BindingStyle, Plan

__all__ = ["BusState", "EventBus"]

logger = logging.getLogger("tidings")

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
ClassT = TypeVar("ClassT", bound=type)


class _Default(enum.Enum):
    DEFAULT = "DEFAULT"


DEFAULT: Final = _Default.DEFAULT
_CLAIM_BATCH: Final = 500  # deliveries the relay takes from the log at once
_TAPS_POLL: Final = 0.002  # how often drain and settle look whether a thread's emit left its taps


def _require_opentelemetry() -> None:
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError('tracing needs OpenTelemetry: pip install "tidings[otel]"') from exc


def _configured_tracer_provider() -> TracerProvider | None:
    """The global tracer provider if the app set a real one; never imports OpenTelemetry itself.

    An app that set a provider has imported ``opentelemetry.trace``; so has one whose provider
    comes from ``OTEL_PYTHON_TRACER_PROVIDER`` once anything asked for it (we ask, then).
    """
    trace: Any = sys.modules.get("opentelemetry.trace")
    if trace is None:
        if "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ:
            return None
        try:
            import opentelemetry.trace as trace
        except ImportError:
            return None
    provider: TracerProvider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None  # nothing set: spans would go nowhere
    return provider


def _app_is_up() -> bool:
    """Whether an app seems to be running: this thread runs an event loop, or some bus runs."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return bool(live_buses())  # a sync endpoint's worker thread, say
    return True


def _consume_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # logged where it was raised


def _report_running_at_exit() -> None:
    """At interpreter exit: log what each bus still running (never closed) leaves unfinished.

    No drain ran for it (no lifespan shutdown, no ``async with bus``, no ``aclose()``): its jobs,
    retries and queued events end with the process. They are lost (those a durable log holds run
    after the next start), but not in silence.
    """
    for bus in running_buses():
        try:
            pending = bus._pending_work()
        except RuntimeError:  # its loop's thread (still running, a daemon) changed it as we read
            pending = ["(its work could not be listed: its event loop was still running)"]
        if pending:
            where = (
                "those the event log holds run after the next start" if bus.store.durable else "they are lost"
            )
            logger.error(
                "bus %r was still running when the process exited (it was never closed: use the app's "
                "lifespan, `async with bus:` or `await bus.aclose()`), so %d call(s) never finished; %s: %s",
                bus.name,
                len(pending),
                where,
                ", ".join(pending[:_LISTED_AT_EXIT]) + (", ..." if len(pending) > _LISTED_AT_EXIT else ""),
            )


_LISTED_AT_EXIT: Final = 50
atexit.register(_report_running_at_exit)


class BusState(enum.Enum):
    """Where a bus is in its life."""

    CREATED = "created"  # built, not started: events emitted now wait for start()
    RUNNING = "running"  # handling events
    DRAINING = "draining"  # shutting down: still handles what is emitted (chains included)
    CLOSED = "closed"  # stopped: events emitted now are logged and dropped; start() runs it again


class EventBus:
    """Handlers, and the machinery that runs them after the response.

    One bus per app. Register handlers with :meth:`on`, add
    :class:`~tidings.asgi.TidingsMiddleware` to the app, and the app's lifespan starts and drains
    the bus. Outside an app (scripts, tests), use ``async with bus:``.

    Args:
        handler_timeout: default seconds one handler call may take (``None``: no limit).
        drain_timeout: seconds shutdown waits for pending handler work before it gives up and
            reports what was left.
        limits: concurrency bounds, see :class:`~tidings.Limits`.
        request_errors: what to do with a request's events when the endpoint raises, see
            :data:`~tidings.RequestErrorPolicy`.
        request_handlers: where a request's handlers run after its response, ``"inline"`` in the
            request's task (fastest) or ``"task"`` in a bus task (bounded by ``drain_timeout`` at
            shutdown under any server), see :data:`~tidings.RequestHandlerMode`.
        on_failure: called with a :class:`~tidings.HandlerError` for every failed attempt of a
            handler call (raised, timed out, cancelled) and for every call drain had to cut off;
            one that made dead letters carries them in ``.dead_letters``. They are logged either way.
            It may be ``async def``: each call then runs as a task of the bus, and drain waits for it.
            What the hook raises is logged, never passed on.
        retry: the default :class:`~tidings.RetryPolicy` of handlers registered without one; by
            default a failed call is not retried and becomes a dead letter at once.
        store: where dead letters (and, if the store is durable, every delivery) are kept: a
            :class:`~tidings.store.MemoryStore` by default, or a
            :class:`~tidings.store.SQLiteStore` for a log that survives crashes; or a URL for one
            (``"sqlite:///events.db"``, ``"postgresql://app@db/app?schema=events"``, see
            :func:`~tidings.store.store_from_url`).
        resubmit_after: with a durable store, the seconds a delivery stays leased to the process
            working on it (the lease is renewed while it runs); a delivery whose lease ran out,
            because its process died, is run again by any bus on the same log. Keep it above
            ``drain_timeout`` and the longest wait you expect between two attempts.
        enabled: ``False`` turns every emit into a no-op. The default is ``True`` unless the
            ``TIDINGS_DISABLE_EMIT`` environment variable is truthy.
        tracing: OpenTelemetry spans around handler runs, linked to the request (or handler) that
            emitted the event, and the trace context in event headers (see
            :mod:`tidings.integrations.opentelemetry`). ``None`` (the default) traces when the
            app has set a real tracer provider (an SDK one) globally by the time the bus starts,
            or by the end of the app's startup code under the middleware's lifespan; ``True``
            traces with the global provider, even one set later; a ``TracerProvider`` traces with
            that one; ``False`` never traces. Whether to trace is decided once, at start: with
            tracing off, emits and handler calls do no tracing work at all, and OpenTelemetry is
            not imported. Needs the ``otel`` extra.
        name: shown in logs; defaults to ``"tidings"``.

    Example:
        >>> from tidings import Event, EventBus
        >>> bus = EventBus()
        >>> @bus.on("user.created")
        ... async def send_welcome(event: Event) -> None:
        ...     print("welcome", event.payload["email"])
    """

    def __init__(
        self,
        *,
        handler_timeout: float | None = 30.0,
        drain_timeout: float = 10.0,
        limits: Limits | None = None,
        request_errors: RequestErrorPolicy = "deliver",
        request_handlers: RequestHandlerMode = "inline",
        on_failure: FailureHook | None = None,
        retry: RetryPolicy = NO_RETRY,
        store: Store | str | None = None,
        resubmit_after: float = 60.0,
        enabled: bool | None = None,
        tracing: bool | TracerProvider | None = None,
        name: str = "tidings",
    ) -> None:
        if handler_timeout is not None and not (is_seconds(handler_timeout) and handler_timeout > 0):
            raise ConfigurationError(f"handler_timeout must be seconds > 0 or None, got {handler_timeout!r}")
        if not (is_seconds(drain_timeout) and drain_timeout >= 0):
            raise ConfigurationError(f"drain_timeout must be seconds >= 0, got {drain_timeout!r}")
        if limits is not None and not isinstance(limits, Limits):
            raise ConfigurationError(f"limits must be a Limits(...), got {limits!r}")
        if on_failure is not None and not callable(on_failure):
            raise ConfigurationError(f"on_failure must be a function (or None), got {on_failure!r}")
        if enabled is not None and not isinstance(enabled, bool):
            raise ConfigurationError(f"enabled must be True, False or None, got {enabled!r}")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty str, got {name!r}")
        if request_errors not in ("drop", "deliver"):
            raise ConfigurationError(f"request_errors must be 'drop' or 'deliver', got {request_errors!r}")
        self.name = name
        self.handler_timeout = handler_timeout
        self.drain_timeout = drain_timeout
        if request_handlers not in ("inline", "task"):
            raise ConfigurationError(f"request_handlers must be 'inline' or 'task', got {request_handlers!r}")
        self.request_errors: RequestErrorPolicy = request_errors
        self.request_handlers: RequestHandlerMode = request_handlers
        self.request_handlers_inline = request_handlers == "inline"
        # started by a request, with no lifespan: nothing drains a bus task before the loop closes
        self.started_lazily = False
        if not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        if not (is_seconds(resubmit_after) and resubmit_after > 0):
            raise ConfigurationError(f"resubmit_after must be > 0 seconds, got {resubmit_after!r}")
        self.enabled = (not emit_disabled_by_env()) if enabled is None else enabled
        if tracing is not None and not isinstance(tracing, bool) and not hasattr(tracing, "get_tracer"):
            raise ConfigurationError(
                f"tracing must be True, False, None or an OpenTelemetry TracerProvider, got {tracing!r}"
            )
        if tracing is not None and tracing is not False:
            _require_opentelemetry()
        self._tracing_setting = tracing
        self.tracing: Tracing | None = None
        """The bus's OpenTelemetry instrumentation while it traces, else ``None`` (set at start)."""
        self.limits = limits or Limits()
        self.retry = retry
        if isinstance(store, str):
            store = store_from_url(store)
        elif store is not None and not all(hasattr(store, part) for part in ("durable", "record", "claim")):
            raise ConfigurationError(
                f"store must be a store (SQLiteStore(...), say), a store URL or None, got {store!r}"
            )
        self.store: Store = MemoryStore() if store is None else store
        self.resubmit_after = float(resubmit_after)
        self._registry = Registry()
        self.schemas = SchemaRegistry()
        """The event classes this bus validates payloads against, by event name (see :meth:`schema`)."""
        self.schema_names: dict[str, Schema] = self.schemas.by_name
        self._taps: list[Callable[[Event], object]] = []
        self._inspects_emits = False
        self.app: Any = None
        """The ASGI app the bus serves (set by the middleware, for its lifespan or else by the first
        request; FastAPI dependencies in handlers use its overrides)."""
        self.lifespan_state: dict[str, Any] | None = None
        """The state the running app's lifespan yielded, ``None`` once it ended (``request.state``
        of handlers' FastAPI dependencies)."""
        self._runner = Runner(self, self._registry, self.limits, on_failure, self.store, self.resubmit_after)
        self.dead_letters = DeadLetters(self, self._runner)
        """The dead letters: list, inspect, replay and purge them (see :class:`DeadLetters`)."""
        self._opening: asyncio.Task[None] | None = None
        self._resubmit = True
        self._relay_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.serving_loop: asyncio.AbstractEventLoop | None = None  # the loop while RUNNING
        self._state = BusState.CREATED
        self.loop_thread = 0
        # tidings.emit() appends to a request's buffer itself only on this thread: the loop's,
        # or none (0) while schemas or taps need every emit to pass through EventBus.emit. One
        # comparison serves both checks on the hot path.
        self.emit_thread = 0
        self._lock = threading.Lock()
        self._outside: list[Record] = []
        self._outside_scheduled = False
        # Events other threads emitted, for the loop to take (into a scope's buffer, or as outside
        # events), under _lock. Kept here rather than in callbacks: a callback queued on a loop
        # that stops before running it is discarded with the loop, and its event with it.
        self._handed_over: list[tuple[Scope | None, Record]] = []
        self._hand_over_scheduled = False
        self._emits_under_way = 0  # tapped emits between their taps and their routing (any thread)
        self._told_not_started = False  # the warning that events wait for a start nobody made, given
        self._drain_deadline: float | None = None
        self._closing: asyncio.Future[None] | None = None  # done when the aclose() under way returns
        # The scope of contexts where events skip buffering: lifespan, websockets, disabled bus.
        self.direct_scope = Scope(self, None)
        # The middleware's per-request call, bound once (an extra call layer costs per request):
        # run_job(job, task) sorts a finished request's events and runs them in the
        # request's own task. request_job(job) -> bool does only the sorting (False: nobody
        # handles them), for a job then run by run_job(job).
        self.request_job = self._runner.request_job
        self.run_job = self._runner.run_job

    @property
    def _state(self) -> BusState:
        return self._state_value

    @_state.setter
    def _state(self, state: BusState) -> None:
        # Reading an Enum member costs as much as the rest of a request's check: ensure_running()
        # reads the loop kept here instead.
        self._state_value = state
        self.serving_loop = self._loop if state is BusState.RUNNING else None

    # -- registration ------------------------------------------------------------------------------
    def on(
        self,
        *patterns: str | type,
        timeout: float | _Default | None = DEFAULT,
        batch: bool = False,
        retry: RetryPolicy | None = None,
        name: str | None = None,
        bind: BindingStyle = "auto",
    ) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function for one or more event names, wildcard patterns or classes.

        ``async def`` handlers run on the event loop; plain ``def`` handlers run in a worker thread.
        The function is returned unchanged, so it can still be called directly.

        The handler gets what its parameters ask for: the :class:`~tidings.Event` (a parameter
        annotated ``Event``, or a lone unannotated one), the typed payload (a parameter annotated
        with the event's class), single fields of the payload (parameters named after them), the
        arguments of an event emitted with several, or FastAPI dependencies (``Depends``). A
        signature the events cannot satisfy fails here, not at the first event.

        Args:
            *patterns: exact names (``"user.created"``), shell-style wildcards (``"user.*"``,
                ``"*"``), or typed event classes (Pydantic models, dataclasses; registering one
                registers its schema too).
            timeout: seconds one call (one attempt) may take; defaults to the retry policy's
                ``attempt_timeout`` if it has one, else the bus's ``handler_timeout``.
            batch: the handler takes a list of every matching event of one job at once (and
                may not declare FastAPI dependencies: they are solved for one event at a time).
            retry: when a failed call is tried again; defaults to the bus's ``retry``.
            name: the name logs, the event log and dead letters use for the handler; defaults
                to its module and qualified name. Give one to keep dead letters and logged
                deliveries valid across a rename.
            bind: ``"arguments"`` makes every parameter not annotated ``Event`` an argument of
                the emit (``emit_now("paid", order_id, amount)``), even a lone unannotated one.

        Raises:
            ConfigurationError: no pattern given, an invalid pattern, timeout or retry policy, a
                name another handler has, or a signature the events cannot satisfy.

        Example:
            >>> from dataclasses import dataclass
            >>> from tidings import Event, EventBus
            >>> bus = EventBus()
            >>> @bus.on("user.*", "order.placed", timeout=5)
            ... def audit(event: Event) -> None: ...
            >>> @dataclass
            ... class UserCreated:
            ...     __event_name__ = "user.created"
            ...     email: str
            >>> @bus.on(UserCreated)
            ... async def welcome(user: UserCreated) -> None: ...
            >>> @bus.on(UserCreated)
            ... async def count_domain(email: str) -> None: ...  # just the field it needs
        """

        def decorator(handler: HandlerT) -> HandlerT:
            self.subscribe(
                handler, *patterns, timeout=timeout, batch=batch, retry=retry, name=name, bind=bind
            )
            return handler

        return decorator

    def subscribe(
        self,
        handler: object,
        *patterns: str | type,
        timeout: float | _Default | None = DEFAULT,
        batch: bool = False,
        retry: RetryPolicy | None = None,
        name: str | None = None,
        bind: BindingStyle = "auto",
    ) -> HandlerSpec:
        """Register ``handler`` (a function, an async callable, or an object) for ``patterns``.

        An object with a ``handle_many(events)`` method receives every matching event of one job in
        one call (one request per batch for a forwarder); one with only ``handle(event)`` receives
        them one by one.

        The other arguments are those of :meth:`on`.

        Returns:
            The resolved handler description.

        Raises:
            ConfigurationError: no pattern given, an invalid pattern, timeout or retry policy, a
                handler that cannot be called, a name another handler has, or FastAPI
                dependencies on an object's ``handle``/``handle_many`` (nothing solves those).
        """
        if not patterns:
            raise ConfigurationError("a handler needs at least one event name or pattern")
        if bind not in ("auto", "arguments"):
            raise ConfigurationError(f"bind must be 'auto' or 'arguments', got {bind!r}")
        names: list[str] = []
        schemas: list[Schema] = []
        classes: list[type] = []
        for pattern in patterns:
            if isinstance(pattern, type):
                if not is_event_class(pattern):
                    raise ConfigurationError(
                        f"an event class must be a Pydantic model or a dataclass, got {pattern!r}"
                    )
                classes.append(pattern)
                pattern = self.schemas.name_for(pattern)
                existing = self.schemas.get(pattern)
                if existing is not None and existing.cls is not classes[-1]:
                    raise ConfigurationError(
                        f"event {pattern!r} has the schema {existing.cls.__qualname__} already; "
                        f"{classes[-1].__qualname__} needs a name of its own (set __event_name__)"
                    )
                schemas.append(existing or Schema(classes[-1], pattern))
            elif isinstance(pattern, str) and pattern and not is_pattern(pattern):
                known = self.schemas.get(pattern)
                if known is not None:
                    schemas.append(known)
            names.append(pattern)  # a bad one is refused by the registry
        policy = self.retry if retry is None else retry
        if timeout is not DEFAULT:
            effective = timeout
        elif isinstance(policy, RetryPolicy) and policy.attempt_timeout is not None:
            effective = policy.attempt_timeout
        else:
            effective = self.handler_timeout
        spec = HandlerSpec.from_target(
            handler,
            batch=batch,
            timeout=effective,
            retry=policy,
            name=name,
            schemas=schemas,
            style=bind,
            dependencies=self._dependency_call,
        )
        registered, schemas_before = self._registry.snapshot(), self.schemas.snapshot()
        try:
            for cls in classes:
                self.schema(cls)  # checks (or plans again) the handlers registered by its name before
            for pattern in names:
                self._registry.add(pattern, spec)
            # another decorator on the same handler may have met a schema this one did not (or
            # this one one that it did not): the handler's registrations must agree on what it is given
            for old, new in self._replanned(spec.name).items():
                self._registry.replace(old, new)
                if old is spec:
                    spec = new
        except BaseException:
            # refused: as if it had never been asked for (no registration, no schema of its classes)
            self._registry.restore(registered)
            self.schemas.restore(schemas_before)
            raise
        if classes:
            self.inspects_emits = True  # every emit under a typed name is validated, fast path included
        self._runner.timeouts_changed(s.handler.timeout for s in self._registry)
        return spec

    def _dependency_call(self, plan: Plan) -> Callable[[Any], Any]:
        from ..integrations.fastapi import dependency_call  # only handlers with Depends need FastAPI

        return dependency_call(plan, self)

    def schema(self, cls: ClassT | None = None, *, name: str | None = None) -> Any:
        """Register an event class: payloads emitted under its name must fit it.

        Use it as a decorator (``@bus.schema`` or ``@bus.schema(name="user.signed_up")``) or call
        it (``bus.schema(SignUp, name="user.signed_up")``). The name defaults to the class's
        ``__event_name__``, else its ``__name__``. From then on a ``dict`` emitted under the name
        is validated into an instance of the class when it is emitted, in the caller's code, and
        handlers receive the instance; a payload that does not fit raises
        :class:`~tidings.EventValidationError` there, naming the event and the field. An instance
        emitted as a typed event (``bus.emit(SignUp(...))``) goes by the first name its class was
        registered under: registering the class under a second name adds a schema for that name,
        not a new name for its instances.

        Returns:
            The class, unchanged (so it works as a decorator).

        Raises:
            ConfigurationError: not a Pydantic model or dataclass, the name has another class
                already, or a handler registered for the name asks for what the class lacks.

        Example:
            >>> from dataclasses import dataclass
            >>> from tidings import EventBus
            >>> bus = EventBus()
            >>> @bus.schema(name="user.signed_up")
            ... @dataclass
            ... class SignUp:
            ...     user_id: int
            ...     email: str
        """
        if cls is None:
            return lambda target: self.schema(target, name=name)
        if not is_event_class(cls):
            raise ConfigurationError(f"an event schema must be a Pydantic model or a dataclass, got {cls!r}")
        event_name = self.schemas.name_for(cls) if name is None else name
        if self.schemas.get(event_name) is not None:
            self.schemas.add(cls, event_name)  # the same class again: a no-op; another: refused
            return cls
        candidate = Schema(cls, event_name)
        names: set[str] = set()
        for subscription in self._registry:
            if subscription.pattern == event_name and subscription.handler.plan is not None:
                subscription.handler.plan.check(candidate)  # a guessed envelope passes: see below
                names.add(subscription.handler.name)
        replanned: dict[HandlerSpec, HandlerSpec] = {}
        for handler_name in names:
            replanned.update(self._replanned(handler_name, candidate))
        self.schemas.add(cls, event_name)
        for old, new in replanned.items():
            self._registry.replace(old, new)
        self.inspects_emits = True
        return cls

    def _replanned(self, handler_name: str, extra: Schema | None = None) -> dict[HandlerSpec, HandlerSpec]:
        """The registrations of a handler to plan again, each with its new plan.

        ``def welcome(email)`` registered for a name with no schema (yet) takes ``email`` for the
        envelope. Once one of the handler's event names has a schema with an ``email`` field,
        ``email`` is that field: every registration of the handler (one per decorator) is planned
        again with the schemas of all of its event names (and ``extra``, about to be registered),
        so it gets the same arguments whichever event it runs for, live or replayed from the log.
        """
        specs = {s.handler for s in self._registry if s.handler.name == handler_name}
        schemas = [] if extra is None else [extra]
        for subscription in self._registry:
            plan = subscription.handler.plan
            # a batch registration gets lists, a bind="arguments" one the emit's arguments: the
            # fields of their events' schemas are nothing the handler's parameters are given
            if subscription.handler in specs and plan is not None and plan.style == "auto":
                known = self.schemas.get(subscription.pattern)
                if known is not None and all(known.name != other.name for other in schemas):
                    schemas.append(known)
        replanned: dict[HandlerSpec, HandlerSpec] = {}
        for spec in specs:
            plan = spec.plan  # None: a batch registration, which gets the list of events as it is
            if plan is None or not plan.guessed_envelope:
                continue
            if any(plan.params[0].name in schema.fields for schema in schemas):
                replanned[spec] = HandlerSpec.from_target(
                    spec.target,
                    batch=spec.batch,
                    timeout=spec.timeout,
                    retry=spec.retry,
                    name=spec.name,
                    schemas=schemas,
                    style=plan.style,
                    dependencies=self._dependency_call,
                )
        return replanned

    @property
    def inspects_emits(self) -> bool:
        """Whether every emit passes through :meth:`emit` (a schema or a tap needs to see it)."""
        return self._inspects_emits

    @inspects_emits.setter
    def inspects_emits(self, value: bool) -> None:
        self._inspects_emits = value
        self._choose_emit_path()

    def _choose_emit_path(self) -> None:
        """Let :func:`tidings.emit` append to this bus's buffers itself, or send it through :meth:`emit`.

        Its fast path skips :meth:`emit` on the loop's thread. A schema or a tap must see every
        emit, and tracing must see which task emits (:meth:`_route`): then every emit goes through.
        """
        through = self._inspects_emits or self.tracing is not None
        self.emit_thread = 0 if through else self.loop_thread

    def tap(self, callback: Callable[[Event], object]) -> Callable[[], None]:
        """Call ``callback`` with every event emitted on this bus, when it is emitted.

        For tests and debugging (the pytest plugin captures events with it): the callback runs
        in the emitting code, before any handler, on every emit, including events that no
        handler listens to, events emitted in a request that will fail, and events of the
        transactional outbox when they are released. Its exceptions are logged, never raised
        into the emitter. The :class:`~tidings.Event` it gets has the name, payload (validated)
        and headers of the emit; handlers get an envelope of their own, with an id of its own.

        Returns:
            A function that removes the tap.

        Example:
            >>> from tidings import EventBus
            >>> bus = EventBus()
            >>> seen = []
            >>> untap = bus.tap(seen.append)
            >>> bus.emit("user.created", {"id": 1})
            >>> [(event.name, event.payload) for event in seen]
            [('user.created', {'id': 1})]
            >>> untap()
        """
        self._taps.append(callback)
        self.inspects_emits = True

        def untap() -> None:
            if callback in self._taps:
                self._taps.remove(callback)
            self.inspects_emits = bool(self._taps or self.schema_names)

        return untap

    def _route_tapped(self, record: Record, event: Event) -> None:
        """Notify the taps (before any handler runs), then route; the event waits meanwhile.

        A test that saw the event captured and then settles the bus must find its handler work
        pending, although another thread may still be on its way from the taps to the loop.
        """
        with self._lock:
            self._emits_under_way += 1
        try:
            self._notify_taps(event)
            self._route(record)
        finally:
            with self._lock:
                self._emits_under_way -= 1

    def _notify_taps(self, event: Event) -> None:
        for callback in tuple(self._taps):
            try:
                callback(event)
            except Exception:
                logger.exception(
                    "a tap of bus %r raised on event %r (id %s)",
                    self.name,
                    event.name,
                    event.id,
                    extra=fields(event.name, event.id),
                )

    @property
    def registry(self) -> Registry:
        """The handler registry (read it to list handlers; register through :meth:`on`)."""
        return self._registry

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the bus serves, or last served (``None`` before its first start)."""
        return self._loop

    def loop_is_open(self) -> bool:
        """Whether the bus is bound to an event loop that has not been closed."""
        loop = self._loop
        return loop is not None and not loop.is_closed()

    @property
    def state(self) -> BusState:
        """The bus's lifecycle state."""
        return self._state

    # -- emitting ----------------------------------------------------------------------------------
    def emit(
        self, event: object, payload: object = None, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Emit an event on this bus. Safe from any thread and any context.

        Inside a request served by this bus the event is buffered until the response is sent, as
        with :func:`tidings.emit`; elsewhere it is handed to the bus's runner. Before the bus starts,
        events wait and run when it starts (the first one emitted on a running event loop logs a
        warning: an app is up, and this bus may have nothing to start it); after it has closed they
        are logged and dropped.

        Args:
            event: the event name (a ``str``, or an ``Enum`` with ``str`` values), or a typed
                event: an instance of a Pydantic model or dataclass, named after its class.
            payload: anything; handlers receive it as ``event.payload``. A ``dict`` emitted under
                a name with a schema (:meth:`schema`) is validated into an instance of it.
            headers: metadata for the event envelope (not part of the payload).

        Raises:
            TypeError: ``event`` is not a name or a typed event, or a typed event came with a payload.
            EventValidationError: the payload does not fit the schema registered for the name.
        """
        if type(event) is not str:
            event, payload = self.name_and_payload(event, payload, self.schemas.names)
        if not self.enabled:
            return
        if self.schema_names:
            schema = self.schema_names.get(event)
            if schema is not None:
                payload = schema.coerce(payload)
        if headers:
            # read-only, as documented, and the caller's own dict stays the caller's: neither a
            # handler nor the caller, changing it later, changes what the other handlers see
            headers = MappingProxyType(dict(headers))
        timestamp_ns = time_ns()
        if self._taps:
            self._route_tapped(
                (event, payload, timestamp_ns, headers),
                Event(event, payload, headers or EMPTY_HEADERS, timestamp_ns),
            )
            return
        self._route((event, payload, timestamp_ns, headers))

    @staticmethod
    def name_and_payload(
        event: object, payload: object, names: Mapping[type, str] | None = None
    ) -> tuple[str, object]:
        """The event name and payload of what was emitted: a name and a payload, or a typed event.

        ``names`` are the first names a bus registered classes under (``bus.schema(Cls,
        name=...)``); other typed events are named by :func:`~tidings._core.schemas.event_name_of`.

        Raises:
            TypeError: neither a name nor a typed event, or a typed event with a payload.
        """
        if isinstance(event, str | enum.Enum):
            return normalize_name(event), payload
        if is_event_class(type(event)):
            if payload is not None:
                raise TypeError(
                    f"emit() takes no payload with a typed event ({type(event).__qualname__}): "
                    "it is its own payload"
                )
            cls = type(event)
            return (names.get(cls) if names else None) or event_name_of(cls), event
        raise TypeError(
            "an event must be a name (a str or str-valued Enum) or a typed event (an instance of a "
            f"Pydantic model or dataclass), got {type(event).__name__}"
        )

    async def emit_now(self, event: object, *args: Any, **kwargs: Any) -> tuple[HandlerError, ...]:
        """Run the event's handlers now and return when they, and the events they emit, are done.

        Unlike :meth:`emit`, this waits: for tests, scripts, and callers that must know the work
        is finished. Each handler runs once, with its timeout, isolated from the others; a failure
        is reported and retried or made a dead letter as usual, and also returned. With a durable
        store the deliveries are logged first, as always.

        Args:
            event: an event name or a typed event, as for :meth:`emit`.
            *args: one argument is the payload; several (or keyword arguments) become an
                :class:`~tidings.Arguments` payload, and handlers that take them as parameters
                (``async def on_paid(order_id, amount)``) are called with them. A lone ``None``
                is the payload ``None``, as for :meth:`emit`: it fills a handler's required first
                argument (``bind="arguments"``), while an optional one keeps its default.
            **kwargs: see ``*args``.

        Returns:
            The failures of this first attempt, one :class:`~tidings.HandlerError` per failed call
            (empty when every handler succeeded). A plain ``def`` handler past its timeout is one
            (a :class:`~tidings.HandlerTimeoutError`): it cannot be interrupted, so this returns
            without waiting for it; a failure of it after that reaches ``on_failure``, and is
            returned too only if it happens while the other handlers still run.

        Raises:
            BusStateError: the bus is closed or runs on another event loop.
            EventValidationError: the payload does not fit the event's schema.

        Example:
            >>> import asyncio
            >>> from tidings import EventBus
            >>> bus = EventBus()
            >>> @bus.on("payment.processed")
            ... async def settle(payment_id: str, status: str, amount: float) -> None:
            ...     print(payment_id, status, amount)
            >>> async def main() -> None:
            ...     async with bus:
            ...         failures = await bus.emit_now("payment.processed", "p-1", "success", 99.99)
            ...         assert not failures
            >>> asyncio.run(main())
            p-1 success 99.99
        """
        payload: object = (
            args[0]
            if len(args) == 1 and not kwargs
            else Arguments(args, kwargs)
            if (args or kwargs)
            else None
        )
        name, payload = (
            self.name_and_payload(event, payload, self.schemas.names)
            if type(event) is not str
            else (event, payload)
        )
        if self.schema_names:
            schema = self.schema_names.get(name)
            if schema is not None:
                payload = schema.coerce(payload)
        if not self.enabled:
            return ()
        timestamp_ns = time_ns()
        if self._taps:
            self._notify_taps(Event(name, payload, EMPTY_HEADERS, timestamp_ns))
        if self._state is BusState.CLOSED:
            raise BusStateError(f"bus {self.name!r} is closed")
        self._ensure_running_slow()
        job = Job(self, [(name, payload, timestamp_ns, None)])
        if not self._runner.start_job(job, None):
            return ()
        errors: list[HandlerError] = []
        job.errors = errors
        # no concurrency slot: an emit_now() inside a handler, which holds one, must not wait for another
        job.unbounded = True
        self._runner.spawn(job)
        task = job.task  # the job lets go of it when it ends
        assert task is not None
        await asyncio.wait([task])  # the caller's cancellation leaves the handlers running
        if task.cancelled() or job.cut_off:  # drain or shutdown cut it off: those calls did not run
            unfinished = job.taken_over
            if unfinished is None:  # its task was cancelled before it ran
                unfinished = job.unfinished(self._registry.resolve)
            errors.extend(
                HandlerCancelledError(
                    f"handler {pending.handler} did not finish: its job was cut off",
                    events=[pending.event],
                    handler=pending.handler,
                )
                for pending in unfinished
            )
        return tuple(errors)

    def release(self, event: Event) -> None:
        """Emit an event that exists already, keeping its id (the outbox's events, after commit).

        Routed like :meth:`emit`: inside a request of this bus it waits for the response.
        """
        if self.enabled:
            if self._taps:
                self._notify_taps(event)
            if self.store.durable:
                self._runner.released[event.id] = event
            self._route((event.name, event.payload, event.timestamp_ns, Prebuilt(event)))

    def _route(self, record: Record) -> None:
        scope = current_scope()
        if type(scope) is Job and scope.sync_left_behind and scope.bus is self:
            left = scope.sync_left_behind.get(threading.get_ident())
            if left is not None:  # a sync call its job went on without: its events go with it
                if self.tracing is not None and type(record[3]) is not Prebuilt:
                    record = (*record[:3], self.tracing.inject(record[3]))
                if left.keep(record):
                    return
        # The scope may be the request of another bus's middleware, nested in one of this bus's (two
        # middlewares on one app): the outer request holds this bus's events until its response.
        # Other scopes (handler jobs, direct scopes) link to nothing: their events go on at once.
        while scope is not None and scope.bus is not self:
            scope = scope.parent if type(scope) is Job else None
        if scope is not None and scope.buffer is not None:
            if threading.get_ident() == self.loop_thread:
                if (
                    self.tracing is not None
                    and type(scope) is Job
                    and scope.task is not None
                    and scope.task is not asyncio.current_task(self._loop)
                    and type(record[3]) is not Prebuilt
                ):
                    # A task a handler started (it runs in a copy of the handler's context): the
                    # span current here is that handler's, not the one of whichever handler the
                    # job runs now, whose context the runner would give the event
                    record = (*record[:3], self.tracing.inject(record[3]))
                scope.buffer.append(record)  # else its trace context is added with its job's (runner)
                return
            if self.tracing is not None and type(record[3]) is not Prebuilt:
                record = (*record[:3], self.tracing.inject(record[3]))  # this thread's context
            # Another thread (a sync endpoint, a sync handler): only the loop touches buffers
            self._hand_over(scope, record)
            return
        if self.tracing is not None and type(record[3]) is not Prebuilt:
            record = (*record[:3], self.tracing.inject(record[3]))  # the emitting code's context
        self._submit(record)

    def append_to(self, scope: Scope, record: Record) -> None:
        """On the loop: add ``record`` to ``scope``'s buffer, or hand it on if it has none now."""
        if scope.buffer is not None:
            scope.buffer.append(record)
        else:  # the request or job finished meanwhile: the event goes on by itself
            self._accept(record)

    def _submit(self, record: Record) -> None:
        state = self._state
        if state is BusState.RUNNING or state is BusState.DRAINING:
            loop = self._loop
            assert loop is not None
            if loop.is_closed():  # e.g. a test client's loop, closed without a lifespan shutdown
                self._drop(record, "its event loop has closed")
                return
            if threading.get_ident() == self.loop_thread:
                self._accept(record)
            else:
                self._hand_over(None, record)
            return
        tell = False
        with self._lock:
            waiting = self._state is BusState.CREATED
            if waiting:
                self._outside.append(record)
                # Emitted on a running event loop, so an app is up, but nothing started this bus:
                # unless its start is just late, these events wait forever, in silence but for this.
                # (a capture in a test taps a bus it need not start)
                tell = not self._told_not_started and not self._taps and _app_is_up()
                self._told_not_started |= tell
        if waiting:
            if tell:
                logger.warning(
                    "event %r was emitted on bus %r, which has not been started: its events wait, "
                    "and run only once it starts. A bus is started by its own TidingsMiddleware (with "
                    "the app's lifespan), or by `async with bus:` or `await bus.start()` (in the app's "
                    "lifespan, say); without one of them they never run. (Said once per bus.)",
                    record[0],
                    self.name,
                    extra=fields(record[0]),
                )
            return
        if self._state is BusState.CLOSED:
            self._drop(record, "the bus is closed")
        else:  # it started while we took the lock
            self._submit(record)

    def _hand_over(self, scope: Scope | None, record: Record) -> None:
        """From another thread: queue ``record`` for the loop, for ``scope``'s buffer or as an outside event.

        The loop takes what is queued in one callback, scheduled ahead of whatever this thread
        schedules next (a sync endpoint's return value): its events are in the request's buffer
        before the request ends. What a stopped loop never took is taken when the bus starts on the
        next loop, or reported when it closes.
        """
        stranded: list[tuple[Scope | None, Record]] = []
        origin = current_scope()
        with self._lock:
            if type(origin) is Job and origin.sync_left_behind and origin.bus is self:
                # Asked again under the lock that the take-over's Runner._take_queued takes: the
                # call may have been left behind since _route asked, and its job may have ended.
                # So the event is queued before the take-over takes the queue into the job, or it
                # is the call's: never an outside event that the log gets after the call is done.
                left = origin.sync_left_behind.get(threading.get_ident())
                if left is not None and left.keep(record):
                    return
            closed = self._state is BusState.CLOSED
            if not closed:
                self._handed_over.append((scope, record))
                # Scheduled under the lock: once the flag is seen set, the callback is queued, so
                # another thread that finds it set and returns (a sync endpoint, a handler's hop)
                # has its event taken before what it schedules next.
                if not self._hand_over_scheduled:
                    try:
                        self._loop.call_soon_threadsafe(self._take_handed_over)  # type: ignore[union-attr]
                        self._hand_over_scheduled = True
                    except RuntimeError:  # the loop has closed under us: nothing will take them there
                        stranded, self._handed_over = self._handed_over, []
        if closed:
            self._drop(record, "the bus is closed")
            return
        for _, record in stranded:
            self._drop(record, "its event loop has closed")

    def _pending_work(self) -> list[str]:
        """What the bus accepted and has not finished, one line per call, for reports (reads only)."""
        runner = self._runner
        resolve = self._registry.resolve
        pending = [
            f"{item.handler} <- {item.event.name} ({item.event.id})"
            for job in tuple(runner.jobs)
            for item in job.unfinished(resolve)
        ]
        passed = list(runner.in_transit.values())
        # ended in their threads, their ends not taken by a loop yet (it stopped first)
        ended = runner.ends_on_their_way()
        # plain def calls past their timeout: their jobs went on, their threads did not stop
        for key, left in tuple(runner.left_behind.items()):
            spec, arg = left.call
            scope = left.rest_scope
            records = [*left.records, *ended.get(key, ())]
            if key in ended:
                where = "ended in its thread, its end not handled yet"
            elif scope is not None:
                where = "its thread returned, the rest of the call still running"
            else:
                where = "still running in its thread"
            pending += [
                f"{spec.name} <- {event.name} ({event.id}), past its timeout, {where}"
                for event in _events_of(spec, arg)
            ]
            # what it emitted meanwhile, handled once it ends
            if scope is not None and scope.buffer:
                records += scope.buffer
            for record in records:
                event = make_event(record)
                pending += [f"{handler.name} <- {event.name} ({event.id})" for handler in resolve(event.name)]
        now = monotonic()
        for retry in sorted(runner.retries, key=lambda r: r.due):
            spec, arg = retry.call
            pending += [
                f"{spec.name} <- {event.name}, retry due in {retry.due - now:.2g}s"
                for event in _events_of(spec, arg)
            ]
        for callback, args in passed:
            if callback == runner._sync_call_failed:  # (job, call, index, error, ...)
                job, _, index, error = args[:4]
                if job.reported_unfinished(index):
                    # a cut-off reported it unfinished before it failed: its failure is only logged
                    what = "reported unfinished (its job was cut off), then failed: its failure only logged"
                else:
                    what = "failed, its failure not reported yet"
                pending += [f"{error.handler} <- {event.name} ({event.id}), {what}" for event in error.events]
        pending += [f"{record[0]} (not started yet)" for record in self._outside]
        pending += [f"{record[0]} (not started yet)" for _, record in tuple(self._handed_over)]
        if self._emits_under_way:  # another thread's emit, its taps not returned yet
            pending.append(f"{self._emits_under_way} emit(s) in another thread, still in a tap")
        # the failures' reports: an async on_failure hook's calls (one that ended may still be listed
        # in hook_tasks until its done-callback runs)
        running_hooks = sum(not task.done() for task in tuple(runner.hook_tasks))
        pending += ["a call of the on_failure hook, still running"] * running_hooks
        return pending

    def _waiting(self) -> bool:
        """Whether events were accepted that no job has taken yet (drain and settle wait for them)."""
        return bool(self._handed_over or self._outside or self._emits_under_way)

    async def _wait_emits_under_way(self, until: float) -> bool:
        """Wait until no tapped emit is between its taps and its routing, or ``until`` (monotonic).

        Such an emit is another thread's, in taps that may take their time (or never return):
        looked at every few milliseconds, so neither the bound nor the loop's CPU is spent on it.

        Returns:
            ``False`` if ``until`` came first.
        """
        while self._emits_under_way:
            remaining = until - monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(_TAPS_POLL, remaining))
        return True

    def _start_waiting(self) -> None:
        """On the loop: start the job of what waits (see :meth:`_waiting`) now, not at the next tick."""
        if self._handed_over:  # emitted by other threads (the last sync handlers, say)
            self._take_handed_over()
        if self._outside:
            self._spawn_outside_job()

    def _take_handed_over(self) -> None:
        """On the loop: put what other threads handed over where it goes, in the order they did."""
        with self._lock:
            handed, self._handed_over = self._handed_over, []
            self._hand_over_scheduled = False
        for scope, record in handed:
            if scope is None:
                self._accept(record)
            else:
                self.append_to(scope, record)

    def _accept(self, record: Record) -> None:
        if self._state is BusState.CLOSED:
            self._drop(record, "the bus is closed")
            return
        self._outside.append(record)
        if not self._outside_scheduled:
            self._outside_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._spawn_outside_job)

    def _spawn_outside_job(self) -> None:
        self._outside_scheduled = False
        if self._runner.closed:  # scheduled as the bus closed: aclose() reported what was here
            return
        records, self._outside = self._outside, []
        if not records or self._loop is None:
            return
        job = Job(self, records)
        # Outside events got the context of their emit in _route; starting the job where another
        # one is current (the first emitter's, which call_soon kept; a drain's caller) would give it
        # to those emitted with none.
        start = self._runner.start_job
        if not (start(job, None) if self.tracing is None else contextvars.Context().run(start, job, None)):
            return  # nobody handles these events: no task
        # Handlers of outside events run in a clean context, not in whichever context emitted first.
        self._runner.spawn(job)

    def _drop(self, record: Record, why: str) -> None:
        headers = record[3]
        event_id = None  # an event gets its id when it is handed to its handlers
        if type(headers) is Prebuilt:  # committed: its log rows stay, to run after a restart
            event_id = headers.event.id
            self._runner.released.pop(event_id, None)
        logger.error(
            "event %r%s was dropped because %s",
            record[0],
            "" if event_id is None else f" (id {event_id})",
            why,
            extra=fields(record[0], event_id),
        )

    # -- requests (used by the ASGI middleware) ----------------------------------------------------
    def ensure_running(self) -> bool:
        """Start the bus on the running loop if it is not running there yet (no lifespan ran).

        The common case is a few attribute checks and a dictionary lookup: the bus's loop runs a
        task on this thread, so it is the running loop (``asyncio.get_running_loop()`` costs a
        system call on Python 3.11). A loop that closed under the bus (a test client without
        lifespan makes one per request) is replaced. (The middleware inlines this check.)

        Returns:
            Whether it started the bus now.

        Raises:
            BusStateError: the bus runs on another, still open event loop, or it is closed and
                its ``aclose()`` has not returned yet.
        """
        loop = self.serving_loop
        if loop is not None and threading.get_ident() == self.loop_thread and task_of(loop) is not None:
            return False
        return self._ensure_running_slow(lazily=True)

    def _ensure_running_slow(self, *, lazily: bool = False) -> bool:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._state is not BusState.CLOSED:
            return False
        if self._closing is not None:  # closed, but aclose() still winds the last run down
            raise BusStateError(f"bus {self.name!r} is closing: start it again once aclose() has returned")
        if (
            self._loop is not None
            and not self._loop.is_closed()
            and self._state in (BusState.RUNNING, BusState.DRAINING)
        ):
            raise BusStateError(
                f"bus {self.name!r} is running on another event loop; one bus serves one loop"
            )
        # Started by a request (no lifespan ran, e.g. a test client that makes a loop per request):
        # nothing will drain a bus task before that loop closes, so handlers run inline.
        self.request_handlers_inline = lazily or self.request_handlers == "inline"
        self.started_lazily = lazily
        self._bind(loop)
        return True

    def open_request(self) -> Job:
        """A fresh scope for one request: it collects the request's events and becomes their job."""
        return Job(self, [])

    def spawn_request_job(self, job: Job) -> None:
        """Run a finished request's events in a task the bus owns (``request_handlers="task"``).

        The task runs in a copy of the request's context, so handlers see the request's context
        variables and the events they emit join the same job.
        """
        if self._runner.closed:  # the request outlived the bus: its events go where late emits go
            self.adopt(job)
            return
        if self._runner.start_job(job, None):
            assert self._loop is not None
            job.task = self._loop.create_task(self._runner.run_job(job))

    def discard_request_events(self, job: Job, reason: str) -> None:
        """Drop a failed request's events, naming each one in a warning.

        Events of a transaction the request committed (the outbox's) are not the request's to
        drop: their commit stands, so they are handled.
        """
        records, job.buffer = job.buffer or [], None
        committed = [record for record in records if type(record[3]) is Prebuilt]
        if committed:
            records = [record for record in records if type(record[3]) is not Prebuilt]
            for record in committed:
                self._submit(record)
        for record in records:
            logger.warning(
                "event %r of a request was dropped because %s", record[0], reason, extra=fields(record[0])
            )

    def adopt(self, job: Job) -> None:
        """Hand a request's events to the runner when the request's task cannot run them itself."""
        records, job.buffer = job.buffer or [], None
        if self.tracing is not None:  # the request's trace context, while it is still current
            records = self.tracing.prepare(records)
        for record in records:
            self._submit(record)

    # -- lifecycle ---------------------------------------------------------------------------------
    def _configure_tracing(self) -> None:
        """Decide whether to trace, once per start (see ``tracing`` in the class docs)."""
        setting = self._tracing_setting
        provider: TracerProvider | None = None
        if setting is None:
            provider = _configured_tracer_provider()
            if provider is None:
                self.tracing = self._runner.tracing = None
                return
        elif setting is False:
            self.tracing = self._runner.tracing = None
            return
        elif setting is not True:
            provider = setting
        from ..integrations.opentelemetry import Tracing

        self.tracing = self._runner.tracing = Tracing(self._registry, provider)

    def detect_tracing(self) -> bool:
        """Look again for a tracer provider (with ``tracing=None``); return whether the bus traces.

        The bus decides when it starts; under :class:`~tidings.TidingsMiddleware` that is before
        the app's startup code, so the middleware calls this once that code has run, for apps
        that set up OpenTelemetry there. Call it yourself if you set the provider up later still
        (or pass ``tracing=True``).
        """
        if self._tracing_setting is None and self.tracing is None and self._state is BusState.RUNNING:
            self._configure_tracing()
            self._choose_emit_path()
        return self.tracing is not None

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._configure_tracing()
        with self._lock:
            self._loop = loop
            self.loop_thread = threading.get_ident()
            self._choose_emit_path()
            dead, dead_calls = self._runner.bind(loop)
            self._state = BusState.RUNNING
            self._drain_deadline = None
            register_running(self)
            # What threads handed to a loop that stopped before taking it: the scopes it was
            # meant for died with that loop, so it runs here, as outside events.
            self._outside.extend(record for _, record in self._handed_over)
            self._handed_over = []
            self._hand_over_scheduled = False
            # A callback scheduled on a loop that stopped before running it never runs: the flag
            # would keep every later outside event waiting for it. (On the same loop, a second
            # callback finds nothing left to spawn.)
            self._outside_scheduled = bool(self._outside)
            if self._outside:
                loop.call_soon(self._spawn_outside_job)
        if dead or dead_calls:  # out of the lock: the failure hook, or a logging handler, may emit
            self._runner.report_dead(dead, dead_calls)
        self._opening = loop.create_task(self._open_store(), name=f"tidings {self.name}: open the store")
        self._opening.add_done_callback(_consume_error)  # a lazy start has nobody awaiting it

    async def _open_store(self) -> None:
        try:
            await self.store.open()
        except StoreError as exc:
            logger.error("bus %r could not open its store: %s", self.name, exc, exc_info=exc)
            raise
        if self.store.durable:
            self._relay_task = asyncio.create_task(
                self._relay(claim=self._resubmit), name=f"tidings {self.name}: relay"
            )

    async def _relay(self, *, claim: bool) -> None:
        """Run what the log holds for nobody: deliveries of a process that died, revived dead letters.

        Every tick it first renews the leases of this process's own unfinished deliveries, so that
        a slow handler is never taken over; then, if the deliveries it took last time are done, it
        takes the next batch whose lease has run out (one batch at a time: a backlog of a million
        deliveries is worked through, not loaded into memory). With ``claim=False`` (see
        :meth:`start`), and while the bus drains, it only renews.
        """
        interval = min(5.0, self.resubmit_after / 4)
        store = self.store
        runner = self._runner
        taken: list[asyncio.Task[None]] = []
        while True:
            taken = [task for task in taken if not task.done()]
            try:
                in_flight = runner.in_flight()
                if in_flight:
                    store.renew(in_flight, lease=self.resubmit_after)
                # draining: no new work, but the leases of what the drain waits for are still renewed
                if claim and not taken and self._state is BusState.RUNNING:
                    deliveries = await store.claim(limit=_CLAIM_BATCH, lease=self.resubmit_after)
                    if self.state is not BusState.RUNNING:  # (read again: the claim awaited)
                        # draining began while the log answered: no new work now (the app's shutdown
                        # code may have closed what handlers need); they run once their lease is out
                        continue
                    # a lease that ran out under a loop too busy to renew it: still ours, running
                    running = set(in_flight)
                    fresh = [d for d in deliveries if (d.event.id, d.handler) not in running]
                    if fresh:
                        logger.info(
                            "bus %r resubmits %d deliveries from its event log", self.name, len(fresh)
                        )
                        jobs = runner.run_deliveries(fresh)
                        taken = [job.task for job in jobs if job.task is not None]
                    if len(deliveries) == _CLAIM_BATCH and not taken:
                        continue
            except StoreError as exc:
                logger.error("bus %r could not use its event log: %s", self.name, exc, exc_info=exc)
            except Exception as exc:  # whatever it was, the relay is the only one resubmitting: it goes on
                logger.error(
                    "bus %r failed to relay its event log's deliveries: %s: %s",
                    self.name,
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
            await asyncio.sleep(interval)

    async def _stop_relay(self) -> None:
        task, self._relay_task = self._relay_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise

    async def start(self, *, resubmit: bool = True) -> None:
        """Start handling events on the running event loop. Idempotent.

        Events emitted before the start are handled now.

        Args:
            resubmit: with a durable store, run the deliveries whose lease ran out (left by a
                process that died, or cut off by a drain) and keep doing so while running.
                ``False`` is for tools that use the bus briefly, like ``tidings dead-letters
                replay``: they should not take over the app's backlog. (The leases of the bus's
                own deliveries are renewed either way.)

        If an ``aclose()`` is still under way, the start waits for it to return.

        Raises:
            BusStateError: the bus is already running on another event loop.
            StoreError: the bus's store could not be opened.
        """
        self._resubmit = resubmit
        while self._closing is not None:  # a run still being closed: this one starts after it
            await asyncio.shield(self._closing)
        self._ensure_running_slow()
        opening = self._opening
        if opening is not None:
            await opening

    async def flush(self) -> None:
        """Wait until every event emitted so far outside requests is written to the durable log.

        From then on a crash loses none of them: they run after a restart. (Events emitted
        by handlers still running are recorded when those handlers return.) With a store that is
        not durable there is nothing to wait for.

        Raises:
            StoreError: the log refused some of them (they are handled, but not durably).

        Example:
            >>> import asyncio, os, tempfile
            >>> from tidings import EventBus
            >>> from tidings.store import SQLiteStore
            >>> bus = EventBus(store=SQLiteStore(os.path.join(tempfile.mkdtemp(), "log.db")))
            >>> @bus.on("report.requested")
            ... async def build(event): ...
            >>> async def main() -> None:
            ...     async with bus:
            ...         bus.emit("report.requested", {"month": "2026-11"})
            ...         await bus.flush()  # durable from here on
            >>> asyncio.run(main())
        """
        if self._state not in (BusState.RUNNING, BusState.DRAINING) or not self.store.durable:
            return
        await asyncio.sleep(0)  # let a request's task that emitted end (and hand its job over)
        self._start_waiting()  # what other threads emitted before this call too
        errors = await self._runner.wait_recorded()
        if errors:
            raise StoreError(
                f"the event log refused {len(errors)} job(s) of events (handled, not durably): {errors[0]}"
            ) from errors[0]

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every pending and in-flight handler call has finished.

        Events emitted while draining (by handlers, say) are handled too. When ``timeout`` runs
        out, the unfinished calls are cancelled, logged one by one, and raised. Called by a
        handler, it neither waits for nor cuts off that handler's own job (nor, called by the
        background tasks of a FastAPI handler left behind past its timeout, that call).

        Args:
            timeout: seconds to wait; defaults to the bus's ``drain_timeout``.

        Raises:
            DrainTimeoutError: the bound ran out; ``.pending`` lists every unfinished call.
        """
        if self._state not in (BusState.RUNNING, BusState.DRAINING):
            return
        until = monotonic() + (self.drain_timeout if timeout is None else timeout)
        runner = self._runner
        while True:
            self._start_waiting()  # drain waits on jobs
            if not await runner.wait_idle(until):
                break
            await asyncio.sleep(0)  # let the last handlers' tasks and threads hand on what they emitted
            if not await self._wait_emits_under_way(until):
                break
            if not self._waiting() and runner.idle(until):
                # an async failure hook's calls (reports of the last failures) end within the bound
                hooks_ended = await runner.wait_hooks(until)
                if not self._waiting() and runner.idle(until):  # nothing they emitted waits
                    return
                if not hooks_ended:
                    break
        await self._cut_off()

    async def _cut_off(self) -> None:
        runner = self._runner
        if self._handed_over:  # into the buffers the cut-off reports, or among the outside events
            self._take_handed_over()
        pending = self._take_outside()
        pending.extend(runner.cut_off())
        await asyncio.sleep(0)  # deliver the cancellations; the bound is spent, so wait no more
        runner.report_unfinished(pending, "the drain bound ran out")
        await runner.keep_unfinished(pending)  # with a durable log: all of it stays there
        message = (
            f"bus {self.name!r}: drain bound ran out with {len(pending)} handler call(s) "
            f"unfinished: " + ", ".join(f"{p.handler} <- {p.event.name} ({p.event.id})" for p in pending)
        )
        logger.error(message)
        raise DrainTimeoutError(message, pending=pending)

    def _take_outside(self) -> list[PendingDelivery]:
        """Take the outside events no job has yet: the calls they would have made."""
        resolve = self._registry.resolve
        pending: list[PendingDelivery] = []
        for record in self._outside:
            event = make_event(record)
            pending.extend(PendingDelivery(event, spec.name) for spec in resolve(event.name))
        self._outside = []
        return pending

    async def aclose(self) -> None:
        """Drain within ``drain_timeout``, then stop. Idempotent; never raises for a cut-off drain.

        What the drain bound cut off is logged (and was reported to ``on_failure``).
        """
        if self._closing is not None:  # another aclose() is under way: this one returns with it
            await asyncio.shield(self._closing)
            return
        if self._state is BusState.CLOSED:
            return
        if self._state is BusState.CREATED:  # never started: what waited for the start is lost
            with self._lock:
                self._state = BusState.CLOSED
                records, self._outside = self._outside, []
            for record in records:
                self._drop(record, "the bus was closed without ever being started")
            return
        self._state = BusState.DRAINING
        deadline = self._drain_deadline
        timeout = self.drain_timeout if deadline is None else max(0.0, deadline - monotonic())
        until = monotonic() + timeout
        assert self._loop is not None
        self._closing = closing = self._loop.create_future()
        try:
            try:
                await self.drain(timeout)
            except DrainTimeoutError:
                pass  # already logged with every unfinished call
            # closed before anything is awaited: an event emitted in a gap would start a job that
            # nothing drains or reports
            await self._runner.keep_unfinished(self._close_runner())  # in the log, as a cut-off's are
            await self._stop_relay()  # it renewed the leases of what the drain waited for
            # what closing reported (and a cut-off) reaches an async failure hook within the bound
            await self._runner.wait_hooks(until)
        finally:
            try:
                if self._state is not BusState.CLOSED:  # aclose() itself was cancelled, or failed
                    self._close_runner()
                relay, self._relay_task = self._relay_task, None
                if relay is not None:
                    relay.cancel()
                self._runner.shutdown()
                await self._close_store()
            finally:
                self._closing = None
                closing.set_result(None)

    def _close_runner(self) -> list[PendingDelivery]:
        """Close the bus to new events; report (and return) what it accepted and will not handle now."""
        with self._lock:
            self._state = BusState.CLOSED
            unregister_running(self)
        # From now on no job starts: a request that ends after this point drops its events by name
        # (the runner's own shutdown comes later, after awaits in which requests still end, and a
        # job started then would run on a closed bus, undrained, and lose its plain def calls
        # when the worker threads go away).
        self._runner.closed = True
        # handed over before the close, not taken yet: each is dropped, by name (a request still
        # running drops its buffer's events when it ends, as for any request that outlives the bus)
        self._take_handed_over()
        # accepted after a cut-off took what was there (in the tick its cancellations took)
        leftovers = self._take_outside()
        # Jobs started in that same tick (an emit_now(), a request's handlers): the cut-off never
        # saw them and nothing waits for them any more, so they are cut off (and reported) here.
        # After a drain that finished, there are none.
        leftovers.extend(self._runner.cut_off())
        if leftovers:
            self._runner.report_unfinished(leftovers, "the bus closed after its drain bound ran out")
        self._runner.abandon_retries()
        return leftovers

    async def _close_store(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
        try:
            await self.store.aclose()
        except StoreError as exc:
            logger.error("bus %r could not close its store: %s", self.name, exc, exc_info=exc)

    async def begin_shutdown(self) -> None:
        """Drain before the app's own shutdown code runs, so handlers still have its resources.

        The drain bound covers this drain and the final one in :meth:`aclose` together.
        """
        if self._state is not BusState.RUNNING:
            return
        self._state = BusState.DRAINING  # the relay stops taking work, and renews what runs
        self._drain_deadline = monotonic() + self.drain_timeout
        try:
            await self.drain(self.drain_timeout)
        except DrainTimeoutError:
            pass  # already logged with every unfinished call

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<EventBus {self.name!r} {self._state.value}, {len(self._registry)} handler(s)>"
