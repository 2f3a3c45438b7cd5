"""The ``tidings`` command line.

``tidings dead-letters list|show|replay|purge --bus module:attribute``

``--bus`` names the app's :class:`~tidings.EventBus` (``myapp.events:bus``; ``myapp.events`` alone
works when the module holds exactly one bus). Listing, showing and purging only read and write the
bus's store; replaying starts the bus in this process (without taking over the app's backlog), runs
each selected dead letter's handler once more, and waits for it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from typing import TYPE_CHECKING, TextIO

from ._core.bus import EventBus
from .exceptions import TidingsError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .store.base import DeadLetter

__all__ = ["load_bus", "main"]


class UsageError(Exception):
    """A command line that cannot be carried out; printed without a traceback."""


def load_bus(target: str) -> EventBus:
    """Import ``module:attribute`` (or a module holding exactly one bus) and return the bus.

    Raises:
        UsageError: the module cannot be imported, or holds no bus (or several) there.
    """
    module_name, _, attribute = target.partition(":")
    if "." not in sys.path and "" not in sys.path:
        sys.path.insert(0, "")  # like python -m: the app's own package from the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    if attribute:
        found = getattr(module, attribute, None)
        if not isinstance(found, EventBus):
            raise UsageError(f"{target} is {type(found).__name__}, not an EventBus")
        return found
    buses = [value for value in vars(module).values() if isinstance(value, EventBus)]
    if len(buses) != 1:
        raise UsageError(f"{module_name} holds {len(buses)} EventBus objects; name one as {module_name}:name")
    return buses[0]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidings", description="Application events for ASGI apps.")
    commands = parser.add_subparsers(dest="command", required=True)
    letters = commands.add_parser("dead-letters", help="list, show, replay or purge dead letters")
    actions = letters.add_subparsers(dest="action", required=True)

    def add(name: str, help_text: str, *, select: bool) -> argparse.ArgumentParser:
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--bus", required=True, help="module:attribute of the app's EventBus")
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
        print("  ".join([*cells, row[4][:120]]), file=out)
    print(f"{len(letters)} dead letter(s)", file=out)


def _check_selection(args: argparse.Namespace) -> None:
    if args.ids and args.all:
        raise UsageError("give ids or --all, not both")
    if not (args.ids or args.all or args.event or args.handler):
        raise UsageError("select dead letters: ids, --event, --handler, or --all")


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    bus = load_bus(args.bus)
    store = bus.store
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
        return 1 if result.failed or result.skipped else 0
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
        purged = await bus.dead_letters.purge(
            args.ids or None, event=args.event, handler=args.handler, all=args.all
        )
        print(f"purged {purged} dead letter(s)", file=out)
        return 0
    finally:
        await store.aclose()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 failures remain, 2 usage error)."""
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args, out or sys.stdout))
    except (UsageError, TidingsError) as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover - python -m tidings.cli
    sys.exit(main())
