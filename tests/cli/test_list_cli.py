"""``tidings list``: every event, pattern and typed event class of an app's bus, with its handlers."""

from __future__ import annotations

import importlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from tidings import Event, EventBus, TidingsMiddleware
from tidings._core.default import reset_default_bus
from tidings.cli import UsageError, buses_of, load_bus, main

_names = itertools.count()

DECORATORS = """
import functools


def logged(fn):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        return await fn(*args, **kwargs)

    return wrapper
"""

APP = """
import functools
from dataclasses import dataclass

from fastapi import FastAPI

from tidings import Event, EventBus, RetryPolicy, TidingsMiddleware
from {decorators} import logged

bus = EventBus(name="shop", handler_timeout=30)


@dataclass
class OrderPlaced:
    __event_name__ = "order.placed"
    order_id: int


@bus.on(OrderPlaced, retry=RetryPolicy(max_attempts=3, backoff=0.5))
@logged
async def reserve_stock(order: OrderPlaced) -> None:  # line: reserve_stock
    ...


@bus.on("order.*", "user.*", timeout=5)
def audit(event: Event) -> None:  # line: audit
    ...


class Mailer:
    def handle_many(self, events: list[Event]) -> None:  # line: handle_many
        ...


bus.subscribe(Mailer(), "user.created", name="mail.batch")


def notify(event: Event, channel: str) -> None:  # line: notify
    ...


bus.subscribe(functools.partial(notify, channel="sms"), "user.deleted", name="notify.sms", timeout=None)


@bus.schema
@dataclass
class Refunded:
    amount: int


app = FastAPI()
app.add_middleware(TidingsMiddleware, bus=bus)
"""


class App:
    """An app module written to a temporary directory, importable by name."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name

    def line(self, marker: str) -> int:
        """The line of the handler marked ``# line: marker`` (its first decorator, if it has any)."""
        lines = self.path.read_text().splitlines()
        index = next(i for i, text in enumerate(lines) if text.endswith(f"# line: {marker}"))
        while index > 0 and lines[index - 1].startswith("@"):
            index -= 1
        return index + 1


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], App]]:
    """Write an app module under a fresh name; the working directory is its directory."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    written: list[str] = []

    def write_module(source: str) -> App:
        name = f"list_app_{next(_names)}"
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        written.append(name)
        return App(path, name)

    yield write_module
    for name in written:
        sys.modules.pop(name, None)


@pytest.fixture
def shop(write: Callable[[str], App]) -> App:
    decorators = write(DECORATORS)
    return write(APP.replace("{decorators}", decorators.name))


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def test_lists_events_patterns_and_classes_with_their_handlers(shop: App) -> None:
    status, out = run("list", f"{shop.name}:app")
    assert status == 0
    file = shop.path.name
    m = shop.name
    # handler rows are columns two spaces apart at least: compare their cells, then their alignment
    lines = [re.split(r" {2,}", line.strip()) if line.startswith("  ") else line for line in out.splitlines()]
    assert lines == [
        "bus 'shop'",
        "",
        f"order.placed  ({m}.OrderPlaced)",
        [
            "async",
            f"{m}.reserve_stock",
            "timeout 30s, 3 attempts, backoff 0.5s x2",
            f"{file}:{shop.line('reserve_stock')}",
        ],
        ["also run: the handlers of order.*"],
        "",
        f"Refunded  ({m}.Refunded)",
        ["(no handlers)"],
        "",
        "user.created",
        [
            "sync batch",
            f"mail.batch ({m}.Mailer.handle_many)",
            "timeout 30s, no retry",
            f"{file}:{shop.line('handle_many')}",
        ],
        ["also run: the handlers of user.*"],
        "",
        "user.deleted",
        ["sync", f"notify.sms ({m}.notify)", "no timeout, no retry", f"{file}:{shop.line('notify')}"],
        ["also run: the handlers of user.*"],
        "",
        "order.*",
        ["sync", f"{m}.audit", "timeout 5s, no retry", f"{file}:{shop.line('audit')}"],
        "",
        "user.*",
        ["sync", f"{m}.audit", "timeout 5s, no retry", f"{file}:{shop.line('audit')}"],
        "",
        "6 event(s), 4 handler(s)",
    ]
    rows = [line for line in out.splitlines() if line.endswith(tuple(f":{n}" for n in range(1, 100)))]
    assert len(rows) == 5
    for cell in range(1, 4):
        assert len({row.index(re.split(r" {2,}", row.strip())[cell]) for row in rows}) == 1


def test_json_output(shop: App) -> None:
    status, out = run("list", f"{shop.name}:bus", "--json")
    assert status == 0
    entries = json.loads(out)
    assert [entry["event"] for entry in entries] == [
        "order.placed",
        "Refunded",
        "user.created",
        "user.deleted",
        "order.*",
        "user.*",
    ]
    order = entries[0]
    assert order == {
        "bus": "shop",
        "event": "order.placed",
        "pattern": False,
        "class": f"{shop.name}.OrderPlaced",
        "also_matched_by": ["order.*"],
        "handlers": [
            {
                "name": f"{shop.name}.reserve_stock",
                "function": f"{shop.name}.reserve_stock",
                "async": True,
                "batch": False,
                "timeout": 30.0,
                "retry": {
                    "max_attempts": 3,
                    "backoff": 0.5,
                    "multiplier": 2.0,
                    "max_backoff": 60.0,
                    "jitter": 0.5,
                    "deadline": None,
                    "attempt_timeout": None,
                    "retry_on": ["Exception"],
                    "fail_on": [],
                },
                # the handler's own file, not that of the decorator that wrapped it
                "file": shop.path.name,
                "line": shop.line("reserve_stock"),
            }
        ],
    }
    assert entries[1]["handlers"] == [] and entries[1]["class"] == f"{shop.name}.Refunded"
    [mailer] = entries[2]["handlers"]
    assert (mailer["name"], mailer["async"], mailer["batch"]) == ("mail.batch", False, True)
    assert entries[4]["pattern"] is True and entries[4]["also_matched_by"] == []


def test_event_filter_shows_what_runs_for_a_name(shop: App) -> None:
    status, out = run("list", shop.name, "--event", "user.created", "--json")
    assert status == 0
    assert [entry["event"] for entry in json.loads(out)] == ["user.created", "user.*"]
    status, out = run("list", shop.name, "--event", "order.*", "--json")
    assert [entry["event"] for entry in json.loads(out)] == ["order.placed", "order.*"]
    status, out = run("list", shop.name, "--event", "invoice.*")
    assert (status, out) == (0, "bus 'shop'\n  no events match\n")


def test_starlette_litestar_and_hand_wrapped_apps(write: Callable[[str], App]) -> None:
    app = write(
        """
        from litestar import Litestar
        from litestar.middleware import DefineMiddleware
        from starlette.applications import Starlette
        from starlette.middleware import Middleware

        from tidings import EventBus, TidingsMiddleware
        from tidings.integrations.litestar import TidingsPlugin

        starlette_bus = EventBus(name="starlette")
        starlette_app = Starlette(middleware=[Middleware(TidingsMiddleware, bus=starlette_bus)])

        litestar_bus = EventBus(name="litestar")
        litestar_app = Litestar(middleware=[DefineMiddleware(TidingsMiddleware, bus=litestar_bus)])

        plugin_bus = EventBus(name="plugin")
        plugin_app = Litestar(plugins=[TidingsPlugin(plugin_bus)], logging_config=None)

        wrapped_bus = EventBus(name="wrapped")
        wrapped = TidingsMiddleware(Starlette(), bus=wrapped_bus)


        class Container:
            app = starlette_app
        """
    )
    for attribute, name in [
        ("starlette_app", "starlette"),
        ("litestar_app", "litestar"),
        ("plugin_app", "plugin"),
        ("wrapped", "wrapped"),
        ("Container.app", "starlette"),
    ]:
        assert run("list", f"{app.name}:{attribute}") == (0, f"bus {name!r}\n  no handlers registered\n")
        assert load_bus(f"{app.name}:{attribute}").name == name  # dead-letters --bus takes apps too
    status, out = run("list", app.name)  # a module: all of its buses
    assert status == 0
    assert [line for line in out.splitlines() if line.startswith("bus")] == [
        "bus 'starlette'",
        "bus 'litestar'",
        "bus 'plugin'",
        "bus 'wrapped'",
    ]


def test_a_built_starlette_middleware_stack_is_searched_too() -> None:
    bus = EventBus(name="built")
    app = Starlette()
    app.add_middleware(TidingsMiddleware, bus=bus)
    app.middleware_stack = app.build_middleware_stack()
    app.user_middleware.clear()  # only the built stack knows it now
    assert buses_of(app) == [bus]
    assert buses_of(object()) == []

    class Odd:
        plugins = 3  # not iterable
        user_middleware = (object(),)  # not Middleware

    assert buses_of(Odd()) == []


def test_a_module_with_only_an_app_and_the_default_bus_fallback(
    write: Callable[[str], App], capsys: pytest.CaptureFixture[str]
) -> None:
    only_app = write(
        """
        from fastapi import FastAPI
        from tidings import EventBus, TidingsMiddleware

        app = FastAPI()
        app.add_middleware(TidingsMiddleware, bus=EventBus(name="inner"))
        """
    )
    assert run("list", only_app.name) == (0, "bus 'inner'\n  no handlers registered\n")
    reset_default_bus()
    try:
        uses_default = write(
            """
            from fastapi import FastAPI
            import tidings

            @tidings.on("ping")
            async def pong(event: tidings.Event) -> None: ...

            app = FastAPI()  # no middleware: the handlers are on the default bus
            """
        )
        status, out = run("list", f"{uses_default.name}:app")
        assert status == 0
        assert out.startswith("bus 'default'\n\nping\n  async  ")
        assert "showing the default bus (tidings.default_bus())" in capsys.readouterr().err
    finally:
        reset_default_bus()


def test_what_cannot_be_found_is_a_usage_error(
    write: Callable[[str], App], capsys: pytest.CaptureFixture[str]
) -> None:
    app = write(
        """
        from tidings import EventBus, TidingsMiddleware
        from starlette.applications import Starlette
        from starlette.middleware import Middleware

        value = 42
        two = Starlette(middleware=[
            Middleware(TidingsMiddleware, bus=EventBus(name="a")),
            Middleware(TidingsMiddleware, bus=EventBus(name="b")),
        ])
        """
    )
    reset_default_bus()
    assert run("list", f"{app.name}:value")[0] == 2
    assert run("list", f"{app.name}:missing.attr")[0] == 2
    assert run("list", "no_such_module_for_list")[0] == 2
    assert run("list", "json")[0] == 2
    err = capsys.readouterr().err
    assert f"tidings: {app.name}:value is int, not an EventBus (nor an app with a bus)" in err
    assert f"{app.name} has no attribute 'missing.attr'" in err
    assert "cannot import 'no_such_module_for_list'" in err
    assert "json holds no EventBus and no app with one" in err
    status, out = run("list", f"{app.name}:two")  # list shows both
    assert status == 0 and "bus 'a'" in out and "bus 'b'" in out
    with pytest.raises(UsageError, match="has 2 buses"):
        load_bus(f"{app.name}:two")  # dead letters need one


def test_a_target_that_is_no_module_name_or_whose_module_raises_is_a_usage_error(
    write: Callable[[str], App], capsys: pytest.CaptureFixture[str]
) -> None:
    broken = write(
        """
        import os

        from tidings import EventBus

        bus = EventBus()
        database = os.environ["LIST_APP_DATABASE_URL_NEVER_SET"]
        """
    )
    # each used to end in a traceback and status 1
    assert run("list", ":bus")[0] == 2
    assert run("list", ".relative:app")[0] == 2
    assert run("list", f"{broken.name}:bus")[0] == 2
    err = capsys.readouterr().err
    assert "tidings: '' is not a module name: give it in full, as for python -m (myapp.main:app)" in err
    assert "tidings: '.relative' is not a module name" in err
    assert (
        f"tidings: cannot import {broken.name!r}: KeyError: 'LIST_APP_DATABASE_URL_NEVER_SET' "
        f"(at {broken.path}:7)" in err
    )


def test_a_bus_bound_to_two_names_is_one_bus(write: Callable[[str], App]) -> None:
    app = write(
        """
        from tidings import EventBus

        bus = EventBus(name="shop")
        events = bus
        """
    )
    status, out = run("list", app.name)
    assert status == 0 and out.count("bus 'shop'") == 1
    assert load_bus(app.name).name == "shop"  # not "holds 2 EventBus objects"


def test_the_console_script_lists(shop: App) -> None:
    script = shutil.which("tidings", path=os.path.dirname(sys.executable))
    assert script is not None, "the tidings console script is not installed"
    done = subprocess.run(
        [script, "list", f"{shop.name}:app"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"{shop.path.name}:{shop.line('reserve_stock')}" in done.stdout
    assert done.stdout.splitlines()[-1] == "6 event(s), 4 handler(s)"


def test_a_reader_that_stops_early_is_no_error(write: Callable[[str], App], shop: App) -> None:
    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    assert main(["list", shop.name], out=Gone()) == 0

    many = write(
        """
        from tidings import Event, EventBus

        bus = EventBus(name="many")
        for n in range(1000):
            bus.subscribe(lambda event: None, f"event.{n}", name=f"handler.{n}")
        """
    )
    script = shutil.which("tidings", path=os.path.dirname(sys.executable))
    assert script is not None
    process = subprocess.Popen(
        [script, "list", many.name, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(1) == b"["  # like `| head -1`: read a little, then hang up
    process.stdout.close()
    assert process.wait(60) == 0
    assert process.stderr.read() == b""
    process.stderr.close()


class Greeter:
    def __call__(self, event: Event) -> None: ...


def defined_here(event: Event) -> None: ...


def test_handlers_without_source_or_outside_the_working_directory(write: Callable[[str], App]) -> None:
    app = write(
        """
        from tidings import EventBus

        bus = EventBus(name="odd")
        """
    )
    bus = load_bus(app.name)
    namespace: dict[str, Any] = {}
    exec("def generated(event):\n    pass\n", namespace)
    bus.subscribe(namespace["generated"], "made.up", name="generated")
    bus.subscribe(Greeter(), "greeted", name="greeter")
    bus.subscribe(defined_here, "here", name="here")
    status, out = run("list", app.name, "--json")
    assert status == 0
    where = {
        entry["event"]: (entry["handlers"][0]["file"], entry["handlers"][0]["line"])
        for entry in json.loads(out)
    }
    this_file = str(Path(__file__).resolve())  # outside the working directory: an absolute path
    source = Path(__file__).read_text().splitlines()
    assert where == {
        "made.up": (None, None),
        "greeted": (this_file, source.index("class Greeter:") + 1),
        "here": (this_file, source.index("def defined_here(event: Event) -> None: ...") + 1),
    }
    assert "?" in run("list", app.name, "--event", "made.up")[1].splitlines()[3]


COMPAT_APP = """
from fastapi import FastAPI
from starlette.middleware import Middleware

from tidings import EventBus, TidingsMiddleware
from tidings.compat.fastapi_events.handlers.local import LocalHandler
from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware

handlers = LocalHandler()


@handlers.register(event_name="cat.*")
async def on_cat(event) -> None:  # line: on_cat
    ...


app = FastAPI()
app.add_middleware(EventHandlerASGIMiddleware, handlers=[handlers])

both = FastAPI(middleware=[
    Middleware(TidingsMiddleware, bus=EventBus(name="shop")),
    Middleware(EventHandlerASGIMiddleware, handlers=[handlers], middleware_id=7),
])
"""


def test_the_bus_of_the_fastapi_events_compat_middleware_is_found(write: Callable[[str], App]) -> None:
    compat = write(COMPAT_APP)
    status, out = run("list", f"{compat.name}:app")
    assert status == 0
    assert out.startswith("bus 'fastapi-events'\n\ncat.*\n  async  ")
    assert f"{compat.name}.on_cat  no timeout, no retry  {compat.path.name}:{compat.line('on_cat')}" in out
    # A bus declared in the app's middleware is found without building it: building runs every
    # middleware's constructor, which may need what only the app's real environment has.
    status, out = run("list", f"{compat.name}:both")
    assert status == 0
    assert [line for line in out.splitlines() if line.startswith("bus")] == ["bus 'shop'"]
    status, out = run("list", compat.name)  # a module: the buses of its apps
    assert status == 0
    assert [line for line in out.splitlines() if line.startswith("bus")] == [
        "bus 'fastapi-events'",
        "bus 'shop'",
    ]


def test_fastapi_events_handler_objects_are_listed_by_their_own_methods(write: Callable[[str], App]) -> None:
    # their adapters' closures were shown instead: "(tidings.compat.fastapi_events.middleware.
    # _Adapter.batch.<locals>.handle_batch)", at a line of middleware.py
    compat = write(
        """
        from fastapi import FastAPI

        from tidings.compat.fastapi_events.handlers.base import BaseEventHandler
        from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware


        class Forwarder(BaseEventHandler):
            async def handle(self, event) -> None: ...

            async def handle_many(self, events) -> None:  # line: forward
                ...


        class SyncForwarder:
            def handle_many(self, events) -> None:  # line: sync_forward
                ...


        class Auditor(BaseEventHandler):
            def handle(self, event) -> None:  # line: audit
                ...


        app = FastAPI()
        app.add_middleware(
            EventHandlerASGIMiddleware, handlers=[Forwarder(), SyncForwarder(), Auditor()]
        )
        """
    )
    status, out = run("list", f"{compat.name}:app", "--json")
    assert status == 0
    [entry] = json.loads(out)
    m = compat.name
    assert [(h["name"], h["function"], h["batch"], h["file"], h["line"]) for h in entry["handlers"]] == [
        (f"{m}.Forwarder", f"{m}.Forwarder.handle_many", True, compat.path.name, compat.line("forward")),
        (
            f"{m}.SyncForwarder",
            f"{m}.SyncForwarder.handle_many",
            True,
            compat.path.name,
            compat.line("sync_forward"),
        ),
        (f"{m}.Auditor", f"{m}.Auditor.handle", False, compat.path.name, compat.line("audit")),
    ]
    status, out = run("list", f"{compat.name}:app")
    assert f"  async batch  {m}.Forwarder ({m}.Forwarder.handle_many)  " in out
    assert "tidings.compat" not in out and "middleware.py" not in out


def test_load_bus_builds_the_middleware_only_when_nothing_else_shows_a_bus(
    write: Callable[[str], App],
) -> None:
    compat = write(COMPAT_APP)
    module = importlib.import_module(compat.name)
    bus = load_bus(f"{compat.name}:app")
    assert bus.name == "fastapi-events"
    # The stack is kept: the app run in this process (the pytest plugin's) has the bus found.
    assert module.app.middleware_stack is not None
    assert buses_of(module.app) == [bus]
    assert load_bus(f"{compat.name}:app") is bus
    assert load_bus(f"{compat.name}:both").name == "shop"  # declared: nothing built
    assert module.both.middleware_stack is None


def test_a_middleware_that_fails_to_build(
    write: Callable[[str], App], capsys: pytest.CaptureFixture[str]
) -> None:
    broken = write(
        """
        from starlette.applications import Starlette
        from starlette.middleware import Middleware

        from tidings import EventBus, TidingsMiddleware


        class Broken:
            def __init__(self, app):
                raise LookupError("no SECRET_KEY")


        app = Starlette(middleware=[Middleware(Broken)])
        fine = Starlette(middleware=[Middleware(TidingsMiddleware, bus=EventBus(name="fine"))])
        declared = Starlette(
            middleware=[Middleware(TidingsMiddleware, bus=EventBus(name="declared")), Middleware(Broken)]
        )
        """
    )
    reset_default_bus()
    assert run("list", f"{broken.name}:app")[0] == 2
    assert (
        "tidings: building the middleware of Starlette failed: LookupError('no SECRET_KEY')"
        in capsys.readouterr().err
    )
    # a declared bus is found without building: Broken's constructor never runs
    assert run("list", f"{broken.name}:declared") == (0, "bus 'declared'\n  no handlers registered\n")
    listed = run("list", broken.name)  # app is skipped
    assert listed == (0, "bus 'fine'\n  no handlers registered\n\nbus 'declared'\n  no handlers registered\n")


def test_the_example_port_of_a_fastapi_events_app_lists() -> None:
    script = shutil.which("tidings", path=os.path.dirname(sys.executable))
    assert script is not None, "the tidings console script is not installed"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [script, "list", "examples.fastapi_events_port.app:app", "--json"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    handlers = {handler["function"] for entry in json.loads(done.stdout) for handler in entry["handlers"]}
    assert {
        "examples.fastapi_events_port.handlers.send_welcome_email",
        "examples.fastapi_events_port.handlers.reserve_stock",
        "examples.fastapi_events_port.handlers.write_inventory_ledger",
    } <= handlers


LAZY = """
class Unbound:
    '''Like werkzeug's LocalProxy outside a request: any look at it raises.'''

    def __getattr__(self, name):
        raise RuntimeError("working outside of request context")


class NoClass:
    '''A proxy whose __class__ raises, which isinstance() reads.'''

    @property
    def __class__(self):
        raise RuntimeError("working outside of application context")


request = Unbound()
current_app = NoClass()
"""


def test_values_that_fail_when_looked_at_are_skipped(write: Callable[[str], App]) -> None:
    with_bus = write(LAZY + "\nfrom tidings import EventBus\n\nbus = EventBus(name='beside')\n")
    assert run("list", with_bus.name) == (0, "bus 'beside'\n  no handlers registered\n")
    assert load_bus(with_bus.name).name == "beside"
    with_app = write(
        LAZY
        + """
from fastapi import FastAPI
from tidings import EventBus, TidingsMiddleware

app = FastAPI()
app.add_middleware(TidingsMiddleware, bus=EventBus(name="inner"))
"""
    )
    assert run("list", with_app.name) == (0, "bus 'inner'\n  no handlers registered\n")
