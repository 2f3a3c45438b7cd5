"""The ``tidings`` command line.

``tidings list TARGET [--event PATTERN] [--json]``
    Every event name, wildcard pattern and typed event class the bus knows, with its handlers:
    name, sync or async, timeout and retry policy, and the ``file:line`` where each is defined.

``tidings dead-letters list|show|replay|purge --bus TARGET``
    Listing, showing and purging only read and write the bus's store; replaying starts the bus in
    this process (without taking over the app's backlog), runs each selected dead letter's
    handler once more, and waits for it.

``TARGET`` is ``module:attribute``, imported from the working directory like ``python -m`` does:
an :class:`~tidings.EventBus` (``myapp.events:bus``), or an app whose bus can be found
(``myapp.main:app``): a Starlette or FastAPI app with ``TidingsMiddleware(bus=...)`` among its
middleware (or another middleware holding its bus as ``bus``, like fastapi-events'
``EventHandlerASGIMiddleware``), a Litestar app with ``TidingsPlugin(bus)`` or that middleware, or
an ASGI app wrapped in ``TidingsMiddleware`` by hand. The attribute may be dotted
(``myapp.main:container.bus``). A module alone works when it holds exactly one bus (for ``list``:
its buses, else its apps'; values that fail when looked at, like an unbound lazy proxy, are
skipped). When an app has no bus of its own to show, ``list`` falls back to
:func:`tidings.default_bus`, if the app's code used it.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import functools
import importlib
import inspect
import json
import os
import sys
import sysconfig
import traceback
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TextIO, TypeGuard, runtime_checkable

from ._core import default as _default
from ._core.bus import EventBus
from ._core.logs import described
from ._core.registry import is_pattern
from .exceptions import StoreError, TidingsError
from .store._rows import naming_unreadable
from .store.postgres import PostgresStore
from .store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ._core.policies import RetryPolicy
    from ._core.registry import HandlerSpec
    from .store.base import DeadLetter
    from .types import ASGIApp

__all__ = ["UsageError", "buses_of", "load_bus", "load_buses", "main"]

_MISSING: Any = object()
_MAX_DEPTH = 64  # middleware layers followed through `.app` before giving up (a cycle, say)


class UsageError(Exception):
    """A command line that cannot be carried out; printed without a traceback."""


@runtime_checkable
class _LazyStack(Protocol):
    """An app that builds its middleware on its first call (Starlette, FastAPI)."""

    middleware_stack: ASGIApp | None

    def build_middleware_stack(self) -> ASGIApp: ...


def _import(module_name: str) -> ModuleType:
    if not module_name or module_name.startswith("."):
        raise UsageError(
            f"{module_name!r} is not a module name: give it in full, as for python -m (myapp.main:app)"
        )
    if "." not in sys.path and "" not in sys.path:
        sys.path.insert(0, "")  # like python -m: the app's own package from the working directory
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module's own code raised (a setting missing from the environment)
        frame = _app_frame(exc)
        where = f" (at {frame.filename}:{frame.lineno})" if frame is not None else ""
        raise UsageError(f"cannot import {module_name!r}: {described(exc)}{where}") from exc


def _app_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of ``exc``'s traceback in the app's code: not Python's, nor a library's."""
    paths = sysconfig.get_paths()
    outside = tuple({paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")})
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith("<") and not frame.filename.startswith(outside):
            return frame
    return frames[-1] if frames else None


def _attribute(module: ModuleType, target: str, attribute: str) -> object:
    found: object = module
    for part in attribute.split("."):
        found = getattr(found, part, _MISSING)
        if found is _MISSING:
            raise UsageError(f"{target}: {module.__name__} has no attribute {attribute!r}")
    return found


def buses_of(target: object) -> list[EventBus]:
    """The buses of an app (or the bus itself), in the order they are found, each once.

    Looks at: the middleware an app declares (Starlette and FastAPI ``user_middleware``,
    Litestar ``middleware``: any :class:`EventBus` among their arguments), the chain of wrapped
    apps, also inside a built Starlette middleware stack, for layers holding their bus as ``bus``
    (``TidingsMiddleware(app, bus=bus)``, fastapi-events' ``EventHandlerASGIMiddleware``), and
    plugins that hold a ``bus`` (Litestar's ``TidingsPlugin``). Nothing is built: middleware that
    makes its bus when Starlette builds the stack is not there before the app's first call.

    Example:
        >>> from starlette.applications import Starlette
        >>> from starlette.middleware import Middleware
        >>> from tidings import EventBus, TidingsMiddleware
        >>> bus = EventBus(name="shop")
        >>> app = Starlette(middleware=[Middleware(TidingsMiddleware, bus=bus)])
        >>> [found.name for found in buses_of(app)]
        ['shop']
    """
    found: list[EventBus] = []

    def add(value: object) -> None:
        if isinstance(value, EventBus) and all(value is not bus for bus in found):
            found.append(value)

    add(target)
    for name in ("user_middleware", "middleware"):  # Starlette/FastAPI, Litestar
        declared = getattr(target, name, None)
        if not isinstance(declared, list | tuple):
            continue  # FastAPI's `middleware` is a decorator
        for entry in declared:
            args = getattr(entry, "args", ())
            kwargs = getattr(entry, "kwargs", None) or getattr(entry, "options", None) or {}
            for value in (*(args if isinstance(args, tuple) else ()), *dict(kwargs).values()):
                add(value)
    for start in (target, getattr(target, "middleware_stack", None)):
        node, depth = start, 0
        while node is not None and depth < _MAX_DEPTH:
            # Any layer's `bus`, not only TidingsMiddleware's: one built on it (fastapi-events'
            # compat middleware) keeps there the bus it made. add() takes nothing but an EventBus.
            add(getattr(node, "bus", None))
            node, depth = getattr(node, "app", None), depth + 1
    plugins = getattr(target, "plugins", None)
    if plugins is not None and not isinstance(plugins, str | bytes):
        try:
            for plugin in plugins:
                add(getattr(plugin, "bus", None))
        except TypeError:  # not iterable
            pass
    return found


def _buses_of_app(target: object) -> list[EventBus]:
    """:func:`buses_of`, else the same after building the middleware of a Starlette app.

    Middleware may make its bus only when it is built (fastapi-events' ``EventHandlerASGIMiddleware``
    without ``bus=``), which Starlette does on the app's first call. Building runs the middleware's
    constructors (which may need the app's environment), a built app takes no more middleware and
    does not see exception handlers added later: so it is built only when nothing else shows a bus.
    The stack built is kept, as that first call would keep it, so that an app run in this process
    (under the pytest plugin) uses the bus found here.

    Raises:
        UsageError: building the middleware failed.
    """
    buses = buses_of(target)
    if buses or not isinstance(target, _LazyStack) or target.middleware_stack is not None:
        return buses
    try:
        target.middleware_stack = target.build_middleware_stack()
    except Exception as exc:  # the app's own middleware: anything it raises is the app's error
        raise UsageError(f"building the middleware of {type(target).__name__} failed: {exc!r}") from exc
    return buses_of(target)


def _is_bus(value: object) -> TypeGuard[EventBus]:
    try:
        return isinstance(value, EventBus)
    except Exception:  # isinstance() reads __class__, which an unbound lazy proxy raises for
        return False


def _module_buses(value: object) -> list[EventBus]:
    """The buses of an app found in a module; none for a value that fails when looked at.

    A module can hold anything, like werkzeug's ``LocalProxy``, whose every attribute raises
    ``RuntimeError`` outside a request: one such value must not keep the others from being searched.
    """
    try:
        if isinstance(value, ModuleType | type):
            return []
        return _buses_of_app(value)
    except Exception:
        return []


def load_bus(target: str) -> EventBus:
    """Import ``module:attribute`` (a bus, or an app with one bus) and return the bus.

    A module alone works when it holds exactly one bus. An app's middleware is built (and kept) only
    when nothing else shows its bus.

    Raises:
        UsageError: the module cannot be imported, or holds no bus (or several) there, or building
            the app's middleware failed.
    """
    module_name, _, attribute = target.partition(":")
    module = _import(module_name)
    if attribute:
        found = _attribute(module, target, attribute)
        buses = _buses_of_app(found)
        if len(buses) == 1:
            return buses[0]
        if buses:
            raise UsageError(f"{target} has {len(buses)} buses; name the one meant as module:attribute")
        raise UsageError(
            f"{target} is {type(found).__name__}, not an EventBus (nor an app with TidingsMiddleware)"
        )
    buses = _distinct_buses(vars(module).values())
    if len(buses) != 1:
        raise UsageError(f"{module_name} holds {len(buses)} EventBus objects; name one as {module_name}:name")
    return buses[0]


def _distinct_buses(values: Iterable[object]) -> list[EventBus]:
    """The buses among ``values``, each once (a module may bind one bus to two names)."""
    return list({id(value): value for value in values if _is_bus(value)}.values())


def load_buses(target: str) -> tuple[list[EventBus], str | None]:
    """Import ``module:attribute`` or ``module`` and return every bus found there, and a note.

    The note says when the default bus stood in for an app's own (``None`` otherwise). An app's
    middleware not built yet is built (and kept) when nothing else shows its bus.

    Raises:
        UsageError: the module cannot be imported, or no bus can be found there, or building the
            named app's middleware failed.
    """
    module_name, _, attribute = target.partition(":")
    module = _import(module_name)
    if attribute:
        found = _attribute(module, target, attribute)
        buses = _buses_of_app(found)
        what = f"{target} is {type(found).__name__}, not an EventBus (nor an app with a bus)"
    else:
        values = list(vars(module).values())
        buses = _distinct_buses(values)
        if not buses:
            for value in values:
                buses += [bus for bus in _module_buses(value) if all(bus is not b for b in buses)]
        what = f"{module_name} holds no EventBus and no app with one"
    if buses:
        return buses, None
    fallback = _default._bus  # only if the app's code created it: default_bus() would make one
    if fallback is not None:
        return [fallback], f"{what}; showing the default bus (tidings.default_bus())"
    raise UsageError(what)


# -- tidings list -----------------------------------------------------------------------------------
def _definition(target: object) -> object:
    """What defines a handler: the function, method or class, past partials and ``functools.wraps``."""
    obj = target
    while isinstance(obj, functools.partial):
        obj = obj.func
    if not inspect.isroutine(obj) and not inspect.isclass(obj):
        for name in ("handle_many", "handle"):
            method = getattr(obj, name, None)
            if callable(method):
                obj = method
                break
        else:
            obj = type(obj)  # a callable instance: its class
    if callable(obj):
        obj = inspect.unwrap(obj)
    return obj.__func__ if inspect.ismethod(obj) else obj


def _source(target: object) -> tuple[str | None, int | None]:
    """Where a handler is defined: its file (relative to the working directory if under it) and line."""
    obj = _definition(target)
    try:
        file = inspect.getsourcefile(obj)  # type: ignore[arg-type]  # anything else raises TypeError
        _, line = inspect.getsourcelines(obj)  # type: ignore[arg-type]
    except (TypeError, OSError):
        return None, None
    if file is None:
        return None, None
    path = Path(file).resolve()
    try:
        file = str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        file = str(path)
    return file, max(line, 1)


def _qualified(target: object) -> str:
    obj = _definition(target)
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _retry_json(policy: RetryPolicy) -> dict[str, object] | None:
    if policy.max_attempts == 1:
        return None
    return {
        "max_attempts": policy.max_attempts,
        "backoff": policy.backoff,
        "multiplier": policy.multiplier,
        "max_backoff": policy.max_backoff,
        "jitter": policy.jitter,
        "deadline": policy.deadline,
        "attempt_timeout": policy.attempt_timeout,
        "retry_on": [cls.__qualname__ for cls in policy.retry_on],
        "fail_on": [cls.__qualname__ for cls in policy.fail_on],
    }


def _handler_json(spec: HandlerSpec) -> dict[str, object]:
    file, line = _source(spec.target)
    return {
        "name": spec.name,
        "function": _qualified(spec.target),
        "async": spec.is_async,
        "batch": spec.batch,
        "timeout": spec.timeout,
        "retry": _retry_json(spec.retry),
        "file": file,
        "line": line,
    }


def _listing(bus: EventBus, event_filter: str | None) -> list[dict[str, Any]]:
    """One entry per event name, pattern or class the bus knows: its handlers in registration order."""
    groups: dict[str, list[HandlerSpec]] = {}
    matchers: dict[str, Any] = {}
    for subscription in bus.registry:
        handlers = groups.setdefault(subscription.pattern, [])
        if all(spec is not subscription.handler for spec in handlers):
            handlers.append(subscription.handler)
        matchers[subscription.pattern] = subscription.matches
    for known in bus.schemas:
        groups.setdefault(known.name, [])  # a typed event nobody handles (yet)
    entries: list[dict[str, Any]] = []
    for key in sorted(groups, key=lambda name: (is_pattern(name), name.lower(), name)):
        pattern = is_pattern(key)
        if event_filter is not None and not (
            fnmatch.fnmatchcase(key, event_filter)
            or (pattern and key in matchers and matchers[key](event_filter))
        ):
            continue
        schema = bus.schemas.get(key)
        entries.append(
            {
                "bus": bus.name,
                "event": key,
                "pattern": pattern,
                "class": None if schema is None else f"{schema.cls.__module__}.{schema.cls.__qualname__}",
                "also_matched_by": []
                if pattern
                else [
                    other
                    for other in groups
                    if is_pattern(other) and other in matchers and matchers[other](key)
                ],
                "handlers": [_handler_json(spec) for spec in groups[key]],
            }
        )
    return entries


def _handler_line(handler: dict[str, Any]) -> list[str]:
    kind = ("async" if handler["async"] else "sync") + (" batch" if handler["batch"] else "")
    name = handler["name"]
    if handler["function"] != name:
        name += f" ({handler['function']})"
    timeout = "no timeout" if handler["timeout"] is None else f"timeout {handler['timeout']:g}s"
    retry = handler["retry"]
    policy = "no retry"
    if retry is not None:
        policy = f"{retry['max_attempts']} attempts, backoff {retry['backoff']:g}s"
        if retry["multiplier"] != 1:
            policy += f" x{retry['multiplier']:g}"
    where = "?" if handler["file"] is None else f"{handler['file']}:{handler['line']}"
    return [kind, name, f"{timeout}, {policy}", where]


def _print_listing(bus: EventBus, entries: list[dict[str, Any]], out: TextIO, *, filtered: bool) -> None:
    print(f"bus {bus.name!r}", file=out)
    if not entries:
        print("  no events match" if filtered else "  no handlers registered", file=out)
        return
    rows = [_handler_line(handler) for entry in entries for handler in entry["handlers"]]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    for entry in entries:
        title = entry["event"] + (f"  ({entry['class']})" if entry["class"] else "")
        print(f"\n{title}", file=out)
        if not entry["handlers"]:
            print("  (no handlers)", file=out)
        for handler in entry["handlers"]:
            cells = _handler_line(handler)
            print(
                "  "
                + "  ".join(cell.ljust(width) for cell, width in zip(cells[:3], widths, strict=True))
                + "  "
                + cells[3],
                file=out,
            )
        if entry["also_matched_by"]:
            print(f"  also run: the handlers of {', '.join(entry['also_matched_by'])}", file=out)
    handlers = {handler["name"] for entry in entries for handler in entry["handlers"]}
    print(f"\n{len(entries)} event(s), {len(handlers)} handler(s)", file=out)


def _list(args: argparse.Namespace, out: TextIO) -> int:
    buses, note = load_buses(args.target)
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    listings = [(bus, _listing(bus, args.event)) for bus in buses]
    if args.json:
        print(json.dumps([entry for _, entries in listings for entry in entries], indent=2), file=out)
        return 0
    for index, (bus, entries) in enumerate(listings):
        if index:
            print(file=out)
        _print_listing(bus, entries, out, filtered=args.event is not None)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidings", description="Application events for ASGI apps.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser(
        "list", help="list every event, pattern and typed event class with its handlers (file:line)"
    )
    listing.add_argument("target", help="module:attribute of the app or of its EventBus")
    listing.add_argument(
        "--event",
        metavar="PATTERN",
        help="only the events matching this name or pattern (user.*), and the wildcards matching it",
    )
    listing.add_argument("--json", action="store_true", help="a JSON array of events, with their handlers")
    letters = commands.add_parser("dead-letters", help="list, show, replay or purge dead letters")
    actions = letters.add_subparsers(dest="action", required=True)

    def add(name: str, help_text: str, *, select: bool) -> argparse.ArgumentParser:
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--bus", required=True, help="module:attribute of the app or of its EventBus")
        if name == "show":
            action.add_argument("id", help="the dead letter's id (<event id>/<handler>)")
            return action
        if select:
            action.add_argument("ids", nargs="*", help="dead letter ids")
            action.add_argument("--all", action="store_true", help="every dead letter")
        action.add_argument("--event", help="only events whose name matches this pattern (user.*)")
        action.add_argument("--handler", help="only handlers whose name matches this pattern")
        return action

    add("list", "list dead letters, oldest first", select=False).add_argument(
        "--json", action="store_true", help="one JSON object per line"
    )
    add("show", "show one dead letter in full, with its payload and traceback", select=False)
    add("replay", "run the selected dead letters' handlers again now", select=True)
    add("purge", "delete the selected dead letters for good", select=True)
    return parser


def _as_json(letter: DeadLetter) -> dict[str, object]:
    return {
        "id": letter.id,
        "event": letter.event.name,
        "event_id": letter.event.id,
        "time": letter.event.time.isoformat(),
        "handler": letter.handler,
        "attempts": letter.attempts,
        "failed_at": letter.failed_at.isoformat(),
        "error": letter.error,
        "payload": letter.event.payload,
        "headers": dict(letter.event.headers),
    }


def _print_table(letters: Sequence[DeadLetter], out: TextIO) -> None:
    if not letters:
        print("no dead letters", file=out)
        return
    rows = [
        (d.id, d.event.name, str(d.attempts), d.failed_at.strftime("%Y-%m-%d %H:%M:%S"), d.error)
        for d in letters
    ]
    header = ("ID", "EVENT", "ATTEMPTS", "FAILED AT (UTC)", "ERROR")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        # one line per letter: a multi-line error (a Pydantic ValidationError) is joined up
        print("  ".join([*cells, " ".join(row[4].split())[:120]]), file=out)
    print(f"{len(letters)} dead letter(s)", file=out)


def _no_such(args: argparse.Namespace) -> str:
    return "no such dead letter" + (" that the filters select" if args.event or args.handler else "")


def _check_selection(args: argparse.Namespace) -> None:
    if args.ids and args.all:
        raise UsageError("give ids or --all, not both")
    if not (args.ids or args.all or args.event or args.handler):
        raise UsageError("select dead letters: ids, --event, --handler, or --all")


def _check_log_exists(bus: EventBus) -> None:
    """Opening a log that is not there would create an empty one: "no dead letters", and a stray
    file (or PostgreSQL schema), for a path that is wrong or relative to another directory (or a
    schema name with a typo).

    Raises:
        UsageError: the bus's SQLite log file does not exist.
    """
    store = bus.store
    if isinstance(store, SQLiteStore) and not os.path.exists(store.path):
        where = "" if os.path.isabs(store.path) else " (the path is relative: run tidings where the app runs)"
        path = os.path.abspath(store.path)
        raise UsageError(f"bus {bus.name!r}: its event log {path} does not exist{where}")


async def _check_postgres_log_exists(bus: EventBus) -> None:
    """:func:`_check_log_exists` for a PostgreSQL log: its table must be there.

    Raises:
        UsageError: the table does not exist.
        StoreError: the server cannot be reached or refuses the connection.
    """
    store = bus.store
    if not isinstance(store, PostgresStore):
        return
    import asyncpg

    try:
        connection = await asyncpg.connect(store.dsn, timeout=store.connect_timeout)
        try:
            found = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", store.deliveries_table)
        finally:
            await connection.close()
    except Exception as exc:  # as PostgresStore.open() reports it
        raise StoreError(f"the PostgreSQL event log could not open: {exc}") from exc
    if not found:
        raise UsageError(f"bus {bus.name!r}: its event log table {store.deliveries_table} does not exist")


async def _run(bus: EventBus, args: argparse.Namespace, out: TextIO) -> int:
    store = bus.store
    _check_log_exists(bus)
    await _check_postgres_log_exists(bus)
    if not store.durable:
        print(
            f"note: bus {bus.name!r} keeps dead letters in memory only; this process sees none of "
            "the app's (configure a durable store, e.g. SQLiteStore)",
            file=sys.stderr,
        )
    if args.action == "replay":
        _check_selection(args)
        await bus.start(resubmit=False)
        try:
            result = await bus.dead_letters.replay(
                args.ids or None, event=args.event, handler=args.handler, all=args.all
            )
        finally:
            await bus.aclose()
        print(
            f"replayed {len(result.succeeded) + len(result.failed)}: {len(result.succeeded)} succeeded, "
            f"{len(result.failed)} failed again, {len(result.skipped)} skipped",
            file=out,
        )
        for letter in result.failed:
            print(f"  failed again: {letter.id}", file=out)
        for letter in result.skipped:
            print(f"  skipped (no handler named {letter.handler!r}): {letter.id}", file=out)
        for unreadable in result.unreadable:  # its event cannot be read back: only a purge helps
            print(f"  not replayed ({unreadable.error}; purge it): {unreadable.id}", file=out)
        seen = {letter.id for letter in (*result.succeeded, *result.failed, *result.skipped)}
        seen.update(unreadable.id for unreadable in result.unreadable)
        missing = [letter_id for letter_id in dict.fromkeys(args.ids) if letter_id not in seen]
        for letter_id in missing:  # a typo, or replayed or purged meanwhile: not a silent success
            print(f"  not replayed ({_no_such(args)}): {letter_id}", file=out)
        return 1 if result.failed or result.skipped or result.unreadable or missing else 0
    await store.open()
    try:
        if args.action == "list":
            letters = await bus.dead_letters.list(event=args.event, handler=args.handler)
            if args.json:
                for letter in letters:
                    print(json.dumps(_as_json(letter), default=repr), file=out)
            else:
                _print_table(letters, out)
            return 0
        if args.action == "show":
            found = await bus.dead_letters.get(args.id)
            if found is None:
                raise UsageError(f"no dead letter has the id {args.id!r}")
            details = _as_json(found)
            for key in ("id", "event", "event_id", "time", "handler", "attempts", "failed_at", "error"):
                print(f"{key + ':':11} {details[key]}", file=out)
            print(f"{'headers:':11} {json.dumps(details['headers'], default=repr)}", file=out)
            print(f"payload:\n{json.dumps(found.event.payload, indent=2, default=repr)}", file=out)
            print(f"traceback:\n{found.traceback or '(none)'}", file=out)
            return 0
        _check_selection(args)
        unknown: list[str] = []
        if args.ids:  # by key: only these rows are read
            ids, event, handler = args.ids, args.event, args.handler
            with naming_unreadable():  # present, so purged: not to be logged as left out of a list
                present = {d.id for d in await store.dead_letters(ids=ids, event=event, handler=handler)}
            present.update(u.id for u in await store.unreadable(ids=ids, event=event, handler=handler))
            unknown = [letter_id for letter_id in dict.fromkeys(ids) if letter_id not in present]
        purged = await bus.dead_letters.purge(
            args.ids or None, event=args.event, handler=args.handler, all=args.all
        )
        print(f"purged {purged} dead letter(s)", file=out)
        for letter_id in unknown:  # a typo, or replayed or purged meanwhile: not a silent success
            print(f"  not purged ({_no_such(args)}): {letter_id}", file=out)
        return 1 if unknown else 0
    finally:
        await store.aclose()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 failures remain, 2 usage error)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list(args, out or sys.stdout)
        # imported before the loop runs, as `tidings list` and the app's server import it: module
        # code that runs a loop of its own (asyncio.run at import) must not find one running
        bus = load_bus(args.bus)
        return asyncio.run(_run(bus, args, out or sys.stdout))
    except (UsageError, TidingsError) as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tidings list app | head`: the reader is gone, which is no error of ours
        if out is None:
            # Python would flush stdout again at exit and fail on the same pipe; point it elsewhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover - python -m tidings.cli
    sys.exit(main())
