"""FastAPI glue: dependencies in event handlers, and an event emitter endpoints get with ``Depends``.

**Dependencies in handlers.** A handler declares dependencies exactly as an endpoint does::

    async def get_db() -> AsyncIterator[Session]:
        async with Session() as session:
            yield session  # closed after the handler returns, also when it raises

    @bus.on("user.created")
    async def welcome(event: Event, db: Annotated[Session, Depends(get_db)]) -> None: ...

Each handler run solves its dependencies afresh with FastAPI's own solver: one cache per run (a
dependency used twice in one run is called once), sub-dependencies, ``async def`` and plain ``def``
dependencies (the latter in FastAPI's thread pool, as for endpoints), ``yield`` dependencies (closed
after the handler, whichever ``scope=`` they declare), ``Security`` and ``SecurityScopes``. Then the
handler runs (a plain ``def`` handler in the bus's worker threads), then background tasks a
dependency added to a ``BackgroundTasks``, then the run's ``yield`` dependencies are closed.
``app.dependency_overrides`` of the app the bus serves (``bus.app``, set by
:class:`~tidings.TidingsMiddleware`) are read at every run, so tests can override a database for
handlers as for endpoints. A dependency asking for the ``Request`` gets a request of its own whose
``.app`` is that app and whose ``scope["tidings.event"]`` is the event; it has no body, path, query
or headers (an event has none), so a dependency that *requires* one of those fails at registration.

**The emitter.** ``emitter: Emitter`` in an endpoint's signature gives an :class:`EventEmitter`
bound to the bus serving the request; its :meth:`~EventEmitter.emit` buffers the event until the
response has been sent, like :func:`tidings.emit`. The dependency is an ``async def``, so FastAPI
awaits it on the event loop: no thread hop.

FastAPI's solver (``fastapi.dependencies.utils``) is not a public API. This module adapts to what
changed in it between FastAPI 0.110 and 0.165, the supported range; ``docs/fastapi.md`` says how both
ends, and the minor releases between, are tested.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeAlias

from .._core.dispatcher import current_scope
from .._core.dispatcher import emit as _emit
from .._core.envelope import Arguments
from ..exceptions import ConfigurationError
from ..observability import carry_handler_call, drop_handler_call

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from .._core.binding import Plan
    from .._core.bus import EventBus
    from .._core.envelope import Event
    from .._core.runner import Runner

try:
    from fastapi import Depends
    from fastapi.dependencies.utils import get_dependant, solve_dependencies
    from starlette.requests import Request
except ImportError as exc:  # pragma: no cover - exercised only without FastAPI installed
    raise ImportError("tidings.integrations.fastapi needs FastAPI: pip install 'tidings[fastapi]'") from exc

__all__ = ["Emitter", "EventEmitter", "current_emitter", "dependency_call", "emitter_for"]

# -- what differs between FastAPI versions, read once ---------------------------------------------
_SOLVE_PARAMETERS: Final = frozenset(inspect.signature(solve_dependencies).parameters)
# 0.106+: yield dependencies enter this stack (a required keyword, unused again since 0.121)
_PASS_EXIT_STACK: Final = "async_exit_stack" in _SOLVE_PARAMETERS
# 0.112.4+: a required keyword about request bodies; events have none
_SOLVE_OPTIONS: Final[dict[str, Any]] = (
    {"embed_body_fields": False} if "embed_body_fields" in _SOLVE_PARAMETERS else {}
)
# Where versions look for the exit stack of yield dependencies in the request scope: before 0.106
# "fastapi_astack"; since 0.121 "fastapi_inner_astack" (scope="request") and
# "fastapi_function_astack" (scope="function"). A handler run has one stack for all: both
# scopes end when the handler has returned.
_STACK_KEYS: Final = ("fastapi_astack", "fastapi_inner_astack", "fastapi_function_astack")
_REQUEST_PARAMETERS: Final = (
    ("path_params", "path parameter"),
    ("query_params", "query parameter"),
    ("header_params", "header"),
    ("cookie_params", "cookie"),
    ("body_params", "request body field"),
)


def _unpack(solved: Any) -> tuple[dict[str, Any], list[Any], Any]:
    """Values, errors and background tasks of a solve: a tuple before 0.112.3, an object since."""
    if isinstance(solved, tuple):
        values, errors, background_tasks = solved[0], solved[1], solved[2]
    else:
        values, errors, background_tasks = solved.values, solved.errors, solved.background_tasks
    return values, errors, background_tasks


def _required(field: Any) -> bool:
    info = getattr(field, "field_info", None)
    is_required = getattr(info, "is_required", None)
    if callable(is_required):  # Pydantic 2
        return bool(is_required())
    return bool(getattr(field, "required", False))  # pragma: no cover - Pydantic 1


def _check_dependant(handler: str, dependant: Any, path: tuple[str, ...] = ()) -> None:
    """Fail at registration for what a handler run can never provide."""
    where = " -> ".join(path) or "itself"
    for attribute, kind in _REQUEST_PARAMETERS:
        for field in getattr(dependant, attribute, None) or ():
            if _required(field):
                raise ConfigurationError(
                    f"handler {handler}: dependency {where} requires the {kind} {field.name!r}, which "
                    "an event does not have (events have no path, query, headers, cookies or body); "
                    "give it a default, or leave that dependency to endpoints"
                )
    if getattr(dependant, "websocket_param_name", None):
        raise ConfigurationError(
            f"handler {handler}: dependency {where} asks for a WebSocket; a handler run has none"
        )
    for sub in getattr(dependant, "dependencies", None) or ():
        _check_dependant(handler, sub, (*path, _call_name(sub.call)))


def _call_name(call: object) -> str:
    return str(getattr(call, "__name__", None) or type(call).__name__)


def _stand_in(plan: Plan) -> Callable[..., Any]:
    """A function whose signature holds just the handler's dependency parameters, for FastAPI to read.

    FastAPI would read any other parameter as a query parameter; the event fills those instead.
    """

    def stand_in(**values: Any) -> None:  # pragma: no cover - never called, only inspected
        return None

    parameters = []
    for param in plan.dependencies:
        annotation = param.annotation
        if isinstance(annotation, str):  # unresolvable; the Depends(...) default says it all
            annotation = inspect.Parameter.empty
        parameters.append(
            inspect.Parameter(
                param.name, inspect.Parameter.KEYWORD_ONLY, default=param.default, annotation=annotation
            )
        )
    stand_in.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    stand_in.__qualname__ = stand_in.__name__ = plan.name
    return stand_in


def _event_request(app: Any, stack: AsyncExitStack, event: Event, state: dict[str, Any] | None) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": None,
        "server": None,
        "path_params": {},
        "state": {} if state is None else state.copy(),  # a copy per run, as Starlette gives requests
        "app": app,
        "tidings.event": event,
    }
    for key in _STACK_KEYS:
        scope[key] = stack
    return Request(scope)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an async __call__ on an instance
    )


async def _in_thread(
    bus: EventBus, work: Callable[[], Any], then: Callable[[], Awaitable[object]] | None
) -> Any:
    """Run a plain ``def`` handler in the bus's handler threads, seeing this context (its emits chain).

    As the runner's own plain def calls are: one past its timeout keeps its thread until it
    returns, and is completed, retried or made a dead letter by how it ends; the await is
    cancelled at the timeout, so its dependencies close then. ``then`` (its background tasks)
    is the caller's to run after it returned, or the runner's, once a call left behind returns.
    """
    runner: Runner = bus._runner  # its handlers' bodies run as its own calls
    return await runner.call_in_thread(work, then)


def dependency_call(plan: Plan, bus: EventBus) -> Callable[[Event], Awaitable[None]]:
    """The async call the runner makes for a handler with FastAPI dependencies.

    FastAPI reads the dependencies once, here; each call solves them afresh with an empty cache,
    runs the handler (a plain ``def`` one in the bus's handler threads), runs the background tasks
    dependencies added, and closes the ``yield`` dependencies, also when the handler raised.
    Overrides are read from ``bus.app`` at every call; with no app (a bus used without the
    middleware) there are none, and ``Request.app`` is ``None``.

    Raises:
        ConfigurationError: FastAPI cannot read the dependencies, a dependency requires what events
            do not have (a query parameter, a header, a body, a websocket), or a parameter that
            must be passed by position comes after a dependency.
    """
    after_dependency = plan.params[plan.params.index(plan.dependencies[0]) :] if plan.dependencies else []
    for param in after_dependency:
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise ConfigurationError(
                f"handler {plan.name}: {param.name!r} is positional-only but comes after a dependency, "
                "and dependencies are passed by keyword"
            )
    try:
        dependant = get_dependant(path="", call=_stand_in(plan))
    except Exception as exc:
        raise ConfigurationError(f"handler {plan.name} has dependencies FastAPI cannot use: {exc}") from exc
    _check_dependant(plan.name, dependant)
    bind = plan.bind_with_extra()
    is_async = _is_async(plan.fn)
    name = plan.name

    async def call(event: Event) -> None:
        failure: BaseException | None = None
        async with AsyncExitStack() as stack:
            # the threads this call uses (its own, FastAPI's for sync dependencies) log as this
            # handler, to the end: registered first, this is undone after the dependencies close
            stack.callback(drop_handler_call, carry_handler_call())
            app = bus.app
            options = {**_SOLVE_OPTIONS, "async_exit_stack": stack} if _PASS_EXIT_STACK else _SOLVE_OPTIONS
            values, errors, background_tasks = _unpack(
                await solve_dependencies(
                    request=_event_request(app, stack, event, bus.lifespan_state),
                    dependant=dependant,
                    # FastAPI reads .dependency_overrides off any provider: Starlette and Litestar have none
                    dependency_overrides_provider=app if hasattr(app, "dependency_overrides") else None,
                    dependency_cache={},
                    **options,
                )
            )
            if errors:
                raise ValueError(f"handler {name}: its dependencies could not be solved: {errors}")
            try:
                if is_async:
                    result = bind(event, values)
                else:
                    work = functools.partial(bind, event, values)
                    result = await _in_thread(bus, work, background_tasks)
                if inspect.isawaitable(result):
                    await result
                if background_tasks is not None:
                    await background_tasks()
            except BaseException as exc:
                failure = exc
                raise
        if failure is not None:
            # A yield dependency caught the handler's exception and did not re-raise it, which
            # FastAPI's docs ask them to: the failure still stands (reported, retried, dead letter).
            raise failure

    return call


# -- the emitter endpoints get with Depends --------------------------------------------------------
class EventEmitter:
    """Emits events on one bus: what endpoints get from the :data:`Emitter` dependency.

    :meth:`emit` behaves like :func:`tidings.emit` called in the same place: in a request served by
    the emitter's bus, the event is buffered and handled after the response has been sent; in a
    sync endpoint (FastAPI's thread pool) too. Safe from any thread. Obtain one with
    ``emitter: Emitter`` (or ``Depends(current_emitter)``, or ``Depends(emitter_for(bus))``); build
    one directly with ``EventEmitter(bus)``.

    Args:
        bus: the bus events go to.

    Example:
        >>> from tidings import Event, EventBus
        >>> from tidings.integrations.fastapi import EventEmitter
        >>> bus = EventBus()
        >>> seen = []
        >>> untap = bus.tap(seen.append)
        >>> emitter = EventEmitter(bus)
        >>> emitter.emit("user.created", {"id": 1})
        >>> emitter.emit("order.paid", "o-1", amount=9.99)  # several arguments
        >>> [(event.name, event.payload) for event in seen]
        [('user.created', {'id': 1}), ('order.paid', Arguments('o-1', amount=9.99))]
    """

    __slots__ = ("bus",)

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    def emit(self, event: object, /, *args: Any, **kwargs: Any) -> None:
        """Emit an event on the emitter's bus, after the response when in a request.

        Args:
            event: an event name (``"user.created"``, or a ``str``-valued ``Enum``) or a typed event
                (an instance of a Pydantic model or dataclass, which is its own payload).
            *args: one argument is the payload; several (or keyword arguments) become an
                :class:`~tidings.Arguments` payload, and handlers that take them as parameters
                (``async def on_paid(order_id, amount)``) are called with them.
            **kwargs: see ``*args``.

        Raises:
            TypeError: ``event`` is neither a name nor a typed event, or a typed event came with
                arguments.
            EventValidationError: the payload does not fit the schema the bus has for the name.
        """
        payload = (args[0] if args else None) if not kwargs and len(args) < 2 else Arguments(args, kwargs)
        scope = current_scope()
        if scope is not None and scope.bus is self.bus:
            _emit(event, payload)  # where tidings.emit would put it, by its fast path
        else:
            self.bus.emit(event, payload)

    def __repr__(self) -> str:
        return f"EventEmitter(bus={self.bus.name!r})"


async def current_emitter() -> EventEmitter:
    """The FastAPI dependency behind :data:`Emitter`: an emitter for the bus serving this request.

    An ``async def`` with no parameters, so FastAPI awaits it on the event loop (no thread hop)
    and has nothing to solve for it. It finds the bus through the request's context, which
    :class:`~tidings.TidingsMiddleware` sets.

    Raises:
        ConfigurationError: no bus serves this request (the app lacks ``TidingsMiddleware``).
    """
    scope = current_scope()
    if scope is None:
        raise ConfigurationError(
            "the Emitter dependency found no tidings bus serving this request: add "
            "TidingsMiddleware to the app (app.add_middleware(TidingsMiddleware, bus=bus)), or use "
            "Depends(emitter_for(bus))"
        )
    return EventEmitter(scope.bus)


def emitter_for(bus: EventBus) -> Callable[[], Coroutine[Any, Any, EventEmitter]]:
    """A FastAPI dependency giving an emitter for ``bus``, whichever bus serves the request.

    For an app with several buses, or an endpoint that emits on another app's bus. Events emitted
    on a bus that serves the current request (its middleware is on the app, inner or outer) wait
    for the response; on a bus that does not, they are handed to it at once. An ``async def``,
    like :func:`current_emitter`: no thread hop.

    Nothing starts a bus that has no middleware of its own on the app: start it in the app's
    lifespan, as below. Until it starts its events wait, and the first one logs a warning naming
    the bus.

    Example:
        >>> from contextlib import asynccontextmanager
        >>> from typing import Annotated
        >>> from fastapi import Depends, FastAPI
        >>> from tidings import EventBus
        >>> from tidings.integrations.fastapi import EventEmitter, emitter_for
        >>> audit_bus = EventBus(name="audit")
        >>> AuditEmitter = Annotated[EventEmitter, Depends(emitter_for(audit_bus))]
        >>> @asynccontextmanager
        ... async def lifespan(app):
        ...     async with audit_bus:  # no middleware of its own starts it
        ...         yield
        >>> app = FastAPI(lifespan=lifespan)
        >>> @app.post("/login")
        ... async def login(audit: AuditEmitter) -> None:
        ...     audit.emit("user.logged_in", {"id": 1})
    """
    emitter = EventEmitter(bus)

    async def bus_emitter() -> EventEmitter:
        return emitter

    bus_emitter.__qualname__ = bus_emitter.__name__ = f"emitter_for_{bus.name}"
    return bus_emitter


Emitter: TypeAlias = Annotated[EventEmitter, Depends(current_emitter)]
"""An endpoint parameter annotated ``Emitter`` gets an :class:`EventEmitter` for the request's bus.

Example:
    >>> from fastapi import FastAPI
    >>> from tidings import EventBus, TidingsMiddleware
    >>> from tidings.integrations.fastapi import Emitter
    >>> bus = EventBus()
    >>> app = FastAPI()
    >>> app.add_middleware(TidingsMiddleware, bus=bus)
    >>> @app.post("/users")
    ... async def create_user(emitter: Emitter) -> dict[str, int]:
    ...     emitter.emit("user.created", {"id": 1})  # handled after the response
    ...     return {"id": 1}
"""
