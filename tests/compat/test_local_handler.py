"""``LocalHandler``: registration, FastAPI dependencies, one tidings handler per function, direct calls."""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Request

from tidings import ConfigurationError, EventBus, HandlerError
from tidings.compat.fastapi_events.dispatcher import dispatch
from tidings.compat.fastapi_events.handlers.local import LocalHandler, local_handler
from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware
from tidings.compat.fastapi_events.typing import Event

from ..conftest import Recorder
from .conftest import client, lifespan

pytestmark = pytest.mark.anyio


def fastapi_app(handler: LocalHandler, *events: tuple[str, Any], bus: EventBus | None = None) -> FastAPI:
    app = FastAPI()
    app.add_middleware(EventHandlerASGIMiddleware, handlers=[handler], bus=bus)

    @app.get("/")
    async def index() -> dict[str, str]:
        for name, payload in events:
            dispatch(name, payload)
        return {}

    return app


async def serve_once(app: FastAPI) -> None:
    async with lifespan(app), client(app) as http:
        assert (await http.get("/")).status_code == 200


# -- dependencies -----------------------------------------------------------------------------------------


async def test_the_readme_dependencies_with_sub_dependencies() -> None:
    handler = LocalHandler()
    seen: list[Any] = []

    async def get_db_conn() -> str:
        return "conn"

    async def get_db_session(db_conn: str = Depends(get_db_conn)) -> str:
        return f"session on {db_conn}"

    def get_settings() -> dict[str, int]:  # a plain def dependency
        return {"retries": 3}

    @handler.register(event_name="*")
    async def handle_all_events(
        event: Event,
        db_session: str = Depends(get_db_session),
        settings: dict[str, int] = Depends(get_settings),  # noqa: B008 - the README's style
    ) -> None:
        seen.append((event, db_session, settings))

    await serve_once(fastapi_app(handler, ("user.created", {"id": 1})))
    assert seen == [(("user.created", {"id": 1}), "session on conn", {"retries": 3})]


# Module level: with postponed annotations, Annotated[..., Depends(f)] is resolved from module globals.
LOG: list[str] = []


async def get_session() -> AsyncIterator[str]:
    LOG.append("open")
    yield "session"
    LOG.append("close")


def get_mailer() -> str:
    return "smtp"


async def test_yield_and_annotated_dependencies_and_overrides() -> None:
    """Beyond fastapi-events: ``yield`` dependencies, ``Annotated``, ``app.dependency_overrides``."""
    handler = LocalHandler()
    LOG.clear()

    @handler.register(event_name="user.created")
    async def welcome(
        event: Event,
        session: Annotated[str, Depends(get_session)],
        mailer: Annotated[str, Depends(get_mailer)],
    ) -> None:
        LOG.append(f"handler {event[0]} with {session} and {mailer}")

    app = fastapi_app(handler, ("user.created", None))
    app.dependency_overrides[get_mailer] = lambda: "fake mailer"
    await serve_once(app)
    assert LOG == ["open", "handler user.created with session and fake mailer", "close"]


def test_an_annotated_dependency_that_cannot_be_resolved_fails_at_registration() -> None:
    handler = LocalHandler()

    def local_dependency() -> int:
        return 1

    async def uses_it(event: Event, value: Annotated[int, Depends(local_dependency)]) -> None: ...

    with pytest.raises(ConfigurationError, match="cannot be resolved"):
        handler.register(uses_it)


async def test_plain_def_handlers_get_their_dependencies_too() -> None:
    """fastapi-events called plain def handlers without their dependencies."""
    handler = LocalHandler()
    seen: list[Any] = []

    def get_counter() -> Iterator[int]:
        yield 41

    @handler.register(event_name="*")
    def count(event: Event, counter: int = Depends(get_counter)) -> None:
        seen.append((event[0], counter + 1, threading.current_thread().name))

    await serve_once(fastapi_app(handler, ("tick", None)))
    [(name, value, thread)] = seen
    assert (name, value) == ("tick", 42)
    assert thread != threading.main_thread().name


# -- one tidings handler per function --------------------------------------------------------------------


async def test_each_function_is_a_tidings_handler_of_its_own() -> None:
    handler = LocalHandler()
    failures: list[HandlerError] = []

    @handler.register(event_name="order.*")
    async def charge(event: Event) -> None:
        raise RuntimeError("card declined")

    @handler.register(event_name="order.placed")
    async def confirm(event: Event) -> None:
        pass

    bus = EventBus(on_failure=failures.append)
    await serve_once(fastapi_app(handler, ("order.placed", 1), bus=bus))
    names = [spec.name for spec in bus.registry.resolve("order.placed")]
    assert [name.rsplit(".", 1)[-1] for name in names] == ["charge", "confirm"]
    [failure] = failures
    assert failure.handler.endswith("charge")
    assert [letter.handler for letter in await bus.dead_letters.list()] == [failure.handler]


async def test_one_function_under_two_matching_patterns_runs_once() -> None:
    handler = LocalHandler()
    calls: list[str] = []

    async def audit(event: Event) -> None:
        calls.append(str(event[0]))

    handler.register(audit, event_name="user.*")
    handler.register(audit, event_name="*")
    handler.register(audit, event_name="*")
    await serve_once(fastapi_app(handler, ("user.created", None), ("order.placed", None)))
    assert calls == ["user.created", "order.placed"]


async def test_functions_sharing_a_qualified_name_each_run() -> None:
    """fastapi-events has no handler names; tidings' must be unique, so the second gets '#2'."""
    handler = LocalHandler()
    calls: list[int] = []

    def make(number: int) -> None:
        @handler.register(event_name="made")
        async def made(event: Event) -> None:
            calls.append(number)

    make(1)
    make(2)
    bus = EventBus()
    await serve_once(fastapi_app(handler, ("made", None), bus=bus))
    assert calls == [1, 2]
    names = [spec.name for spec in bus.registry.resolve("made")]
    assert names[1] == names[0] + "#2"


# -- registration ---------------------------------------------------------------------------------------


def test_register_forms_return_the_function_unchanged() -> None:
    handler = LocalHandler()

    async def one(event: Event) -> None: ...

    async def two(event: Event) -> None: ...

    assert handler.register(one) is one
    assert handler.register(two, event_name="x") is two
    decorator = handler.register(event_name="y")
    assert decorator(one) is one
    assert handler._registry == {"*": [one], "x": [two], "y": [one]}


def test_signatures_no_call_could_satisfy_fail_at_registration() -> None:
    handler = LocalHandler()

    async def no_event() -> None: ...

    async def extra(event: Event, user_id: int) -> None: ...

    async def keyword_event(*, event: Event) -> None: ...

    for func in (no_event, extra, keyword_event):
        with pytest.raises(ConfigurationError):
            handler.register(func)

    async def with_defaults(event: Event, retries: int = 3, *rest: Any, **more: Any) -> None: ...

    def star_args(*args: Any) -> None: ...

    handler.register(with_defaults)
    handler.register(star_args)


async def test_calling_handle_directly_runs_every_match_and_raises_the_first_error() -> None:
    handler = LocalHandler()
    calls: list[str] = []

    async def get_greeting() -> str:
        return "hi"

    @handler.register(event_name="cat*")
    async def first(event: Event, greeting: str = Depends(get_greeting)) -> None:
        calls.append(f"first {greeting}")
        raise ValueError("first failed")

    @handler.register(event_name="*")
    def second(event: Event) -> None:
        calls.append(f"second {event[1]}")
        raise KeyError("second failed")

    with pytest.raises(ValueError, match="first failed"):
        await handler.handle(("cat_is_cute", 1))
    assert calls == ["first hi", "second 1"]
    await handler.handle_many([])


def test_the_default_local_handler_is_a_local_handler() -> None:
    assert isinstance(local_handler, LocalHandler)


def app_of(request: Request) -> str:
    return str(request.app.title)


async def test_a_dependency_may_ask_for_the_request_and_gets_the_app() -> None:
    handler = LocalHandler()
    seen: list[str] = []

    @handler.register(event_name="*")
    async def record(event: Event, title: Annotated[str, Depends(app_of)]) -> None:
        seen.append(title)

    app = fastapi_app(handler, ("x", None))
    app.title = "the shop"
    await serve_once(app)
    assert seen == ["the shop"]


# -- dependencies FastAPI cannot read: solved as fastapi-events solved them -------------------------------
# Module level: fastapi-events resolves annotations from the handler's module globals.


class SMTPClient:
    """Any class: FastAPI can make neither a query parameter nor a body field of it."""


def passing_through(func: Any) -> Any:
    """A decorator whose wrapper takes anything, as logging and retry decorators' wrappers do."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def get_host() -> str:
    return "smtp.test"


def get_smtp_mailer(host: str = Depends(get_host), client: SMTPClient | None = None) -> str:
    return f"mailer on {host}, client {client}"


@passing_through
def get_sender() -> str:
    return "shop@example.com"


def fastapi_events_local_handler(library: str) -> LocalHandler:
    """A new ``LocalHandler`` of tidings' layer, or of fastapi-events itself (the same API)."""
    if library == "tidings":
        return LocalHandler()
    original: Any = pytest.importorskip("fastapi_events.handlers.local")
    handler: LocalHandler = original.LocalHandler()
    return handler


async def serve_with(library: str, handler: Any, *events: tuple[str, Any]) -> None:
    """One request dispatching ``events`` to ``handler``, through ``library``'s middleware."""
    if library == "tidings":
        await serve_once(fastapi_app(handler, *events))
        return
    original_dispatch: Any = pytest.importorskip("fastapi_events.dispatcher").dispatch
    original_middleware: Any = pytest.importorskip("fastapi_events.middleware").EventHandlerASGIMiddleware
    app = FastAPI()
    app.add_middleware(original_middleware, handlers=[handler])

    @app.get("/")
    async def index() -> dict[str, str]:
        for name, payload in events:
            original_dispatch(name, payload)
        return {}

    async with client(app) as http:  # fastapi-events handles the events before the call returns
        assert (await http.get("/")).status_code == 200


@pytest.mark.parametrize("library", ["tidings", "fastapi-events"])
async def test_parameters_that_are_not_dependencies_keep_their_defaults(library: str) -> None:
    handler = fastapi_events_local_handler(library)
    seen: list[Any] = []

    @handler.register(event_name="user.signed_up")
    async def welcome(
        event: Event,
        mailer: str = Depends(get_smtp_mailer),  # its `client` parameter FastAPI cannot read
        sender: str = Depends(get_sender),  # (*args, **kwargs) to FastAPI's eyes
        client: SMTPClient | None = None,
    ) -> None:
        seen.append((event, mailer, sender, client))

    def logged(func: Any) -> Any:
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen.append("logged")
            return await func(*args, **kwargs)

        return wrapper

    @handler.register(event_name="user.signed_up")
    @logged
    async def audit(event: Event, client: SMTPClient | None = None, retries: int = 3) -> None:
        seen.append((event, client, retries))

    await serve_with(library, handler, ("user.signed_up", {"id": 1}))
    assert seen == [
        (("user.signed_up", {"id": 1}), "mailer on smtp.test, client None", "shop@example.com", None),
        "logged",
        (("user.signed_up", {"id": 1}), None, 3),
    ]


async def open_smtp(host: str = Depends(get_host), client: SMTPClient | None = None) -> AsyncIterator[str]:
    LOG.append(f"open {host}")
    yield "smtp session"
    LOG.append("close")


def connection_pool(*args: Any, **kwargs: Any) -> Iterator[str]:
    LOG.append("pool taken")
    yield "pool"
    LOG.append("pool given back")


def title_with(
    request: Request, mailer: str = Depends(get_smtp_mailer), client: SMTPClient | None = None
) -> str:
    return f"{request.app.title} via {mailer}"


async def test_dependencies_fastapi_cannot_read_keep_what_fastapi_brings() -> None:
    """``yield``, ``Request`` and the other dependencies' overrides still work around them."""
    handler = LocalHandler()
    LOG.clear()

    @handler.register(event_name="*")
    async def send(
        event: Event,
        session: Annotated[str, Depends(open_smtp)],
        pool: str = Depends(connection_pool),
        title: str = Depends(title_with),
    ) -> None:
        LOG.append(f"send with {session}, {pool}, {title}")

    app = fastapi_app(handler, ("user.signed_up", None))
    app.title = "the shop"
    app.dependency_overrides[get_host] = lambda: "smtp.fake"
    await serve_once(app)
    assert LOG == [
        "open smtp.fake",
        "pool taken",
        "send with smtp session, pool, the shop via mailer on smtp.fake, client None",
        "pool given back",
        "close",
    ]


def get_smtp_client(client: SMTPClient) -> SMTPClient:  # fastapi-events: TypeError at every event
    return client


def test_a_dependency_fastapi_cannot_read_with_a_required_parameter_fails_at_registration() -> None:
    handler = LocalHandler()

    async def send(event: Event, client: Annotated[SMTPClient, Depends(get_smtp_client)]) -> None: ...

    with pytest.raises(
        ConfigurationError, match="'client', which is neither a dependency nor given a default"
    ):
        handler.register(send)


async def test_a_plain_def_function_returning_a_coroutine_has_it_awaited(recorder: Recorder) -> None:
    """A decorator's plain ``def`` wrapper of an ``async def`` (fastapi-events never awaited it)."""
    handler = LocalHandler()
    loop_thread = threading.get_ident()

    async def record(event: Event) -> None:
        recorder.add((event, threading.get_ident() == loop_thread))

    handler.register(passing_through(record), event_name="*")
    await serve_once(fastapi_app(handler, ("through.the.app", 1)))
    await handler.handle(("called.directly", 2))
    assert await recorder.wait_count(2) == [(("through.the.app", 1), True), (("called.directly", 2), True)]
