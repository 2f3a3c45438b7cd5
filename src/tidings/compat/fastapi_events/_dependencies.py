"""Local handlers' dependencies, given to FastAPI's solver as fastapi-events solved them.

fastapi-events solved only the ``Depends(...)`` parameters of a dependency, called it with those, and
left every other parameter to its default, so a dependency could take ``client: SMTPClient | None =
None`` (any class) or be a decorator's ``(*args, **kwargs)`` wrapper. FastAPI reads such parameters
as query or body fields, and refuses types it cannot validate. So a dependency FastAPI can read is
given to it as it is, and gets all of FastAPI (overrides, ``yield``, ``Request``); one it cannot read
(or whose own dependencies it cannot) is given as a stand-in whose signature shows only what FastAPI
fills for a handler run: its dependencies, the request objects (``Request``, ``BackgroundTasks``,
...) and parameters declared with FastAPI's markers (``Query(...)``, ...). Its other parameters keep
their defaults, as in fastapi-events. ``app.dependency_overrides`` cannot replace a stand-in, since
FastAPI looks overrides up by the dependency it is given.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import typing
from typing import TYPE_CHECKING, Any

from ...exceptions import ConfigurationError
from ._support import is_dependency, is_depends_marker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Generator

__all__ = ["readable_dependency"]

Views = dict[int, tuple[object, object]]
"""Dependency (by id, with the dependency itself, as ids are reused) -> what FastAPI is given."""

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def readable_dependency(parameter: inspect.Parameter, handler: str, views: Views) -> inspect.Parameter:
    """``parameter``, a dependency of ``handler``, with its ``Depends`` on something FastAPI can read.

    ``parameter.annotation`` is the resolved annotation. ``views`` is shared by one handler's
    dependencies, so a dependency used twice is one stand-in, and FastAPI still calls it once a run.

    Raises:
        ConfigurationError: a dependency FastAPI cannot read has a parameter with no default that
            is neither a dependency nor filled by FastAPI (no call could ever succeed).
    """
    annotation = parameter.annotation
    default = parameter.default
    if is_depends_marker(default):
        marker = _redirect(default, _strip_annotated(annotation), handler, views)
        return parameter if marker is default else parameter.replace(default=marker)
    if typing.get_origin(annotation) is not typing.Annotated:
        return parameter
    base, *metadata = typing.get_args(annotation)
    redirected = [
        _redirect(meta, base, handler, views) if is_depends_marker(meta) else meta for meta in metadata
    ]
    if all(new is old for new, old in zip(redirected, metadata, strict=True)):
        return parameter
    return parameter.replace(annotation=typing.Annotated[(base, *redirected)])


def _redirect(marker: Any, annotation: object, handler: str, views: Views) -> Any:
    """``marker`` itself if FastAPI can read its dependency; else a copy naming a stand-in."""
    dependency = marker.dependency if marker.dependency is not None else annotation  # Depends()
    view = _view(dependency, handler, views)
    if view is dependency:
        return marker
    redirected = copy.copy(marker)
    object.__setattr__(redirected, "dependency", view)  # Depends is a frozen dataclass in newer FastAPI
    return redirected


def _view(dependency: object, handler: str, views: Views) -> object:
    entry = views.get(id(dependency))
    if entry is not None and entry[0] is dependency:
        return entry[1]
    view = dependency if _fastapi_reads(dependency) else _stand_in(dependency, handler, views)
    views[id(dependency)] = (dependency, view)
    return view


def _fastapi_reads(dependency: object) -> bool:
    """Whether FastAPI can read ``dependency`` and fill all it asks for in a handler run."""
    from fastapi.dependencies.utils import get_dependant

    from ...integrations.fastapi import _check_dependant

    try:
        dependant = get_dependant(path="", call=dependency)  # type: ignore[arg-type]  # it says if not
        _check_dependant("", dependant)  # a required query parameter (a wrapper's *args), ...
    except Exception:
        return False
    return True


def _stand_in(dependency: object, handler: str, views: Views) -> object:
    """A callable of ``dependency``'s kind whose signature shows FastAPI what fastapi-events solved."""
    if not callable(dependency):
        return dependency  # FastAPI's own error, at registration, says what is wrong
    name = str(getattr(dependency, "__qualname__", None) or type(dependency).__qualname__)
    try:
        signature = inspect.signature(dependency)
    except (TypeError, ValueError):
        return dependency
    hints = _hints(dependency)
    shown: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        if parameter.kind in _VARIADIC:
            continue  # fastapi-events passed them nothing
        annotation = hints.get(parameter.name, parameter.annotation)
        if isinstance(annotation, str):
            if "Depends(" in annotation or "Security(" in annotation:
                raise ConfigurationError(
                    f"handler {handler}: the annotation of {parameter.name!r} in dependency {name} "
                    f"({annotation}) cannot be resolved, so its FastAPI dependency cannot be read; "
                    "define the names it uses at module level, outside TYPE_CHECKING"
                )
            annotation = inspect.Parameter.empty  # unresolvable: FastAPI could not read it either
        keyword = parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
        if is_dependency(annotation, parameter.default):
            shown.append(readable_dependency(keyword, handler, views))
        elif _filled_by_fastapi(annotation, parameter.default):
            shown.append(keyword)
        elif parameter.default is inspect.Parameter.empty:
            raise ConfigurationError(
                f"handler {handler}: dependency {name} takes {parameter.name!r}, which is neither a "
                "dependency nor given a default, so nothing can fill it"
            )
    stand_in = _calling(dependency)
    stand_in.__signature__ = inspect.Signature(shown)  # type: ignore[attr-defined]  # read by FastAPI
    stand_in.__name__ = str(getattr(dependency, "__name__", name))
    stand_in.__qualname__ = name
    stand_in.__module__ = str(getattr(dependency, "__module__", None) or type(dependency).__module__)
    stand_in.__doc__ = getattr(dependency, "__doc__", None)
    return stand_in


def _calling(dependency: Callable[..., Any]) -> Callable[..., Any]:
    """A function calling ``dependency``, of the kind FastAPI takes it for (generator, coroutine, ...).

    Not a ``functools.wraps`` wrapper: FastAPI would follow ``__wrapped__`` to the signature it
    must not see.
    """
    if _is_kind(dependency, inspect.isasyncgenfunction):

        async def async_generator(**values: Any) -> AsyncIterator[Any]:
            async with contextlib.asynccontextmanager(dependency)(**values) as value:
                yield value

        return async_generator
    if _is_kind(dependency, inspect.isgeneratorfunction):

        def generator(**values: Any) -> Generator[Any, Any, Any]:
            return (yield from dependency(**values))

        return generator
    if _is_kind(dependency, inspect.iscoroutinefunction):

        async def coroutine(**values: Any) -> Any:
            return await dependency(**values)

        return coroutine

    def function(**values: Any) -> Any:  # FastAPI runs it in its thread pool, as the dependency
        return dependency(**values)

    return function


def _is_kind(dependency: object, test: Callable[[object], bool]) -> bool:
    """Whether ``dependency`` (or its ``__call__``, or what it wraps) passes ``test``, as FastAPI sees it."""
    if inspect.isclass(dependency):
        return False  # calling a class makes an instance
    for candidate in (dependency, getattr(dependency, "__call__", None)):  # noqa: B004
        if not callable(candidate):
            continue
        with contextlib.suppress(ValueError):  # a __wrapped__ cycle
            candidate = inspect.unwrap(candidate)
        if test(candidate):
            return True
    return False


def _filled_by_fastapi(annotation: object, default: object) -> bool:
    """A parameter FastAPI fills for a handler run: a request object, or one declared with its markers."""
    from fastapi.security import SecurityScopes
    from starlette.background import BackgroundTasks
    from starlette.requests import HTTPConnection
    from starlette.responses import Response

    if _fastapi_marker(default):
        return True
    if typing.get_origin(annotation) is typing.Annotated and any(
        _fastapi_marker(meta) for meta in typing.get_args(annotation)[1:]
    ):
        return True
    cls = _strip_annotated(annotation)
    provided = (HTTPConnection, Response, BackgroundTasks, SecurityScopes)
    return isinstance(cls, type) and issubclass(cls, provided)


def _fastapi_marker(value: object) -> bool:
    """``Query(...)``, ``Header(...)``, ``Body(...)`` and the like."""
    return type(value).__module__.startswith("fastapi.")


def _strip_annotated(annotation: object) -> object:
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _hints(dependency: object) -> dict[str, Any]:
    """The resolved annotations of ``dependency``'s parameters; those that do not resolve, as written."""
    target: Any = dependency
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.isclass(target):
        target = target.__init__
    elif not inspect.isroutine(target):
        target = type(target).__call__
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # a name imported only for type checkers
        return dict(getattr(target, "__annotations__", None) or {})
