"""The pytest plugin as its users meet it: test files run by pytester, real FastAPI and Starlette apps."""

from __future__ import annotations

import importlib.metadata

import pytest

pytest_plugins = ["pytester"]


def _plugin_args() -> list[str]:
    # Until tidings is installed with its pytest11 entry point the plugin is loaded by hand; once it
    # is, pytest loads it by itself, and naming it again would register one module twice.
    installed = any(
        entry.value == "tidings.pytest_plugin" for entry in importlib.metadata.entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "tidings.pytest_plugin"]


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # In this process the plugin module may have been imported already (tests/test_docstrings.py
    # imports every module), too late for pytest to rewrite its asserts: a warning that a user's
    # session, which imports it first through pytest, never sees.
    rewrite = "ignore::pytest.PytestAssertRewriteWarning"
    return pytester.runpytest(*_plugin_args(), "-p", "no:cacheprovider", *args, "-W", rewrite)


def run_apart(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """In a process of its own: with none of this test run's warning filters (errors, here)."""
    return pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider", *args, timeout=60)


FASTAPI_APP = """
from dataclasses import dataclass
import threading

from fastapi import FastAPI
from tidings import EventBus, TidingsMiddleware, emit

bus = EventBus(name="shop", request_handlers={mode!r})
welcomed: list[str] = []
gate = threading.Event()
gate.set()


@dataclass
class UserCreated:
    __event_name__ = "user.created"
    id: int
    email: str


@bus.on(UserCreated)
def send_welcome(user: UserCreated) -> None:  # a plain def: runs in a worker thread
    assert gate.wait(5)
    welcomed.append(user.email)
    emit("mail.sent", {{"to": user.email}})


app = FastAPI()
app.add_middleware(TidingsMiddleware, bus=bus)


@app.post("/users")
async def create_user(email: str) -> dict[str, int]:
    emit(UserCreated(id=1, email=email))
    emit("audit.logged", {{"action": "signup"}})
    return {{"id": 1}}
"""

CONFTEST = """
import pytest
from fastapi.testclient import TestClient

import shop


@pytest.fixture
def tidings_bus():
    return shop.bus


@pytest.fixture
def client():
    with TestClient(shop.app) as client:  # the lifespan starts and closes the bus
        yield client
"""


def test_assert_on_the_events_of_fastapi_requests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(shop=FASTAPI_APP.format(mode="inline"))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_signup="""
        import shop
        from shop import UserCreated


        def test_signup_emits_and_welcomes(client, tidings_events):
            assert client.post("/users", params={"email": "ada@example.com"}).status_code == 200
            tidings_events.assert_emitted("user.created", email="ada@example.com")
            tidings_events.assert_emitted(UserCreated, id=1)
            tidings_events.assert_emitted_once("audit.*", action="signup")
            # handlers ran inline in the request, chains included
            tidings_events.assert_emitted("mail.sent", to="ada@example.com")
            assert shop.welcomed == ["ada@example.com"]
            tidings_events.assert_not_emitted("user.deleted")


        def test_each_test_captures_its_own_events(client, tidings_events):
            tidings_events.assert_not_emitted()
            assert tidings_events.buses[0] is shop.bus
        """
    )
    result = run(pytester, "-W", "error")
    result.assert_outcomes(passed=2)


def test_a_failed_assertion_shows_what_was_emitted(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(shop=FASTAPI_APP.format(mode="inline"))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_signup="""
        def test_wrong_email(client, tidings_events):
            client.post("/users", params={"email": "ada@example.com"})
            tidings_events.assert_emitted("user.created", email="bob@example.com")
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: no event 'user.created' with email='bob@example.com' was emitted.",
            "*Events 'user.created' that differ (1):",
            "*#1 user.created UserCreated(id=1, email='ada@example.com'): "
            "email is 'ada@example.com', not 'bob@example.com'",
            "*Every event emitted (3), in order:",
            "*#2 audit.logged {'action': 'signup'}",
            "*#3 mail.sent {'to': 'ada@example.com'}",
        ]
    )


def test_settle_sync_waits_for_handlers_running_in_bus_tasks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(shop=FASTAPI_APP.format(mode="task"))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_signup="""
        import shop


        def test_handlers_finish_after_the_response(client, tidings_events):
            shop.gate.clear()  # hold the handler until the response is back
            client.post("/users", params={"email": "ada@example.com"})
            assert shop.welcomed == []
            tidings_events.assert_not_emitted("mail.sent")
            shop.gate.set()
            tidings_events.settle_sync()
            assert shop.welcomed == ["ada@example.com"]
            tidings_events.assert_emitted("mail.sent")


        def test_tidings_inline_makes_the_request_wait_for_them(tidings_inline, client, tidings_events):
            assert tidings_inline is shop.bus
            client.post("/users", params={"email": "bob@example.com"})
            assert shop.welcomed[-1] == "bob@example.com"
            tidings_events.assert_emitted("mail.sent", to="bob@example.com")


        def test_tidings_inline_also_switches_a_running_bus(client, tidings_inline, tidings_events):
            client.post("/users", params={"email": "eve@example.com"})
            assert shop.welcomed[-1] == "eve@example.com"


        def test_the_bus_mode_is_back_afterwards():
            assert shop.bus.request_handlers == "task"
        """
    )
    result = run(pytester, "-W", "error")
    result.assert_outcomes(passed=4)


def test_async_tests_settle_and_wait_for_events(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_async="""
        import asyncio

        import httpx
        import pytest
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        from tidings import EventBus, TidingsMiddleware, emit

        pytestmark = pytest.mark.anyio
        bus = EventBus(name="reports")
        built = []


        @bus.on("report.requested")
        async def build(month: str) -> None:
            await asyncio.sleep(0)
            built.append(month)
            emit("report.built", {"month": month})


        async def later(month):
            await asyncio.sleep(0)
            emit("report.requested", {"month": month})  # after the response: straight to the bus


        _tasks = set()


        async def endpoint(request):
            task = asyncio.create_task(later(request.query_params["month"]))
            _tasks.add(task)
            return PlainTextResponse("accepted", status_code=202)


        app = Starlette(
            routes=[Route("/reports", endpoint)], middleware=[Middleware(TidingsMiddleware, bus=bus)]
        )


        @pytest.fixture
        def anyio_backend():
            return "asyncio"


        @pytest.fixture
        def tidings_bus():
            return bus


        async def test_a_report_is_built(tidings_events):
            transport = httpx.ASGITransport(app=app)
            async with bus, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/reports", params={"month": "2026-11"})).status_code == 202
                await tidings_events.wait_for("report.requested", month="2026-11")
                await tidings_events.settle()
                assert built == ["2026-11"]
                tidings_events.assert_emitted("report.built", month="2026-11")
        """
    )
    result = run(pytester, "-W", "error")
    result.assert_outcomes(passed=1)


def test_the_setting_names_the_app_whose_bus_is_captured(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        myapp="""
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route
        from tidings import EventBus, TidingsMiddleware, emit

        bus = EventBus(name="myapp")


        async def ping(request):
            emit("pinged", {"n": 1})
            return PlainTextResponse("pong")


        app = Starlette(routes=[Route("/", ping)], middleware=[Middleware(TidingsMiddleware, bus=bus)])
        """
    )
    pytester.makeini(
        """
        [pytest]
        tidings_bus = myapp:app
        filterwarnings = error
        """
    )
    pytester.makepyfile(
        test_ping="""
        from starlette.testclient import TestClient

        import myapp


        def test_ping(tidings_bus, tidings_events):
            assert tidings_bus is myapp.bus
            with TestClient(myapp.app) as client:
                client.get("/")
            tidings_events.assert_emitted("pinged", n=1)
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_a_bad_setting_fails_the_tests_that_need_it(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntidings_bus = no_such_module_anywhere:app\n")
    pytester.makepyfile(
        test_it="""
        def test_needs_it(tidings_events):
            pass


        def test_does_not():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*the tidings_bus setting 'no_such_module_anywhere:app': cannot import 'no_such_module_anywhere'*"]
    )


def test_the_default_bus_is_captured_unless_told_otherwise(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_default="""
        import tidings
        from fastapi import FastAPI
        from fastapi.testclient import TestClient


        @tidings.on("order.placed")
        async def reserve(order_id: int) -> None: ...


        app = FastAPI()
        app.add_middleware(tidings.TidingsMiddleware, bus=tidings.default_bus())


        @app.post("/orders")
        def place() -> dict[str, int]:  # a sync endpoint: emits from the threadpool
            tidings.emit("order.placed", {"order_id": 5})
            return {"order_id": 5}


        def test_order(tidings_bus, tidings_events):
            assert tidings_bus is tidings.default_bus()
            with TestClient(app) as client:
                client.post("/orders")
            tidings_events.assert_emitted("order.placed", order_id=5)
        """
    )
    run(pytester, "-W", "error").assert_outcomes(passed=1)


def test_tidings_default_bus_is_fresh_in_each_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_fresh="""
        import tidings
        from tidings import Event


        def test_registers(tidings_default_bus, tidings_events):
            assert tidings_default_bus is tidings.default_bus()

            @tidings.on("ping")
            async def pong(event: Event) -> None: ...

            assert len(tidings_default_bus.registry) == 1
            tidings_default_bus.emit("ping")
            tidings_events.assert_emitted("ping")


        def test_starts_empty(tidings_default_bus):
            assert len(tidings.default_bus().registry) == 0
        """
    )
    run(pytester, "-W", "error").assert_outcomes(passed=2)


def test_tidings_default_bus_gives_the_later_tests_their_default_bus_back(
    pytester: pytest.Pytester,
) -> None:
    # An app whose handlers are registered on the default bus when it is imported: a test using
    # tidings_default_bus left the later tests a new, empty default bus, so their events went to
    # a bus the app does not serve and nothing was captured.
    pytester.makepyfile(
        myapp="""
        import tidings
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        @tidings.on("user.created")
        async def welcome(event: tidings.Event) -> None: ...

        async def create(request):
            tidings.emit("user.created", {"id": 1})
            return PlainTextResponse("ok")

        app = Starlette(
            routes=[Route("/users", create, methods=["POST"])],
            middleware=[Middleware(tidings.TidingsMiddleware, bus=tidings.default_bus())],
        )
        """,
        test_a_fresh="""
        def test_uses_a_fresh_default_bus(tidings_default_bus):
            assert len(tidings_default_bus.registry) == 0
        """,
        test_b_app="""
        from starlette.testclient import TestClient

        import tidings
        from myapp import app

        def test_the_app_s_bus_is_the_default_bus(tidings_events):
            assert tidings.default_bus().registry.named("myapp.welcome") is not None
            with TestClient(app) as client:
                client.post("/users")
            tidings_events.assert_emitted("user.created", id=1)
        """,
    )
    run_apart(pytester, "-W", "error").assert_outcomes(passed=2)  # (apart: this process's default bus)


def test_tidings_default_bus_is_captured_whatever_order_the_test_names_the_fixtures(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_order="""
        import tidings


        def test_events_first(tidings_events, tidings_default_bus):
            assert tidings_events.buses == (tidings_default_bus,)
            assert tidings_default_bus is tidings.default_bus()
            tidings.default_bus().emit("ping", {"n": 1})
            tidings_events.assert_emitted("ping", n=1)


        def test_default_bus_first(tidings_default_bus, tidings_events):
            assert tidings_events.buses == (tidings_default_bus,)
            assert tidings_default_bus is tidings.default_bus()
            tidings.default_bus().emit("ping", {"n": 2})
            tidings_events.assert_emitted("ping", n=2)


        def test_bus_and_inline_first(tidings_bus, tidings_inline, tidings_default_bus):
            assert tidings_bus is tidings_inline is tidings_default_bus
        """
    )
    run(pytester, "-W", "error").assert_outcomes(passed=3)


LEAKY = """
import asyncio
import threading

from tidings import EventBus, emit
from tidings._core.dispatcher import live_buses

loop = asyncio.new_event_loop()
thread = threading.Thread(target=loop.run_forever, daemon=True)
thread.start()
bus = EventBus(name="leaky")
seen = []
bus.tap(lambda event: seen.append(event.name))


def test_starts_a_bus_and_leaves_it_running():
    asyncio.run_coroutine_threadsafe(bus.start(), loop).result(5)


def test_the_next_test_does_not_send_it_events():
    assert bus not in live_buses()
    emit("stray")  # outside any request, with no running bus: dropped, not sent to the leaked one
    assert seen == []


def test_cleanup():
    asyncio.run_coroutine_threadsafe(bus.aclose(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
"""


def test_a_bus_left_running_is_reported_and_isolated(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaky=LEAKY)
    result = run_apart(pytester)
    result.assert_outcomes(passed=3, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*test_starts_a_bus_and_leaves_it_running*",
            "*BusLeftRunningWarning: the test left 1 bus(es) running: <EventBus 'leaky' running*",
        ]
    )


def test_with_warnings_as_errors_a_leaked_bus_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaky=LEAKY)
    result = run(pytester, "-W", "error::tidings.testing.BusLeftRunningWarning")
    result.assert_outcomes(passed=3, errors=1)


def test_buses_started_before_the_test_are_not_its_leaks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_session="""
        import pytest
        from fastapi import FastAPI
        from fastapi.testclient import TestClient

        from tidings import EventBus, TidingsMiddleware, emit

        bus = EventBus(name="session")
        app = FastAPI()
        app.add_middleware(TidingsMiddleware, bus=bus)


        @app.get("/")
        def index() -> dict[str, bool]:
            emit("index.seen")
            return {"ok": True}


        @pytest.fixture(scope="module")
        def client():
            with TestClient(app) as client:  # one running bus for the whole module
                yield client


        @pytest.fixture
        def tidings_bus():
            return bus


        @pytest.mark.parametrize("n", [1, 2])
        def test_uses_the_running_bus(client, tidings_events, n):
            client.get("/")
            assert tidings_events.assert_emitted_once("index.seen")
            tidings_events.settle_sync()
        """
    )
    run(pytester, "-W", "error").assert_outcomes(passed=2)
