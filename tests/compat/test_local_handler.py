"""``LocalHandler``: registration, FastAPI dependencies, one tidings handler per function, direct calls."""

from __future__ import annotations

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
