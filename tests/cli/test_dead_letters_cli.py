"""``tidings dead-letters``: list, show, replay and purge the dead letters of an app's bus."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tidings.cli import load_bus, main
from tidings.store import SQLiteStore

from ..conftest import POSTGRES_DSN, Records
from ..store.conftest import overwrite_payload

_names = itertools.count()

APP = """
from tidings import Event, EventBus
from tidings.store import SQLiteStore

bus = EventBus(store=SQLiteStore({path!r}))
broken = True

@bus.on("invoice.due", name="billing.send")
def send(event: Event) -> None:
    if broken:
        raise ConnectionError("mail server down")

@bus.on("user.created", name="mail.welcome")
async def welcome(event: Event) -> None:
    raise ValueError("no template")
"""


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """A fresh app module with a bus on its own SQLite log, and two dead letters in it."""
    name = f"cli_app_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(APP.format(path=str(tmp_path / "log.db")))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    bus = load_bus(f"{name}:bus")

    async def fail_twice() -> None:
        async with bus:
            bus.emit("invoice.due", {"invoice": 7})
            bus.emit("user.created", {"user": 1})
            await bus.drain()

    asyncio.run(fail_twice())
    module = sys.modules[name]
    yield module
    del sys.modules[name]


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def test_list_shows_every_dead_letter(app: ModuleType) -> None:
    status, out = run("dead-letters", "list", "--bus", f"{app.__name__}:bus")
    assert status == 0
    assert "billing.send" in out and "ConnectionError: mail server down" in out
    assert "mail.welcome" in out and "ValueError: no template" in out
    assert out.splitlines()[-1] == "2 dead letter(s)"
    status, out = run("dead-letters", "list", "--bus", app.__name__, "--event", "user.*", "--json")
    [line] = out.splitlines()
    record = json.loads(line)
    assert (record["handler"], record["payload"], record["attempts"]) == ("mail.welcome", {"user": 1}, 1)


def test_show_prints_payload_and_traceback(app: ModuleType) -> None:
    _, listing = run("dead-letters", "list", "--bus", f"{app.__name__}:bus", "--json")
    letter_id = next(json.loads(line)["id"] for line in listing.splitlines() if "billing" in line)
    status, out = run("dead-letters", "show", letter_id, "--bus", f"{app.__name__}:bus")
    assert status == 0
    assert f"id:         {letter_id}" in out
    assert '"invoice": 7' in out
    assert 'raise ConnectionError("mail server down")' in out
    assert run("dead-letters", "show", "nope/x", "--bus", f"{app.__name__}:bus")[0] == 2


def test_replay_runs_the_handler_again_and_reports(app: ModuleType) -> None:
    bus = f"{app.__name__}:bus"
    status, out = run("dead-letters", "replay", "--bus", bus, "--handler", "billing.*")
    assert (status, out.splitlines()[0]) == (1, "replayed 1: 0 succeeded, 1 failed again, 0 skipped")
    setattr(app, "broken", False)  # noqa: B010 - the module's flag, unknown to mypy
    status, out = run("dead-letters", "replay", "--bus", bus, "--handler", "billing.*")
    assert (status, out.splitlines()[0]) == (0, "replayed 1: 1 succeeded, 0 failed again, 0 skipped")
    _, listing = run("dead-letters", "list", "--bus", bus)
    assert "billing.send" not in listing and "1 dead letter(s)" in listing


def test_purge_needs_a_selection_and_deletes_it(app: ModuleType) -> None:
    bus = f"{app.__name__}:bus"
    assert run("dead-letters", "purge", "--bus", bus)[0] == 2
    assert run("dead-letters", "purge", "x/y", "--all", "--bus", bus)[0] == 2
    assert run("dead-letters", "purge", "--bus", bus, "--event", "user.*") == (0, "purged 1 dead letter(s)\n")
    assert run("dead-letters", "purge", "--bus", bus, "--all") == (0, "purged 1 dead letter(s)\n")
    assert run("dead-letters", "list", "--bus", bus) == (0, "no dead letters\n")


def test_a_bus_that_cannot_be_found_is_a_usage_error(
    app: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("dead-letters", "list", "--bus", "no_such_module_here:bus")[0] == 2
    assert run("dead-letters", "list", "--bus", f"{app.__name__}:broken")[0] == 2
    assert run("dead-letters", "list", "--bus", "json")[0] == 2
    err = capsys.readouterr().err
    assert "cannot import 'no_such_module_here'" in err
    assert "is bool, not an EventBus" in err
    assert "json holds 0 EventBus objects" in err


def test_an_app_module_that_runs_a_loop_when_imported_is_imported_before_the_command_s_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command used to import the app inside its own running loop: the app's asyncio.run()
    # raised "cannot be called from a running event loop" (and `tidings list` did not).
    name = f"cli_app_{next(_names)}"
    source = """
        import asyncio

        from tidings import EventBus
        from tidings.store import SQLiteStore

        async def create_tables() -> None: ...

        asyncio.run(create_tables())
        bus = EventBus(store=SQLiteStore({path!r}))
        """
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source).format(path=str(tmp_path / "log.db")))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    asyncio.run(_create_log(tmp_path / "log.db"))  # the command opens a log, never makes one
    try:
        assert run("dead-letters", "list", "--bus", f"{name}:bus") == (0, "no dead letters\n")
    finally:
        sys.modules.pop(name, None)


async def _create_log(path: Path) -> None:
    store = SQLiteStore(path)
    await store.open()
    await store.aclose()


def test_a_module_binding_one_bus_to_two_names_has_one_bus(app: ModuleType) -> None:
    app.events = app.bus  # type: ignore[attr-defined]  # as `events = bus` in its source would
    status, out = run("dead-letters", "list", "--bus", app.__name__)
    assert status == 0 and out.splitlines()[-1] == "2 dead letter(s)"


def test_the_console_script_runs(app: ModuleType) -> None:
    script = shutil.which("tidings", path=os.path.dirname(sys.executable))
    assert script is not None, "the tidings console script is not installed"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(
        [script, "dead-letters", "list", "--bus", f"{app.__name__}:bus"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "2 dead letter(s)" in done.stdout


def test_a_memory_store_bus_says_it_sees_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "memory_app.py").write_text(
        textwrap.dedent("""
        from tidings import EventBus
        bus = EventBus()
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run("dead-letters", "list", "--bus", "memory_app") == (0, "no dead letters\n")
    assert "keeps dead letters in memory only" in capsys.readouterr().err
    del sys.modules["memory_app"]


def test_a_missing_sqlite_log_is_an_error_not_an_empty_one(
    app: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "log.db").rename(tmp_path / "moved.db")
    bus = f"{app.__name__}:bus"
    for argv in (("list",), ("show", "x/y"), ("purge", "--all"), ("replay", "--all")):
        assert run("dead-letters", *argv, "--bus", bus) == (2, "")
        assert f"its event log {tmp_path / 'log.db'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "log.db").exists()


def test_ids_that_are_not_dead_letters_are_named_and_fail(app: ModuleType) -> None:
    bus = f"{app.__name__}:bus"
    _, listing = run("dead-letters", "list", "--bus", bus, "--json")
    real = next(json.loads(line)["id"] for line in listing.splitlines() if "mail.welcome" in line)
    status, out = run("dead-letters", "replay", "nope/x", "--bus", bus)
    assert (status, out) == (
        1,
        "replayed 0: 0 succeeded, 0 failed again, 0 skipped\n  not replayed (no such dead letter): nope/x\n",
    )
    status, out = run("dead-letters", "purge", real, "nope/x", "nope/x", "--bus", bus)
    assert (status, out) == (1, "purged 1 dead letter(s)\n  not purged (no such dead letter): nope/x\n")
    status, out = run("dead-letters", "purge", real, "--bus", bus)
    assert (status, out) == (1, f"purged 0 dead letter(s)\n  not purged (no such dead letter): {real}\n")


def test_a_multi_line_error_keeps_to_its_row_of_the_table() -> None:
    from tidings import Event
    from tidings.cli import _print_table
    from tidings.store import DeadLetter

    error = "ValidationError: 1 validation error for Order\nqty\n  Input should be a valid integer"
    out = io.StringIO()
    _print_table([DeadLetter(Event("order.placed", 1), "h", 1, error, "", DeadLetter.now())], out)
    _, row, total = out.getvalue().splitlines()
    assert total == "1 dead letter(s)"
    assert row.endswith("ValidationError: 1 validation error for Order qty Input should be a valid integer")


def test_a_missing_postgres_log_is_an_error_not_an_empty_one(
    pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"cli_pg_app_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(
        f"from tidings import EventBus\nbus = EventBus(store={POSTGRES_DSN + '?schema=' + pg_schema!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert run("dead-letters", "list", "--bus", f"{name}:bus") == (2, "")
        assert (
            f'its event log table "{pg_schema}".tidings_deliveries does not exist' in capsys.readouterr().err
        )
        store = load_bus(f"{name}:bus").store

        async def start_the_app() -> None:  # its start creates the log: from then on it is there
            await store.open()
            await store.aclose()

        asyncio.run(start_the_app())
        assert run("dead-letters", "list", "--bus", f"{name}:bus") == (0, "no dead letters\n")
    finally:
        del sys.modules[name]


def test_show_and_replay_by_id_read_only_that_letter(app: ModuleType, decoded: list[str]) -> None:
    bus = f"{app.__name__}:bus"
    _, listing = run("dead-letters", "list", "--bus", bus, "--json")
    letter_id = next(json.loads(line)["id"] for line in listing.splitlines() if "billing" in line)
    event_id = letter_id.rpartition("/")[0]
    decoded.clear()
    assert run("dead-letters", "show", letter_id, "--bus", bus)[0] == 0
    assert decoded == [event_id]
    decoded.clear()
    setattr(app, "broken", False)  # noqa: B010 - the module's flag, unknown to mypy
    assert run("dead-letters", "replay", letter_id, "--bus", bus)[0] == 0
    assert set(decoded) == {event_id}


def spoil_billing_letter(bus: str) -> str:
    """Make the app's billing dead letter one whose event cannot be read back; return its id."""
    _, listing = run("dead-letters", "list", "--bus", bus, "--json")
    letter_id: str = next(json.loads(line)["id"] for line in listing.splitlines() if "billing" in line)
    store = load_bus(bus).store
    assert isinstance(store, SQLiteStore)
    asyncio.run(overwrite_payload(store, letter_id.rpartition("/")[0], "not json"))
    return letter_id


def test_a_dead_letter_that_cannot_be_read_back_is_named_by_replay_and_show_and_purged_by_all(
    app: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    bus = f"{app.__name__}:bus"
    letter_id = spoil_billing_letter(bus)
    why = "cannot be read back from the event log: JSONDecodeError"

    status, out = run("dead-letters", "replay", letter_id, "--bus", bus)
    assert status == 1
    [summary, line] = out.splitlines()
    assert summary == "replayed 0: 0 succeeded, 0 failed again, 0 skipped"
    assert line.startswith("  not replayed (event 'invoice.due' (") and why in line
    assert line.endswith(f"; purge it): {letter_id}")
    assert run("dead-letters", "show", letter_id, "--bus", bus) == (2, "")
    assert f"dead letter {letter_id} cannot be shown: event 'invoice.due'" in capsys.readouterr().err
    assert run("dead-letters", "purge", "--all", "--bus", bus) == (0, "purged 2 dead letter(s)\n")


def test_replay_all_and_purge_by_id_name_a_dead_letter_that_cannot_be_read_back_once(
    app: ModuleType, records: Records
) -> None:
    # `replay --all` logged it as left out of the listing and again as not replayable; a purge by
    # id logged it as left out of the list while purging it
    bus = f"{app.__name__}:bus"
    letter_id = spoil_billing_letter(bus)

    def logged() -> list[str]:
        return [r.getMessage() for r in records.recorder.items if letter_id in r.getMessage()]

    status, out = run("dead-letters", "replay", "--all", "--bus", bus)
    assert status == 1
    [named] = [line for line in out.splitlines() if letter_id in line]
    assert named.startswith("  not replayed (event 'invoice.due'")
    [message] = logged()
    assert message.startswith(f"dead letter {letter_id} cannot be replayed: ")
    records.recorder.items.clear()
    assert run("dead-letters", "purge", letter_id, "--bus", bus) == (0, "purged 1 dead letter(s)\n")
    assert logged() == []
