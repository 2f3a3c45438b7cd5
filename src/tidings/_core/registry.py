"""Which handlers run for which event name: exact names and shell-style wildcards."""

from __future__ import annotations

import fnmatch
import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import ConfigurationError
from .binding import BindingStyle, Plan, dependency_parameters, plan_handler
from .policies import NO_RETRY, RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from .schemas import Schema


__all__ = ["HandlerSpec", "Registry", "Subscription", "is_pattern"]

_WILDCARD_CHARS: Final = frozenset("*?[")
# Event names are usually a small fixed set; the bound only protects against names built from data.
_CACHE_LIMIT: Final = 4096


def is_pattern(name: str) -> bool:
    """Whether ``name`` holds a shell-style wildcard (``*``, ``?`` or ``[...]``)."""
    return not _WILDCARD_CHARS.isdisjoint(name)


def _qualname(target: object) -> str:
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}"


def _is_async_callable(target: object) -> bool:
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(target, "__call__", None)  # noqa: B004 - an async __call__ on an instance
    return call is not None and inspect.iscoroutinefunction(call)


def _batch_call(handle_many: Callable[[list[Any]], Any]) -> Callable[[tuple[Any, ...]], Any]:
    """Give each batch call a list of its own, so a handler that mutates it harms nothing else."""

    def call(events: tuple[Any, ...]) -> Any:
        return handle_many(list(events))

    return call


def _refuse_uncallable(call: Callable[..., Any], label: str, what: str) -> None:
    """Refuse a method that cannot be called with one argument (the event, or the batch)."""
    try:
        signature = inspect.signature(call)
    except (TypeError, ValueError):  # no signature to read (a builtin): it is called as it is
        return
    try:
        signature.bind(None)
    except TypeError as exc:
        raise ConfigurationError(
            f"handler {label}: {what} cannot be called with the event alone ({exc})"
        ) from None


def _refuse_dependencies(call: Callable[..., Any], label: str, what: str) -> None:
    """Fail at registration for dependencies nobody would solve: only planned handlers get them.

    A batch call takes a list and an object's method is its own entry point, so neither goes
    through the plan that solves dependencies for each event.
    """
    names = dependency_parameters(call)
    if names:
        raise ConfigurationError(
            f"handler {label}: {what} declares FastAPI dependencies ({', '.join(map(repr, names))}), "
            "but tidings solves dependencies only for handler functions that take one event per "
            "call, so nothing would fill them; register a function (without batch=True) for the "
            "work that needs them, or open those resources in the handler itself"
        )


@dataclass(frozen=True, slots=True, eq=False)
class HandlerSpec:
    """A registered handler, resolved once at registration.

    Attributes:
        name: dotted name used in logs and reports.
        call: what the runner calls: with one ``Event``, or with a tuple of events when ``batch``
            (the handler itself receives a list of its own).
        is_async: whether ``call`` returns an awaitable (run on the loop) or not (run in a thread).
        batch: whether ``call`` takes every matching event of one flush at once.
        timeout: seconds one call (one attempt) may take, or ``None`` for no limit.
        target: the function or object that was registered.
        retry: when a failed call is tried again, and when it becomes a dead letter.
        plan: what the handler's parameters ask for (``None`` for objects with ``handle``/``handle_many``).
    """

    name: str
    call: Callable[[Any], Any]
    is_async: bool
    batch: bool
    timeout: float | None
    target: object
    retry: RetryPolicy = NO_RETRY
    plan: Plan | None = None

    @classmethod
    def from_target(
        cls,
        target: object,
        *,
        batch: bool,
        timeout: float | None,
        retry: RetryPolicy = NO_RETRY,
        name: str | None = None,
        schemas: list[Schema] | None = None,
        style: BindingStyle = "auto",
        dependencies: Callable[[Plan], Callable[[Any], Any]] | None = None,
    ) -> HandlerSpec:
        """Inspect ``target`` once: a function, an async callable, or an object with ``handle_many``.

        A function's parameters are bound as :mod:`tidings._core.binding` describes; ``schemas``
        are those of the events it is registered for, ``dependencies`` turns a plan with FastAPI
        dependencies into an async call.

        Raises:
            ConfigurationError: ``target`` is not callable and has no ``handle_many``/``handle``,
                a signature its events cannot satisfy, FastAPI dependencies on a batch call or an
                object's method (only a function called with one event gets them solved), or a
                bad timeout, retry policy or name.
        """
        if not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        if name is not None and not _storable_name(name):
            raise ConfigurationError(
                "a handler name must be a non-empty str without '/' or NUL that UTF-8 can encode "
                f"(the event log keeps it as text), got {name!r}"
            )
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"handler timeout must be > 0 seconds or None, got {timeout!r}")
        call: Callable[[Any], Any]
        handle_many = getattr(target, "handle_many", None)
        handle = getattr(target, "handle", None)
        if isinstance(target, type) and (callable(handle_many) or callable(handle)):
            # its methods would be called unbound, with the events as self: every event a failure
            raise ConfigurationError(
                f"{target.__qualname__} is a class: register an instance of it "
                f"(subscribe({target.__qualname__}(), ...))"
            )
        if not inspect.isroutine(target) and callable(handle_many):
            call, batch = handle_many, True
        elif not inspect.isroutine(target) and callable(handle):
            call = handle
        elif callable(target):
            call = target
        else:
            raise ConfigurationError(
                f"a handler must be callable or have a handle_many()/handle() method, got {target!r}"
            )
        is_async = _is_async_callable(call)
        label = _qualname(target) if name is None else name
        plan: Plan | None = None
        if call is target and not batch:
            plan = plan_handler(call, label, schemas=schemas or [], style=style)
            if plan.dependencies:
                if dependencies is None:
                    raise ConfigurationError(
                        f"handler {label} declares FastAPI dependencies, which need FastAPI"
                    )
                call, is_async = dependencies(plan), True
            else:
                call = plan.build()
        else:
            what = (
                "a batch handler"
                if call is target
                else "its handle_many()"
                if call is handle_many
                else "its handle()"
            )
            _refuse_dependencies(call, label, what)
            _refuse_uncallable(call, label, what)
        if batch:
            call = _batch_call(call)  # type: ignore[arg-type]  # a batch call takes the list
        return cls(
            name=label,
            call=call,
            is_async=is_async,
            batch=batch,
            timeout=timeout,
            target=target,
            retry=retry,
            plan=plan,
        )


@dataclass(frozen=True, slots=True)
class Subscription:
    """One (pattern, handler) registration, in registration order."""

    pattern: str
    handler: HandlerSpec
    matches: Callable[[str], bool]


class Registry:
    """Maps event names to handlers.

    Handlers for a name are returned in registration order, exact and wildcard registrations interleaved
    as they were made, each once however many of its patterns match. A name's handler tuple is computed
    once and cached; any new registration clears the cache. Wildcards use ``fnmatch`` rules,
    case-sensitive: ``*`` matches any run of characters, dots included (``user.*`` matches
    ``user.created`` and ``user.email.changed``).
    """

    __slots__ = ("_cache", "_subscriptions", "cached")

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        self._cache: dict[str, tuple[HandlerSpec, ...]] = {}
        self.cached: Callable[[str], tuple[HandlerSpec, ...] | None] = self._cache.get
        """The handlers :meth:`resolve` found for a name already, or ``None``: a C call, no frame."""

    def add(self, pattern: str, handler: HandlerSpec) -> None:
        """Register ``handler`` for ``pattern`` (an exact name or a wildcard).

        Raises:
            ConfigurationError: the pattern is empty or not a string, or another handler has the
                same name (the event log and dead letters name handlers, so names must be unique).
        """
        if not isinstance(pattern, str) or not pattern:
            raise ConfigurationError(f"an event name or pattern must be a non-empty str, got {pattern!r}")
        existing = self.named(handler.name)
        if existing is not None and existing.target is not handler.target:
            raise ConfigurationError(
                f"two different handlers are named {handler.name!r}; give one of them name=... "
                "(the event log and dead letters refer to handlers by name)"
            )
        matches: Callable[[str], bool]
        if is_pattern(pattern):
            matches = re.compile(fnmatch.translate(pattern)).match  # type: ignore[assignment]
        else:
            matches = pattern.__eq__
        self._subscriptions.append(Subscription(pattern, handler, matches))
        self._cache.clear()

    def resolve(self, name: str) -> tuple[HandlerSpec, ...]:
        """Return the handlers for event ``name``, in registration order (cached)."""
        try:
            return self._cache[name]
        except KeyError:
            pass
        # One handler per name, at its first match: a handler under two patterns that both match
        # runs once (the event log keys a delivery by event and handler name).
        found: dict[str, HandlerSpec] = {}
        for subscription in self._subscriptions:
            if subscription.matches(name):
                found.setdefault(subscription.handler.name, subscription.handler)
        handlers = tuple(found.values())
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[name] = handlers
        return handlers

    def snapshot(self) -> list[Subscription]:
        """The registrations as they are now, for :meth:`restore`."""
        return list(self._subscriptions)

    def restore(self, snapshot: list[Subscription]) -> None:
        """Put back the registrations of a :meth:`snapshot` (a registration that was refused)."""
        self._subscriptions = list(snapshot)
        self._cache.clear()

    def replace(self, old: HandlerSpec, new: HandlerSpec) -> None:
        """Put ``new`` in every place ``old`` was registered (the handler planned again)."""
        self._subscriptions = [
            Subscription(s.pattern, new, s.matches) if s.handler is old else s for s in self._subscriptions
        ]
        self._cache.clear()

    def named(self, name: str) -> HandlerSpec | None:
        """The handler registered under ``name`` (how the event log refers to it), if any."""
        for subscription in self._subscriptions:
            if subscription.handler.name == name:
                return subscription.handler
        return None

    def __iter__(self) -> Iterator[Subscription]:
        return iter(tuple(self._subscriptions))

    def __len__(self) -> int:
        return len(self._subscriptions)


def _storable_name(name: object) -> bool:
    if not isinstance(name, str) or not name or "/" in name or "\x00" in name:
        return False
    try:
        name.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True
