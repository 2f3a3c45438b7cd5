"""Test helpers: capture the events code emits, assert on them, wait for handlers to finish.

The pytest plugin (:mod:`tidings.pytest_plugin`) builds its fixtures on these; they work without
pytest too.

* :func:`capture` records every event emitted on some buses, at emit time (before any handler
  runs, request events included), with ``assert_emitted`` / ``assert_not_emitted`` that match by
  name, wildcard, typed event class and payload fields, and say what *was* emitted when they fail.
* :func:`settle` (``await``) and :func:`settle_sync` (from a sync test, with Starlette's
  ``TestClient``) wait until a bus has no handler work left: jobs, chained events, retries due soon.
* :func:`inline_handlers` makes a bus run each request's handlers in the request itself, so a test
  client's call returns once they are done (the default unless a bus has
  ``request_handlers="task"``).

Example:
    >>> from tidings import EventBus
    >>> from tidings.testing import capture
    >>> bus = EventBus()
    >>> def register(email: str) -> None:  # the code under test
    ...     bus.emit("user.created", {"email": email, "id": 7})
    >>> with capture(bus) as events:
    ...     register("ada@example.com")
    >>> events.assert_emitted("user.created", email="ada@example.com")
    Event(name='user.created', payload={'email': 'ada@example.com', 'id': 7}, id=...)
    >>> events.assert_not_emitted("user.deleted")
"""

from __future__ import annotations

import asyncio
import difflib
import enum
import fnmatch
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from time import monotonic
from typing import TYPE_CHECKING, Any, Final

from ._core.bus import BusState, EventBus
from ._core.default import default_bus
from ._core.dispatcher import normalize_name
from ._core.envelope import Arguments
from ._core.registry import is_pattern
from ._core.schemas import event_name_of, is_event_class

if TYPE_CHECKING:
    from types import TracebackType

    from ._core.envelope import Event

__all__ = [
    "BusLeftRunningWarning",
    "EventCapture",
    "capture",
    "inline_handlers",
    "settle",
    "settle_sync",
]


class BusLeftRunningWarning(UserWarning):
    """A test started a bus and left it running on an open event loop.

    The pytest plugin warns with it at the end of such a test, and stops the bus from receiving
    the next tests' events (``emit()`` outside any request goes to the one running bus). Close
    buses with ``async with bus:``, the app's lifespan (``with TestClient(app):``) or
    ``await bus.aclose()``.
    """


class _Any(enum.Enum):
    ANY = "ANY"


_ANY: Final = _Any.ANY  # "any payload": None is a payload like any other
_MISSING: Final = object()
_LISTED: Final = 20  # events a failure message lists before it summarises the rest
_REPR: Final = 120


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR else text[: _REPR - 3] + "..."


def _field(payload: object, name: str) -> object:
    """The field ``name`` of a payload (a mapping's key, a model's or dataclass's attribute)."""
    if isinstance(payload, Arguments):
        return payload.kwargs.get(name, _MISSING)
    if isinstance(payload, Mapping):
        return payload.get(name, _MISSING)
    if payload is None or type(payload).__module__ == "builtins":
        return _MISSING  # no fields, only methods: never match `upper=...` against a str
    return getattr(payload, name, _MISSING)


class _Match:
    """What an assertion looks for: an event name, pattern or class, a payload, payload fields."""

    __slots__ = ("cls", "fields", "kind_label", "label", "name", "names", "pattern", "payload")

    def __init__(
        self, event: object, payload: object, fields: Mapping[str, object], buses: tuple[EventBus, ...]
    ) -> None:
        self.name: str | None = None
        self.names: tuple[str, ...] = ()  # every name the event may have, ``name`` first
        self.pattern: Callable[[str], object] | None = None
        self.cls: type | None = None
        if event is None:
            label = "any event"
        elif isinstance(event, enum.Enum):
            self.names = _enum_names(event)
            self.name = self.names[0]
            if is_pattern(self.name):
                self.pattern = re.compile(fnmatch.translate(self.name)).match
            label = " or ".join(repr(name) for name in self.names)
        elif isinstance(event, str):
            self.name = normalize_name(event)
            self.names = (self.name,)
            if is_pattern(self.name):
                self.pattern = re.compile(fnmatch.translate(self.name)).match
            label = repr(self.name)
        elif isinstance(event, type):
            self.cls = event
            label = event.__qualname__
        elif is_event_class(type(event)):  # an instance: that event, with that payload
            if payload is not _ANY:
                raise TypeError("give a typed event or a payload to compare with, not both")
            # the name the captured buses give it: a class registered with bus.schema(cls, name=...)
            # is emitted under that name, not its own
            cls = type(event)
            self.names = tuple(dict.fromkeys(bus.schemas.name_for(cls) for bus in buses)) or (
                event_name_of(cls),
            )
            self.name = self.names[0]
            payload = event
            label = " or ".join(repr(name) for name in self.names)
        else:
            raise TypeError(
                "expected an event name (str or Enum), a wildcard pattern, a typed event class or "
                f"instance, or None, got {type(event).__name__}"
            )
        self.kind_label = label
        self.payload = payload
        self.fields = dict(fields)
        details = [] if payload is _ANY else [f"payload {_short(payload)}"]
        details += [f"{key}={value!r}" for key, value in self.fields.items()]
        self.label = label + (f" with {', '.join(details)}" if details else "")

    def kind(self, event: Event) -> bool:
        """Whether the event has the wanted name (or pattern, or class), whatever its payload."""
        if self.pattern is not None:
            return bool(self.pattern(event.name)) or event.name in self.names[1:]
        if self.name is not None:
            return event.name in self.names
        if self.cls is not None:
            cls = self.cls
            return isinstance(event.payload, cls) or (
                is_event_class(cls) and event.name == event_name_of(cls)
            )
        return True

    def differences(self, event: Event) -> list[str]:
        """How the event's payload differs from the wanted one (empty: it matches)."""
        found: list[str] = []
        if self.payload is not _ANY and not bool(self.payload == event.payload):
            found.append("another payload")
        for key, expected in self.fields.items():
            value = _field(event.payload, key)
            if value is _MISSING:
                found.append(f"no field {key!r}")
            elif not bool(expected == value):
                found.append(f"{key} is {_short(value)}, not {_short(expected)}")
        return found

    def __call__(self, event: Event) -> bool:
        return self.kind(event) and not self.differences(event)


def _enum_names(member: enum.Enum) -> tuple[str, ...]:
    """The names an event emitted with ``member`` has: ``emit()``'s, then fastapi-events' ``dispatch()``'s.

    ``tidings.emit()`` names it by its value (a ``str``); ``tidings.compat.fastapi_events``'s
    ``dispatch()`` as fastapi-events does, by ``str(member)`` (``"UserEvents.SIGNED_UP"``) unless the
    member is a ``str`` itself. A ``StrEnum`` member has one name; a plain one, two (or only the
    second, if its value is no ``str``).
    """
    from .compat.fastapi_events._support import matched_name

    names: list[str] = []
    try:
        names.append(normalize_name(member))
    except TypeError:  # a value emit() refuses, such as an int: only dispatch() names it
        pass
    dispatched = matched_name(member)
    if dispatched not in names:
        names.append(dispatched)
    return tuple(names)


def _line(index: int, event: Event) -> str:
    return f"  #{index} {event.name} {_short(event.payload)}"


class EventCapture:
    """Every event emitted on some buses while it is open, in emit order.

    Made by :func:`capture` (or the pytest plugin's ``tidings_events`` fixture). It records what
    the code under test *emitted*, when it emitted it, through :meth:`EventBus.tap
    <tidings.EventBus.tap>`: events of requests before their response is sent, events nobody
    handles, events of requests that fail. Whether handlers ran is another matter: see
    :meth:`settle`. Events emitted by handlers (chains) are recorded when those handlers emit them.
    Each captured :class:`~tidings.Event` has the emit's name, payload and headers; its ``id`` is
    its own, not that of the envelope handlers get.

    The assertion methods take the event as their first argument:

    * ``"user.created"``: that name; ``"user.*"``: a wildcard, as in ``bus.on``;
    * ``UserEvents.SIGNED_UP``, an Enum member: the name ``emit()`` gives it (its value) or the one
      fastapi-events' ``dispatch()`` gives it (``str(member)`` for a plain Enum), whichever it has;
    * ``UserCreated``, a class: events whose payload is an instance of it, or (for a typed event
      class) that were emitted under its event name;
    * ``UserCreated(id=1, ...)``, a typed event: that name, with a payload equal to it;
    * ``None`` (or nothing): any event.

    then, optionally, the payload the event must have (compared with ``==``), and keyword
    arguments for single fields of the payload: keys of a ``dict``, attributes of a model or
    dataclass, keyword arguments of an :class:`~tidings.Arguments` payload. Expected values are
    compared with ``==``, so ``unittest.mock.ANY`` and ``pytest.approx`` work.

    Thread-safe: events are recorded from whichever thread emits them (sync endpoints, sync
    handlers, a test client's event loop thread).

    Example:
        >>> from dataclasses import dataclass
        >>> from tidings import EventBus
        >>> from tidings.testing import capture
        >>> @dataclass
        ... class UserCreated:
        ...     __event_name__ = "user.created"
        ...     id: int
        ...     email: str
        >>> bus = EventBus()
        >>> with capture(bus) as events:
        ...     bus.emit(UserCreated(id=1, email="ada@example.com"))
        ...     bus.emit("audit.logged", {"action": "signup"})
        >>> events.names
        ['user.created', 'audit.logged']
        >>> events.assert_emitted(UserCreated, id=1).payload.email
        'ada@example.com'
        >>> events.assert_emitted(UserCreated(id=1, email="ada@example.com")).name
        'user.created'
        >>> events.assert_emitted("audit.*", action="signup").name
        'audit.logged'
        >>> events.assert_emitted("user.created", id=2)
        Traceback (most recent call last):
          ...
        AssertionError: no event 'user.created' with id=2 was emitted.
        Events 'user.created' that differ (1):
          #1 user.created UserCreated(id=1, email='ada@example.com'): id is 1, not 2
        Every event emitted (2), in order:
          #1 user.created UserCreated(id=1, email='ada@example.com')
          #2 audit.logged {'action': 'signup'}
    """

    def __init__(self, buses: tuple[EventBus, ...]) -> None:
        # each once: a bus named twice (an app's bus that is also the default bus) would record every
        # event of it twice
        self.buses = tuple(dict.fromkeys(buses))
        """The buses whose events are captured."""
        self._events: list[Event] = []
        self._changed = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._untaps = [bus.tap(self._record) for bus in self.buses]

    def _record(self, event: Event) -> None:
        with self._changed:
            self._events.append(event)
            waiters, self._waiters = self._waiters, []
            self._changed.notify_all()
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # that loop has closed: nobody waits there any more
                pass

    # -- reading ---------------------------------------------------------------------------------
    @property
    def events(self) -> list[Event]:
        """The events captured so far, in emit order (a copy)."""
        with self._changed:
            return list(self._events)

    @property
    def names(self) -> list[str]:
        """The names of the events captured so far, in emit order."""
        return [event.name for event in self.events]

    def find(self, event: object = None, payload: object = _ANY, /, **fields: object) -> list[Event]:
        """The captured events that match, in emit order (see the class docs for how to match).

        Raises:
            TypeError: ``event`` is not a name, pattern, class, typed event or ``None``.
        """
        match = _Match(event, payload, fields, self.buses)
        return [captured for captured in self.events if match(captured)]

    def payloads(self, event: object = None, /, **fields: object) -> list[Any]:
        """The payloads of the captured events that match, in emit order.

        Example:
            >>> from tidings import EventBus
            >>> from tidings.testing import capture
            >>> bus = EventBus()
            >>> with capture(bus) as events:
            ...     bus.emit("order.placed", {"id": 1, "total": 10})
            ...     bus.emit("order.placed", {"id": 2, "total": 25})
            >>> [order["id"] for order in events.payloads("order.placed")]
            [1, 2]
        """
        return [captured.payload for captured in self.find(event, _ANY, **fields)]

    def __len__(self) -> int:
        with self._changed:
            return len(self._events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def clear(self) -> None:
        """Forget the events captured so far (say, those of a test's setup)."""
        with self._changed:
            self._events.clear()

    # -- asserting -------------------------------------------------------------------------------
    def assert_emitted(self, event: object = None, payload: object = _ANY, /, **fields: object) -> Event:
        """Assert that a matching event was emitted; return the first one.

        Raises:
            AssertionError: none was; the message lists what was emitted, closest first.
            TypeError: ``event`` is not a name, pattern, class, typed event or ``None``.
        """
        match = _Match(event, payload, fields, self.buses)
        events = self.events
        for captured in events:
            if match(captured):
                return captured
        raise AssertionError(self._missing(match, events, "was emitted"))

    def assert_emitted_once(self, event: object = None, payload: object = _ANY, /, **fields: object) -> Event:
        """Assert that exactly one matching event was emitted; return it.

        Raises:
            AssertionError: none or several were.
            TypeError: ``event`` is not a name, pattern, class, typed event or ``None``.
        """
        match = _Match(event, payload, fields, self.buses)
        events = self.events
        found = [(index, captured) for index, captured in enumerate(events, 1) if match(captured)]
        if not found:
            raise AssertionError(self._missing(match, events, "was emitted"))
        if len(found) > 1:
            lines = [f"{match.label} was emitted {len(found)} times, not once:"]
            lines += [_line(index, captured) for index, captured in found]
            raise AssertionError("\n".join(lines))
        return found[0][1]

    def assert_not_emitted(self, event: object = None, payload: object = _ANY, /, **fields: object) -> None:
        """Assert that no matching event was emitted (with no arguments: that none was at all).

        Raises:
            AssertionError: one was; the message lists each.
            TypeError: ``event`` is not a name, pattern, class, typed event or ``None``.
        """
        match = _Match(event, payload, fields, self.buses)
        found = [(index, captured) for index, captured in enumerate(self.events, 1) if match(captured)]
        if found:
            lines = [f"expected no {match.label}, but {len(found)} event(s) were emitted:"]
            lines += [_line(index, captured) for index, captured in found[:_LISTED]]
            if len(found) > _LISTED:
                lines.append(f"  ... and {len(found) - _LISTED} more")
            raise AssertionError("\n".join(lines))

    def _missing(self, match: _Match, events: list[Event], outcome: str) -> str:
        lines = [
            f"no event {match.label} {outcome}." if match.label != "any event" else f"no event {outcome}."
        ]
        if not events:
            names = ", ".join(repr(bus.name) for bus in self.buses)
            lines.append(
                f"No event at all was emitted on the captured bus(es) {names}. If the code under test "
                "emits on another bus, capture that one (the pytest plugin captures on the bus of the "
                "`tidings_bus` fixture: override it, or set `tidings_bus = module:attribute` in the "
                "pytest configuration)."
            )
            return "\n".join(lines)
        near = [(index, captured) for index, captured in enumerate(events, 1) if match.kind(captured)]
        if near and (match.payload is not _ANY or match.fields):
            lines.append(f"Events {match.kind_label} that differ ({len(near)}):")
            for index, captured in near[:_LISTED]:
                lines.append(f"{_line(index, captured)}: {', '.join(match.differences(captured))}")
        elif match.name is not None and match.pattern is None:
            emitted = sorted({captured.name for captured in events})
            close = [near for name in match.names for near in difflib.get_close_matches(name, emitted, n=3)]
            close = list(dict.fromkeys(close))[:3]
            if close:
                lines.append("Did you mean " + " or ".join(repr(name) for name in close) + "?")
        lines.append(f"Every event emitted ({len(events)}), in order:")
        lines += [_line(index, captured) for index, captured in enumerate(events[:_LISTED], 1)]
        if len(events) > _LISTED:
            lines.append(f"  ... and {len(events) - _LISTED} more")
        return "\n".join(lines)

    # -- waiting ---------------------------------------------------------------------------------
    async def wait_for(
        self, event: object = None, payload: object = _ANY, /, *, timeout: float = 5.0, **fields: object
    ) -> Event:
        """Wait until a matching event has been emitted (at once if one was already); return it.

        For events emitted later by code the test does not await: a task the endpoint started,
        a handler of another event, a thread. (A payload field named ``timeout`` cannot be
        matched here; compare ``payload`` or use :meth:`find`.)

        Raises:
            AssertionError: none was within ``timeout`` seconds; the message lists what was.
        """
        match = _Match(event, payload, fields, self.buses)
        loop = asyncio.get_running_loop()
        deadline = monotonic() + timeout
        while True:
            with self._changed:
                for captured in self._events:
                    if match(captured):
                        return captured
                events = list(self._events)
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, waiter))
            remaining = deadline - monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise AssertionError(self._missing(match, events, f"was emitted within {timeout}s")) from None
            finally:
                with self._changed:
                    if (loop, waiter) in self._waiters:
                        self._waiters.remove((loop, waiter))

    def wait_for_sync(
        self, event: object = None, payload: object = _ANY, /, *, timeout: float = 5.0, **fields: object
    ) -> Event:
        """:meth:`wait_for` for sync tests: block this thread until a matching event was emitted.

        Raises:
            AssertionError: none was within ``timeout`` seconds; the message lists what was.
            RuntimeError: called from a thread that runs an event loop (it would block it; use
                ``await wait_for(...)``).
        """
        _refuse_on_a_loop("wait_for_sync()", "await capture.wait_for(...)")
        match = _Match(event, payload, fields, self.buses)
        found: list[Event] = []

        def seen() -> bool:
            found.extend(captured for captured in self._events if match(captured))
            return bool(found)

        with self._changed:
            if self._changed.wait_for(seen, timeout):
                return found[0]
            events = list(self._events)
        raise AssertionError(self._missing(match, events, f"was emitted within {timeout}s"))

    async def settle(self, timeout: float = 5.0) -> None:
        """:func:`settle` the captured buses: wait until they have no handler work left.

        Raises:
            TimeoutError: work was left after ``timeout`` seconds; the message lists it.
        """
        await settle(*self.buses, timeout=timeout)

    def settle_sync(self, timeout: float = 5.0) -> None:
        """:func:`settle_sync` the captured buses (for sync tests, e.g. with ``TestClient``).

        Raises:
            TimeoutError: work was left after ``timeout`` seconds; the message lists it.
            RuntimeError: called from a thread that runs an event loop (use ``await settle()``).
        """
        settle_sync(*self.buses, timeout=timeout)

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop capturing (the events captured so far stay readable). Idempotent."""
        untaps, self._untaps = self._untaps, []
        for untap in untaps:
            untap()

    def __enter__(self) -> EventCapture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        names = self.names
        shown = ", ".join(repr(name) for name in names[:10]) + (", ..." if len(names) > 10 else "")
        return f"<EventCapture {len(names)} event(s): {shown}>" if names else "<EventCapture no events>"


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _refuse_on_a_loop(what: str, instead: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{what} would block the event loop running in this thread; use {instead}")


def capture(*buses: EventBus) -> EventCapture:
    """Start capturing the events emitted on ``buses`` (default: :func:`tidings.default_bus`).

    Capturing starts at once and stops when the ``with`` block ends (or at
    :meth:`EventCapture.close`).

    Raises:
        TypeError: one of ``buses`` is not an :class:`~tidings.EventBus` (an app, a test client).

    Example:
        >>> from tidings import EventBus
        >>> from tidings.testing import capture
        >>> bus = EventBus()
        >>> with capture(bus) as events:
        ...     bus.emit("cart.emptied")
        >>> bus.emit("cart.filled")  # after the block: not captured
        >>> events.names
        ['cart.emptied']
    """
    _check_buses("capture()", buses)
    return EventCapture(buses or (default_bus(),))


def _check_buses(what: str, buses: tuple[object, ...]) -> None:
    for bus in buses:
        if not isinstance(bus, EventBus):
            raise TypeError(f"{what} takes EventBus objects, got {bus!r}")


# -- settling -----------------------------------------------------------------------------------------
def _is_busy(bus: EventBus, until: float) -> bool:
    """Whether a bus whose loop is not running has work that settling by ``until`` (monotonic) would
    wait for: nothing can finish it until the loop runs (a call left behind in its thread too: its
    end is passed to the loop)."""
    runner = bus._runner
    return bool(
        runner.jobs
        or bus._waiting()
        or runner.left_behind
        or runner.hook_tasks
        or any(retry.due <= until for retry in runner.retries)
    )


async def _settle_here(bus: EventBus, until: float) -> list[str] | None:
    """On the bus's loop: wait until it is idle, or return what is still pending at ``until``."""
    runner = bus._runner
    while bus.state in (BusState.RUNNING, BusState.DRAINING):
        bus._start_waiting()  # we wait on jobs
        if not await runner.wait_idle(until):
            return bus._pending_work()
        await asyncio.sleep(0)  # let emits scheduled by the last handlers (threads) land
        if not await bus._wait_emits_under_way(until):
            return bus._pending_work()
        if not bus._waiting() and runner.idle(until):
            # the failures' reports: an async on_failure hook's calls are bus tasks, as drain knows
            hooks = set(runner.hook_tasks)
            if not hooks:
                return None
            _, running = await asyncio.wait(hooks, timeout=max(0.0, until - monotonic()))
            if running:
                return bus._pending_work()  # (those hook calls among it)
            # then again: what the hook emitted, and failures of those events' handlers
    return None


def _running_loop_of(bus: EventBus) -> asyncio.AbstractEventLoop | None:
    loop = bus._loop
    if bus.state not in (BusState.RUNNING, BusState.DRAINING) or loop is None or loop.is_closed():
        return None  # not started, closed, or its loop is gone: no handler work can be pending
    return loop


_HOP: Final = 1.0  # beyond a settle's timeout: the hop to a test client's loop and back


def _settle_error(bus: EventBus, timeout: float, pending: list[str]) -> TimeoutError:
    shown = "\n".join(f"  {item}" for item in pending[:_LISTED])
    more = f"\n  ... and {len(pending) - _LISTED} more" if len(pending) > _LISTED else ""
    return TimeoutError(
        f"bus {bus.name!r} still had handler work after {timeout}s ({len(pending)} call(s)):\n{shown}{more}"
    )


def _unanswered(bus: EventBus, timeout: float) -> TimeoutError:
    """The bus's loop (another thread's) did not answer in time: most likely something blocks it."""
    try:
        pending = bus._pending_work()
    except RuntimeError:  # read from this thread while that loop changed it: no list, then
        pending = []
    error = _settle_error(bus, timeout, pending)
    return TimeoutError(
        f"{error}\n  (its event loop, in another thread, did not answer in time: a handler or other "
        "code may be blocking it)"
    )


def _stuck(bus: EventBus) -> RuntimeError:
    return RuntimeError(
        f"bus {bus.name!r} has handler work but its event loop is not running, so it cannot finish: "
        f"{', '.join(bus._pending_work()[:_LISTED])}"
    )


async def settle(*buses: EventBus, timeout: float = 5.0) -> None:
    """Wait until ``buses`` (default: :func:`tidings.default_bus`) have no handler work left.

    Handler work is every job running or queued (events emitted outside requests, events of
    requests whose handlers run in bus tasks, events those handlers emit in turn), every retry
    due within ``timeout`` (retries due later are left alone), and every call of an ``async def``
    ``on_failure`` hook, with what it emits. A bus that is not running has
    nothing to wait for. Nothing is cancelled: on timeout the work goes on, and the error says
    what it is. Works whichever event loop the bus runs on (that of the test, or a test client's
    in another thread).

    Raises:
        TimeoutError: work was left after ``timeout`` seconds; the message lists each call.
        RuntimeError: a bus has work but its event loop is not running.
        TypeError: one of ``buses`` is not an :class:`~tidings.EventBus`.

    Example:
        >>> import asyncio
        >>> from tidings import EventBus
        >>> from tidings.testing import settle
        >>> bus = EventBus()
        >>> sent = []
        >>> @bus.on("user.created")
        ... async def welcome(email: str) -> None:
        ...     sent.append(email)
        >>> async def main() -> None:
        ...     async with bus:
        ...         bus.emit("user.created", {"email": "ada@example.com"})  # runs in a bus task
        ...         await settle(bus)
        ...         print(sent)
        >>> asyncio.run(main())
        ['ada@example.com']
    """
    _check_buses("settle()", buses)
    deadline = monotonic() + timeout
    for bus in buses or (default_bus(),):
        loop = _running_loop_of(bus)
        if loop is None:
            continue
        if loop is asyncio.get_running_loop():
            pending = await _settle_here(bus, deadline)
        elif loop.is_running():  # a test client's loop, in its own thread
            future = asyncio.run_coroutine_threadsafe(_settle_here(bus, deadline), loop)
            try:  # bounded here too: that loop may be too blocked to keep the deadline itself
                pending = await asyncio.wait_for(
                    asyncio.wrap_future(future), max(0.0, deadline - monotonic()) + _HOP
                )
            except TimeoutError:
                future.cancel()
                raise _unanswered(bus, timeout) from None
        elif _is_busy(bus, deadline):
            raise _stuck(bus)
        else:
            continue
        if pending is not None:
            raise _settle_error(bus, timeout, pending)


def settle_sync(*buses: EventBus, timeout: float = 5.0) -> None:
    """:func:`settle` for sync tests: block until ``buses`` have no handler work left.

    Meant for tests that drive an app with Starlette's ``TestClient`` (whose event loop runs in
    a thread of its own); it must not be called from a thread that runs an event loop.

    Raises:
        TimeoutError: work was left after ``timeout`` seconds; the message lists each call.
        RuntimeError: called from a thread that runs an event loop (use ``await settle()``), or a
            bus has work but its event loop is not running.
        TypeError: one of ``buses`` is not an :class:`~tidings.EventBus`.
    """
    _refuse_on_a_loop("settle_sync()", "await settle(...)")
    _check_buses("settle_sync()", buses)
    deadline = monotonic() + timeout
    for bus in buses or (default_bus(),):
        loop = _running_loop_of(bus)
        if loop is None:
            continue
        if not loop.is_running():
            if _is_busy(bus, deadline):
                raise _stuck(bus)
            continue
        future = asyncio.run_coroutine_threadsafe(_settle_here(bus, deadline), loop)
        try:  # the coroutine keeps the deadline itself, unless something blocks its loop
            pending = future.result(max(0.0, deadline - monotonic()) + _HOP)
        except TimeoutError:
            future.cancel()
            raise _unanswered(bus, timeout) from None
        if pending is not None:
            raise _settle_error(bus, timeout, pending)


# -- inline handlers ------------------------------------------------------------------------------------
@contextmanager
def inline_handlers(*buses: EventBus) -> Iterator[None]:
    """Within the block, ``buses`` (default: :func:`tidings.default_bus`) run each request's
    handlers in the request's own task.

    With ``request_handlers="task"`` a bus hands a finished request's events to a bus task, so a
    test client's call returns before its handlers have run. In this block it runs them inline
    instead (the default mode): the call returns once they, and the events they emit, are done.
    Handlers of events emitted outside requests still run in bus tasks: wait for them with
    :func:`settle`. The bus's own setting is restored at the end.

    Raises:
        TypeError: one of ``buses`` is not an :class:`~tidings.EventBus`.

    Example:
        >>> from tidings import EventBus
        >>> from tidings.testing import inline_handlers
        >>> bus = EventBus(request_handlers="task")
        >>> with inline_handlers(bus):
        ...     bus.request_handlers
        'inline'
        >>> bus.request_handlers
        'task'
    """
    _check_buses("inline_handlers()", buses)
    buses = buses or (default_bus(),)  # as capture() and settle() (it used to do nothing)
    saved = [(bus, bus.request_handlers, bus.request_handlers_inline, bus.state) for bus in buses]
    for bus in buses:
        bus.request_handlers = "inline"  # read when the bus starts (a lifespan in the block)
        bus.request_handlers_inline = True  # read by the middleware of a bus running already
    try:
        yield
    finally:
        for bus, mode, inline, state in saved:
            bus.request_handlers = mode
            if bus.state is not BusState.RUNNING:
                bus.request_handlers_inline = mode == "inline"  # its next start sets it anyway
            elif state is BusState.RUNNING:
                bus.request_handlers_inline = inline
            elif not bus.started_lazily:  # started in the block, by its lifespan or by hand
                bus.request_handlers_inline = mode == "inline"
            # else: started in the block by a request (no lifespan), which needs inline: keep it
