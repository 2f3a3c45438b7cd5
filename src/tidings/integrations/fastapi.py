"""FastAPI dependencies in event handlers, solved by FastAPI's own machinery.

A handler declares dependencies exactly as an endpoint does::

    async def get_db() -> AsyncIterator[Session]:
        async with Session() as session:
            yield session  # closed after the handler returns, also when it raises

    @bus.on("user.created")
    async def welcome(event: Event, db: Annotated[Session, Depends(get_db)]) -> None: ...

Each handler run solves its dependencies afresh (one cache per run, so a dependency used twice in
one run is called once), runs the handler, then closes the run's ``yield`` dependencies.
``app.dependency_overrides`` of the app the bus serves are honoured, so tests can override a
database for handlers as for endpoints. Dependencies that ask for the ``Request`` get a request
with no body, path or query: events have none. Sub-dependencies, ``async`` and plain ``def``
dependencies (the latter in FastAPI's thread pool) work as in endpoints.

FastAPI's solver (``fastapi.dependencies.utils``) is not a public API; the FastAPI versions this
is tested with are listed in the README ("Supported versions").
"""

from __future__ import annotations

import functools
import inspect
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .._core.binding import Plan
    from .._core.bus import EventBus
    from .._core.envelope import Event

try:
    from fastapi.dependencies.utils import get_dependant, solve_dependencies
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
except ImportError as exc:  # pragma: no cover - exercised only without FastAPI installed
    raise ImportError(
        "handlers with FastAPI dependencies need FastAPI: pip install 'tidings[fastapi]'"
    ) from exc

__all__ = ["dependency_call"]

_SOLVE_PARAMETERS = frozenset(inspect.signature(solve_dependencies).parameters)


def _dependencies_only(plan: Plan) -> Callable[..., Any]:
    """A stand-in whose signature holds just the handler's dependency parameters, for FastAPI to read.

    FastAPI would read any other parameter as a query parameter; the event fills those instead.
    """

    def stand_in(**values: Any) -> None:  # pragma: no cover - never called, only inspected
        return None

    parameters = [
        inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default, annotation=p.annotation)
        for p in plan.dependencies
    ]
    stand_in.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return stand_in


def _event_request(bus: EventBus, stack: AsyncExitStack) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "tidings",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": None,
        "server": None,
        "path_params": {},
        "app": bus.app,
        # where FastAPI 0.106+ keeps the exit stacks of yield dependencies
        "fastapi_astack": stack,
        "fastapi_inner_astack": stack,
        "fastapi_function_astack": stack,
    }
    return Request(scope)


def dependency_call(plan: Plan, bus: EventBus) -> Callable[[Event], Awaitable[None]]:
    """The async call the runner makes for a handler with FastAPI dependencies.

    Raises:
        ConfigurationError: FastAPI cannot read the dependencies.
    """
    try:
        dependant = get_dependant(path="", call=_dependencies_only(plan))
    except Exception as exc:
        raise ConfigurationError(f"handler {plan.name} has dependencies FastAPI cannot use: {exc}") from exc
    bind = plan.bind_with_extra()
    is_async = inspect.iscoroutinefunction(plan.fn) or inspect.iscoroutinefunction(
        getattr(plan.fn, "__call__", None)  # noqa: B004 - an async __call__ on an instance
    )
    options: dict[str, Any] = {}
    if "embed_body_fields" in _SOLVE_PARAMETERS:
        options["embed_body_fields"] = False

    async def call(event: Event) -> None:
        async with AsyncExitStack() as stack:
            request = _event_request(bus, stack)
            solved = await solve_dependencies(
                request=request,
                dependant=dependant,
                dependency_overrides_provider=bus.app,
                dependency_cache={},
                async_exit_stack=stack,
                **options,
            )
            errors = solved.errors
            if errors:
                raise ValueError(f"handler {plan.name}: its dependencies could not be solved: {errors}")
            if is_async:
                await bind(event, solved.values)
            else:
                await run_in_threadpool(functools.partial(bind, event, solved.values))

    return call
