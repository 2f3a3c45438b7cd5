"""Litestar's events, run by tidings: ``request.app.emit(...)`` and ``@listener(...)`` as they are.

Add :class:`TidingsPlugin` to the app; nothing else changes::

    app = Litestar(route_handlers=[...], listeners=[...], plugins=[TidingsPlugin()])

The plugin makes a tidings :class:`~tidings.EventBus` the app's event emitter backend and registers
every listener of ``listeners=[...]`` on it. From then on:

* an event emitted while a request runs is handled after its response has been sent (Litestar's
  own emitter starts listeners while the request is still running);
* an event nobody listens to is a no-op (Litestar's own emitter raises, which turns the request
  into a 500);
* a listener that raises or times out does not affect the others and is reported to the bus's
  ``on_failure`` hook, retried by its ``retry`` policy, kept as a dead letter;
* a plain ``def`` listener runs in tidings' worker thread, ``async def`` on the event loop;
* at shutdown the bus drains, within ``drain_timeout``, *before* the app's lifespan context
  managers and ``on_shutdown`` hooks close the resources listeners use;
* ``tidings.emit()``, typed events and handlers registered with ``bus.on(...)`` work alongside.

Listeners are called as Litestar calls them, with the emitted ``*args, **kwargs``.

Example:
    >>> from litestar import Litestar, Request, post
    >>> from litestar.events import listener
    >>> from litestar.testing import TestClient
    >>> from tidings.integrations.litestar import TidingsPlugin
    >>> @listener("user_created")
    ... async def send_welcome_email(email: str) -> None:
    ...     print("welcome", email)
    >>> @post("/users")
    ... async def create_user(request: Request) -> None:
    ...     user = await request.json()
    ...     request.app.emit("user_created", email=user["email"])
    ...     request.app.emit("nobody_listens")  # a no-op, not a 500
    >>> app = Litestar(
    ...     [create_user],
    ...     listeners=[send_welcome_email],
    ...     plugins=[TidingsPlugin()],
    ...     logging_config=None,  # leave the process's logging alone in this example
    ... )
    >>> with TestClient(app) as client:
    ...     print(client.post("/users", json={"email": "ada@example.com"}).status_code)
    welcome ada@example.com
    201

Litestar's event API (``BaseEventEmitterBackend``, ``EventListener``, ``InitPluginProtocol``,
``AppConfig.lifespan``/``on_shutdown``/``after_exception``) is public and unchanged across
Litestar 2.12 to 2.25, and so is what ``request_errors="drop"`` relies on: ``after_exception``
hooks run before Litestar answers the exception, with a response sent through the route's
middleware (the plugin's included), from inside it. Unwrapping a listener to its original function reads how
``EventListener`` wraps it, which is not, and falls back to Litestar's wrapper if that changes.
"""

from __future__ import annotations

import glob
import inspect
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

from .._core.bus import EventBus
from .._core.dispatcher import current_scope, reset_scope, set_scope
from .._core.envelope import Arguments
from .._core.runner import Job
from ..asgi.middleware import TidingsMiddleware
from ..exceptions import ConfigurationError

try:
    from litestar.events import BaseEventEmitterBackend, EventListener, SimpleEventEmitter
    from litestar.middleware import DefineMiddleware
    from litestar.plugins import InitPluginProtocol
    from litestar.utils.sync import AsyncCallable
except ImportError as exc:  # pragma: no cover - exercised only without Litestar installed
    raise ImportError("the Litestar integration needs Litestar: pip install 'tidings[litestar]'") from exc

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence
    from contextvars import Token
    from types import TracebackType

    from litestar import Litestar
    from litestar.config.app import AppConfig
    from litestar.types import ASGIApp
    from litestar.types import Scope as LitestarScope

    from .._core.dispatcher import Scope as EventScope
    from .._core.policies import RequestErrorPolicy
    from ..types import ASGIApp as TidingsASGIApp
    from ..types import Message, Send

__all__ = ["TidingsEventEmitter", "TidingsPlugin", "listener_function"]

# EventListener.__call__ wraps a listener as wrap_in_error_handler(ensure_async_callable(fn)).
_ERROR_WRAPPER = f"{EventListener.wrap_in_error_handler.__qualname__}.<locals>.wrapped"


def listener_function(listener: EventListener) -> Callable[..., Any]:
    """The function a Litestar listener was made from, as its author wrote it.

    Litestar stores ``listener.fn`` wrapped twice: in an error handler that logs and swallows
    exceptions (tidings' failure hook, retries and dead letters would never see one), and, for a
    plain ``def``, in an ``AsyncCallable`` that moves each call to a thread of its own (tidings
    batches sync calls into one thread hop per job). Both are taken off; decorators the author
    applied stay. Should a Litestar version wrap differently, ``listener.fn`` is returned as is:
    it still runs, only its errors are Litestar's to log.
    """
    fn: Any = listener.fn
    if getattr(fn, "__qualname__", None) == _ERROR_WRAPPER:
        code = getattr(fn, "__code__", None)
        closure = getattr(fn, "__closure__", None) or ()
        if code is not None and "fn" in code.co_freevars:
            fn = closure[code.co_freevars.index("fn")].cell_contents
    if isinstance(fn, AsyncCallable):
        fn = fn.func
    return cast("Callable[..., Any]", fn)


class TidingsEventEmitter(BaseEventEmitterBackend):
    """Litestar's event emitter backend, run by a tidings :class:`~tidings.EventBus`.

    :class:`TidingsPlugin` installs it; it is not meant to be named in ``event_emitter_backend``
    directly (Litestar builds the backend with nothing but the listeners).

    ``emit(event_id, *args, **kwargs)`` emits ``event_id`` on the bus, and listeners are called
    with exactly the arguments that were emitted. Inside a request the event waits for the
    response to be sent; elsewhere it goes to the bus at once. Nobody listening is a no-op.

    Entering it (Litestar does, first thing in the app's lifespan) starts the bus, so the app's
    lifespan context managers and ``on_startup`` hooks can emit. Leaving it does nothing: the
    plugin drains the bus before the app's shutdown code runs and closes it after.
    """

    __slots__ = ("_token", "bus")

    def __init__(self, listeners: Sequence[EventListener], *, plugin: TidingsPlugin) -> None:
        super().__init__(listeners)  # Litestar's index of listeners by event id, kept for its readers
        self.bus = plugin.bus
        self._token: Token[EventScope | None] | None = None
        plugin._app_built(listeners)

    def emit(self, event_id: Any, *args: Any, **kwargs: Any) -> None:
        """Emit ``event_id`` on the bus; its listeners are called with ``*args, **kwargs``.

        The payload bus handlers see is what :meth:`~tidings.EventBus.emit_now` makes of the same
        arguments: the argument itself when there is exactly one (a name with a schema validates
        it), an :class:`~tidings.Arguments` when there are several or any keyword, ``None`` when
        there are none. ``event_id`` may also be a typed tidings event (an instance of a dataclass
        or Pydantic model), emitted with no arguments.

        Raises:
            TypeError: ``event_id`` is neither a name nor a typed event, or a typed event came
                with arguments.
            EventValidationError: the payload does not fit the schema registered for the name.
        """
        if kwargs or len(args) != 1 or args[0] is None or type(args[0]) is Arguments:
            # None and Arguments stay arguments: as a bare payload they would mean something else
            self.bus.emit(event_id, Arguments(args, kwargs) if args or kwargs else None)
        else:
            self.bus.emit(event_id, args[0])

    async def __aenter__(self) -> TidingsEventEmitter:
        await self.bus.start()
        # tidings.emit() in lifespan code (and tasks it starts) goes to this bus, not to whichever
        # bus happens to run in the process; the plugin's final shutdown hook resets it.
        self._token = set_scope(self.bus.direct_scope)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        return None

    def _reset_scope(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            try:
                reset_scope(token)
            except ValueError:  # the lifespan ran its hooks in another context: nothing to undo here
                pass


class TidingsPlugin(InitPluginProtocol):
    """Runs a Litestar app's events on a tidings bus.

    On app init it sets the app's ``event_emitter_backend`` to :class:`TidingsEventEmitter`,
    registers every listener of ``listeners=[...]`` on the bus (each listener function one
    handler, subscribed to each of its event ids, called with the emitted ``*args, **kwargs``),
    and adds :class:`~tidings.TidingsMiddleware` as the app's outermost middleware, so that the
    events a request emits are handled after its response has been sent. Its lifespan hooks
    start the bus before the app's lifespan context managers and ``on_startup`` hooks, drain it
    (within the bus's ``drain_timeout``) before they close anything, and close it after the last
    ``on_shutdown`` hook, handling what shutdown code emitted.

    A plugin serves one app: each app gets its own bus.

    Args:
        bus: the bus to run the events on (register tidings handlers on it with ``bus.on``,
            give it a store, limits, retries); a new :class:`~tidings.EventBus` by default.
        request_errors: overrides the bus's policy for a request whose handler raised. With
            ``"drop"``, the events it emitted before the exception are dropped when Litestar
            answers the exception with a server error (status 500 or more), or the answer fails;
            an exception answered below 500 (a ``NotFoundException``, or what an exception handler
            of the app turns into a 409) leaves them delivered.

    Raises:
        ConfigurationError: ``bus`` is not an :class:`~tidings.EventBus`, or ``request_errors``
            is not a policy.

    Example:
        >>> from litestar import Litestar
        >>> from tidings import EventBus
        >>> from tidings.integrations.litestar import TidingsPlugin
        >>> bus = EventBus(drain_timeout=5)
        >>> @bus.on("user_created")
        ... async def audit(email: str) -> None: ...
        >>> app = Litestar(plugins=[TidingsPlugin(bus)], logging_config=None)
    """

    __slots__ = ("_config", "_drain_first", "bus", "request_errors")

    def __init__(
        self, bus: EventBus | None = None, *, request_errors: RequestErrorPolicy | None = None
    ) -> None:
        if bus is None:
            bus = EventBus()
        elif not isinstance(bus, EventBus):
            raise ConfigurationError(f"TidingsPlugin needs bus=EventBus(...), got {bus!r}")
        if request_errors not in (None, "drop", "deliver"):
            raise ConfigurationError(
                f"request_errors must be 'drop', 'deliver' or None, got {request_errors!r}"
            )
        self.bus = bus
        self.request_errors: RequestErrorPolicy = request_errors or bus.request_errors
        self._config: AppConfig | None = None
        self._drain_first = self._drain_before_shutdown_code

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Install the bus as the app's event emitter backend, with its middleware and lifespan hooks.

        Raises:
            ConfigurationError: the plugin serves another app already, or the app has an event
                emitter backend of its own.
        """
        if self._config is not None:
            raise ConfigurationError(
                "this TidingsPlugin serves another Litestar app already; give each app a plugin "
                "(and a bus) of its own, or events of one app would run the other's listeners"
            )
        if app_config.event_emitter_backend is not SimpleEventEmitter:
            raise ConfigurationError(
                f"the app has an event emitter backend already ({app_config.event_emitter_backend!r}); "
                "TidingsPlugin provides its own"
            )
        self._config = app_config
        plugin = self

        class _Emitter(TidingsEventEmitter):
            __slots__ = ()

            def __init__(self, listeners: Sequence[EventListener]) -> None:
                super().__init__(listeners, plugin=plugin)

        _Emitter.__name__ = _Emitter.__qualname__ = TidingsEventEmitter.__name__
        app_config.event_emitter_backend = _Emitter
        # Outermost, so that events emitted by the app's other middleware are the request's too.
        # Litestar types ASGI apps with its own TypedDicts; TidingsMiddleware takes any mapping.
        middleware = cast("Callable[..., ASGIApp]", _PluginMiddleware)
        app_config.middleware.insert(
            0, DefineMiddleware(middleware, bus=self.bus, request_errors=self.request_errors)
        )
        app_config.lifespan.append(self._drain_first)
        app_config.on_shutdown.append(self._close)
        if self.request_errors == "drop":
            # First: it notes how many events the request had emitted when it failed, and what the
            # app's own hooks emit about the failure must come after that count, not in it
            app_config.after_exception.insert(0, self._after_exception)
        return app_config

    def _app_built(self, listeners: Sequence[EventListener]) -> None:
        """Called by the backend, which Litestar builds after every plugin's ``on_app_init``."""
        config = self._config
        if config is not None:
            # Plugins listed after this one, and the app's stores, add lifespan managers and
            # shutdown hooks after ours; the drain must still come before all of them, and the
            # close after. (Litestar keeps these very lists; were it to copy them, ours would stay
            # where on_app_init put them: after the app's own lifespan managers.)
            _move_to_end(config.lifespan, self._drain_first)
            _move_to_end(config.on_shutdown, self._close)
            if self._after_exception in config.after_exception:  # (plugins listed before this one)
                config.after_exception.remove(self._after_exception)
                config.after_exception.insert(0, self._after_exception)
        self._register(listeners)

    def _register(self, listeners: Sequence[EventListener]) -> None:
        # One handler per listener function, subscribed to every id any listener gave it.
        event_ids: dict[int, tuple[Any, list[str]]] = {}
        for listener in listeners:
            fn = listener_function(listener)
            _, ids = event_ids.setdefault(id(fn), (fn, []))
            ids.extend(sorted(i for i in listener.event_ids if i not in ids))
        bus = self.bus
        for fn, ids in event_ids.values():
            target = fn
            # tidings would take an object's handle()/handle_many() for its entry point; Litestar calls it
            if not inspect.isroutine(fn) and (hasattr(fn, "handle") or hasattr(fn, "handle_many")):
                target = fn.__call__
            # Litestar matches ids exactly: "order[1]" or "what?" must not become tidings wildcards
            exact = [glob.escape(event_id) for event_id in ids]
            bus.subscribe(target, *exact, name=_free_name(bus, target), bind="arguments")

    @asynccontextmanager
    async def _drain_before_shutdown_code(self, app: Litestar) -> AsyncIterator[None]:
        self.bus.app = app
        # entered after the app's own lifespan managers: OpenTelemetry set up there is seen now
        self.bus.detect_tracing()
        try:
            yield
        finally:
            await self.bus.begin_shutdown()

    async def _close(self, app: Litestar) -> None:
        try:
            await self.bus.aclose()
        finally:
            emitter = app.event_emitter
            if isinstance(emitter, TidingsEventEmitter):
                emitter._reset_scope()

    async def _after_exception(self, exc: Exception, scope: LitestarScope) -> None:
        # Litestar answers a route's exception with an error response inside the route's middleware,
        # so TidingsMiddleware sees the request return. Which response that is (an exception handler
        # of the app's may make a 409 of it) is known only when it starts: note the exception for
        # _judging_answers. An answer that itself fails raises through the middleware, which judges it.
        events = current_scope()
        if (
            isinstance(events, Job)
            and events.bus is self.bus
            and events.buffer is not None
            and not events.response_status  # a response under way: what follows is the middleware's
            and events.answered_error is None  # the first exception is the one the request failed with
        ):
            events.answered_error = (type(exc).__name__, len(events.buffer))


class _PluginMiddleware(TidingsMiddleware):
    """:class:`~tidings.TidingsMiddleware`, whose ``"drop"`` also judges the exceptions Litestar answers.

    Its response tracking drops the events of a request whose exception (noted by the plugin's
    ``after_exception`` hook) was answered with a server error, as the middleware drops those of a
    request it sees raise before a response below 500.
    """

    __slots__ = ()

    def __init__(
        self, app: TidingsASGIApp, *, bus: EventBus, request_errors: RequestErrorPolicy | None = None
    ) -> None:
        super().__init__(app, bus=bus, request_errors=request_errors)
        if self.track_response is not None:
            self.track_response = _judging_answers


def _judging_answers(events: Job, send: Send) -> Send:
    async def tracking_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status = events.response_status = message["status"]
            if status >= 500 and events.answered_error is not None and events.buffer is not None:
                error, emitted = events.answered_error
                later = events.buffer[emitted:]
                del events.buffer[emitted:]
                events.bus.discard_request_events(
                    events,
                    f"the app raised {error}, which Litestar answered with a {status} "
                    "(request_errors='drop')",
                )
                # What the error handling emitted (an exception handler's events) reports the
                # failure rather than work the failure undid: it is kept, for after the response.
                events.buffer = later
        await send(message)

    return tracking_send


def _move_to_end(items: list[Any], item: object) -> None:
    if item in items:
        items.remove(item)
        items.append(item)


def _free_name(bus: EventBus, target: Callable[..., Any]) -> str:
    """The handler name of ``target``: its dotted name, numbered if another function has it.

    Litestar accepts listeners that share a name (made by a factory, say); tidings names
    handlers uniquely, for its event log and dead letters.
    """
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    base = name = f"{module}.{qualname}"
    number = 1
    while (existing := bus.registry.named(name)) is not None and existing.target is not target:
        number += 1
        name = f"{base}#{number}"
    return name
