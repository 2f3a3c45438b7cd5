"""What a handler's parameters ask for, worked out once at registration.

A handler gets what its signature asks for:

* a parameter annotated :class:`~tidings.Event` gets the event envelope;
* a handler with a single parameter and no annotation (``def audit(event)``) gets the envelope too;
* a parameter annotated with the event's class (or a base of it) gets the payload, typed; a dict
  given for a parameter typed with an event class (the payload, a field or an argument, as the
  durable log gives them back) is validated into that class (containers such as ``list[Item]``
  are not);
* a FastAPI dependency (``Depends(...)``, ``Annotated[..., Depends(...)]``) is solved for each run by
  :mod:`tidings.integrations.fastapi`, with FastAPI's own machinery;
* any other parameter is a *data* parameter, filled from the payload: from the arguments of an
  event emitted with several (:class:`~tidings.Arguments`), else by name from the payload's fields
  (a model's or dataclass's attributes, a mapping's keys). A parameter with a default may be
  missing from the payload.

When the handler's events have a known schema (registered by class, or a name with a registered
schema), every required data parameter must be one of its fields: a handler that could never be
called fails at registration. Handlers that take the envelope only are called with it directly,
with no binding work per call.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

from ..exceptions import ConfigurationError, EventValidationError
from .envelope import Arguments, Event, TypedDump
from .schemas import Schema, class_key, field_names, is_event_class

__all__ = ["BindingStyle", "Plan", "dependency_parameters", "plan_handler"]

BindingStyle = Literal["auto", "arguments"]
"""``"auto"``: the rules above; ``"arguments"``: every parameter not annotated ``Event`` is a data
parameter (how Litestar listeners and ``emit(name, *args)`` handlers are written). Under
``"arguments"`` an annotation that cannot be resolved (a name imported under ``TYPE_CHECKING``)
is an argument's class, never the envelope, even if it is spelled ``"Event"``."""

_ENVELOPE: Final = "envelope"
_PAYLOAD: Final = "payload"
_DATA: Final = "data"
_DEPENDENCY: Final = "dependency"
_MISSING: Final = inspect.Parameter.empty
_POSITIONAL: Final = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_UNTYPED: Final = (_MISSING, Any, object)


def _is_dependency(value: object) -> bool:
    # Duck-typed, so the core never imports FastAPI: fastapi.params.Depends (and Security).
    return type(value).__module__.startswith("fastapi.") and hasattr(value, "dependency")


def _dependency_marker(annotation: object, default: object) -> bool:
    if _is_dependency(default):
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return any(_is_dependency(meta) for meta in typing.get_args(annotation)[1:])
    return False


# What FastAPI fills in endpoints, and in a handler only for a dependency that asks for it: as a
# handler's own parameter it would be read as a payload field no event carries. By name, so the core
# never imports Starlette or FastAPI.
_REQUEST_OBJECTS: Final = frozenset(
    {
        ("starlette.requests", "HTTPConnection"),
        ("starlette.responses", "Response"),
        ("starlette.background", "BackgroundTasks"),
        ("fastapi.security.oauth2", "SecurityScopes"),
    }
)


def _is_request_object(annotation: object) -> bool:
    return isinstance(annotation, type) and any(
        (getattr(cls, "__module__", ""), cls.__name__) in _REQUEST_OBJECTS for cls in annotation.__mro__
    )


def _unresolved_dependency(annotation: object) -> bool:
    """An annotation left as text that still reads as a FastAPI dependency (its names did not resolve)."""
    return isinstance(annotation, str) and ("Depends(" in annotation or "Security(" in annotation)


def dependency_parameters(fn: Callable[..., Any]) -> list[str]:
    """The names of ``fn``'s parameters that declare a FastAPI dependency, resolved or not.

    For callables that are not planned (batch handlers, handler objects' ``handle``/``handle_many``):
    nothing solves their dependencies, so registering them must fail rather than call them with the
    marker, or without the argument. A signature that cannot be read declares none.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    hints = _hints(fn, [])
    names = []
    for parameter in signature.parameters.values():
        annotation = hints.get(parameter.name, parameter.annotation)
        if _dependency_marker(annotation, parameter.default) or _unresolved_dependency(annotation):
            names.append(parameter.name)
    return names


def _strip_annotated(annotation: object) -> object:
    """The type an annotation is about: without ``Annotated[...]``, and ``X`` for ``X | None``."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _admits_none(annotation: object) -> bool:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation is None or annotation is type(None):
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )


def _checkable(cls: type) -> bool:
    """Whether ``isinstance``/``issubclass`` work with ``cls`` (not with a TypedDict or a plain Protocol)."""
    if typing.is_typeddict(cls):
        return False
    return not (getattr(cls, "_is_protocol", False) and not getattr(cls, "_is_runtime_protocol", False))


def _runtime_type(annotation: object) -> type | None:
    """The class ``isinstance`` can check for an annotation (``dict`` for ``dict[str, int]``), if any."""
    bare = _strip_annotated(annotation)
    if isinstance(bare, type) and typing.is_typeddict(bare):
        return dict  # a TypedDict is a dict at run time
    origin = typing.get_origin(bare)
    if isinstance(origin, type):
        return origin if _checkable(origin) else None
    return bare if isinstance(bare, type) and _checkable(bare) else None


def _is_envelope(annotation: object, *, style: BindingStyle = "auto") -> bool:
    annotation = _strip_annotated(annotation)
    if isinstance(annotation, str):  # unresolvable forward reference (imported under TYPE_CHECKING)
        # "auto" refuses any other unresolvable annotation, so the text can only mean the envelope;
        # "arguments" takes it for an argument's class: a listener's own ``Event`` class is one too
        return style == "auto" and annotation.rpartition(".")[2] == "Event"
    return isinstance(annotation, type) and issubclass(annotation, Event)


def _hints(fn: Callable[..., Any], schemas: list[Schema]) -> dict[str, Any]:
    while isinstance(fn, functools.partial):
        fn = fn.func
    target = fn if inspect.isroutine(fn) or inspect.isclass(fn) else type(fn).__call__
    # the event classes by name too: a class defined in a function is in no module's globals
    local = {schema.cls.__name__: schema.cls for schema in schemas}
    try:
        return typing.get_type_hints(target, localns=local, include_extras=True)
    except Exception:  # a name imported only for type checkers: resolve them one by one
        pass
    hints: dict[str, Any] = {}
    namespace = {**getattr(target, "__globals__", {}), **local}
    for key, annotation in (getattr(target, "__annotations__", None) or {}).items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # the handler's own annotation text
            except Exception:  # keep the text: it may still say "Event"
                pass
        hints[key] = annotation
    return hints


class Param:
    """One parameter of a handler and what fills it."""

    __slots__ = (
        "_schema",
        "annotation",
        "annotation_type",
        "default",
        "event_class",
        "event_class_key",
        "kind",
        "name",
        "nullable",
        "source",
    )

    def __init__(self, parameter: inspect.Parameter, annotation: object, source: str) -> None:
        self.name = parameter.name
        self.kind = parameter.kind
        self.default = parameter.default
        self.annotation = annotation
        # what isinstance() checks a typed parameter against (``object`` matches anything)
        self.annotation_type: type = _runtime_type(annotation) or object
        self.source = source
        # a typed event class: a dict given for it (read back from the log) is validated into one
        self.event_class = self.annotation_type if is_event_class(self.annotation_type) else None
        self.event_class_key = None if self.event_class is None else class_key(self.event_class)
        # whether None may fill it: ``X | None``, ``Optional[X]``, or a default of None
        self.nullable = parameter.default is None or _admits_none(annotation)
        self._schema: Schema | None = None

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def _schema_of(self) -> Schema:
        schema = self._schema
        if schema is None:
            assert self.event_class is not None
            schema = self._schema = Schema(self.event_class, self.event_class.__qualname__)
        return schema

    def revive(self, payload: Mapping[str, Any], event: Event, handler: str) -> Any:
        """``payload`` as the event class this parameter asks for (a dict read back from the log).

        Raises:
            TypeError: the dict does not fit the class (naming the handler, the event and the fields).
        """
        try:
            return self._schema_of().coerce(payload, read_back=True)
        except EventValidationError as exc:
            details = "; ".join(
                f"field {field!r}: {message}" if field else message for field, message in exc.errors
            )
            raise TypeError(
                f"handler {handler} takes {self.name}: {self.annotation_type.__qualname__}, but event "
                f"{event.name!r} ({event.id}) carries a dict that does not fit it: {details}"
            ) from exc


class Plan:
    """How to call one handler with one event.

    Attributes:
        direct: the handler takes the envelope as its only required argument: call it with it.
        params: every parameter, in order, with what fills it.
        dependencies: the FastAPI dependency parameters (solved by the FastAPI integration).
        guessed_envelope: a lone untyped parameter was taken for the envelope because no known
            schema has a field of its name (a schema registered later may have one: plan again).
    """

    __slots__ = (
        "dependencies",
        "direct",
        "fn",
        "guessed_envelope",
        "name",
        "params",
        "style",
        "var_keyword",
        "var_positional",
    )

    def __init__(self, fn: Callable[..., Any], name: str, params: list[Param], style: BindingStyle) -> None:
        self.fn = fn
        self.name = name
        self.style = style
        self.guessed_envelope = False
        self.params = [p for p in params if p.kind not in (p.kind.VAR_POSITIONAL, p.kind.VAR_KEYWORD)]
        self.var_positional = any(p.kind is p.kind.VAR_POSITIONAL for p in params)
        self.var_keyword = any(p.kind is p.kind.VAR_KEYWORD for p in params)
        self.dependencies = [p for p in self.params if p.source == _DEPENDENCY]
        required = [p for p in self.params if p.required or p.source in (_ENVELOPE, _DEPENDENCY)]
        self.direct = (
            len(required) == 1
            and required[0] is self.params[0]
            and required[0].source == _ENVELOPE
            and required[0].kind in _POSITIONAL
        )

    @property
    def data(self) -> list[Param]:
        return [p for p in self.params if p.source in (_DATA, _PAYLOAD)]

    def check(self, schema: Schema) -> None:
        """Fail now if this handler could never be called with ``schema``'s events.

        Raises:
            ConfigurationError: a parameter typed with an unrelated class, or a required data
                parameter that is not a field of the schema.
        """
        if self.style == "arguments":
            return  # the emit's arguments fill the parameters, whatever the payload's class
        for param in self.params:
            annotation = _strip_annotated(param.annotation)
            if param.source == _PAYLOAD:
                if not (isinstance(annotation, type) and issubclass(schema.cls, annotation)):
                    raise ConfigurationError(
                        f"handler {self.name} takes {param.name}: {_describe(annotation)}, but event "
                        f"{schema.name!r} carries a {schema.cls.__qualname__}"
                    )
            elif param.source == _DATA and param.required and param.name not in schema.fields:
                raise ConfigurationError(
                    f"handler {self.name} asks for {param.name!r}, which event {schema.name!r} "
                    f"({schema.cls.__qualname__}) does not have; its fields are "
                    + (", ".join(sorted(schema.fields)) or "none")
                )

    def build(self) -> Callable[[Event], Any]:
        """The function the runner calls with one event (the handler itself when ``direct``)."""
        if self.direct:
            return self.fn
        return _binder(self)

    def bind_with_extra(self) -> Callable[[Event, Mapping[str, Any] | None], Any]:
        """A call taking the event and the solved dependency values (by parameter name)."""
        return _binder(self)


def _describe(annotation: object) -> str:
    return getattr(annotation, "__qualname__", None) or repr(annotation)


def plan_handler(
    fn: Callable[..., Any],
    name: str,
    *,
    schemas: list[Schema],
    style: BindingStyle = "auto",
) -> Plan:
    """Work out what ``fn``'s parameters ask for.

    Args:
        fn: the handler.
        name: its name, for error messages.
        schemas: the schemas of the events it is registered for, as far as they are known.
        style: ``"auto"`` or ``"arguments"`` (see :data:`BindingStyle`).

    Raises:
        ConfigurationError: the signature cannot be read, or cannot be satisfied by the events.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the signature of handler {name}: {exc}") from exc
    hints = _hints(fn, schemas)
    params: list[Param] = []
    for parameter in signature.parameters.values():
        annotation = hints.get(parameter.name, parameter.annotation)
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            params.append(Param(parameter, annotation, _DATA))
        elif _dependency_marker(annotation, parameter.default):
            params.append(Param(parameter, annotation, _DEPENDENCY))
        elif _unresolved_dependency(annotation):
            raise ConfigurationError(
                f"handler {name}: the annotation of {parameter.name!r} ({annotation}) cannot be "
                "resolved, so its FastAPI dependency cannot be read; define the names it uses at "
                "module level, outside TYPE_CHECKING"
            )
        elif _is_envelope(annotation, style=style):
            params.append(Param(parameter, annotation, _ENVELOPE))
        else:
            bare = _strip_annotated(annotation)
            checkable = _runtime_type(bare) is bare
            typed = style == "auto" and (
                is_event_class(bare)
                or any(
                    checkable and issubclass(schema.cls, bare) and bare not in _UNTYPED  # type: ignore[arg-type]
                    for schema in schemas
                )
            )
            if (
                style == "auto"
                and _is_request_object(bare)
                # a field of the event, typed so (arbitrary_types_allowed): the event carries it
                and not any(parameter.name in schema.fields for schema in schemas)
            ):
                raise ConfigurationError(
                    f"handler {name} takes {parameter.name}: {_describe(bare)}, which handlers are not "
                    "given: they run after the response, for events, not requests. Ask for it in a "
                    "FastAPI dependency (Depends), which gets a request of the handler's own run"
                )
            if isinstance(bare, str) and style == "auto" and not _is_envelope(bare):
                raise ConfigurationError(
                    f"handler {name}: the annotation of {parameter.name!r} ({bare!r}) cannot be "
                    "resolved, so what it asks for is unknown; import the name at run time (not only "
                    "under TYPE_CHECKING), or annotate the parameter with Event"
                )
            params.append(Param(parameter, annotation, _PAYLOAD if typed else _DATA))
    guessed = style == "auto" and _guess_envelope(params, schemas)
    plan = Plan(fn, name, params, style)
    plan.guessed_envelope = guessed
    if len([p for p in plan.params if p.source == _ENVELOPE]) > 1:
        raise ConfigurationError(f"handler {name} takes the event envelope more than once")
    for schema in schemas:
        plan.check(schema)
    return plan


def _guess_envelope(params: list[Param], schemas: list[Schema]) -> bool:
    """``def audit(event)``: a first, lone required parameter, untyped and no field's name: the envelope.

    Returns whether it made that guess.
    """
    candidates = [p for p in params if p.source != _DEPENDENCY and p.required and p.kind in _POSITIONAL]
    if len(candidates) != 1 or candidates[0] is not params[0]:
        return False
    only = candidates[0]
    if only.source != _DATA or _strip_annotated(only.annotation) not in _UNTYPED:
        return False
    if any(only.name in schema.fields for schema in schemas):
        return False
    only.source = _ENVELOPE
    return True


def _binder(plan: Plan) -> Callable[..., Any]:
    fn = plan.fn
    params = [p for p in plan.params if p.source != _DEPENDENCY]
    # dependencies are passed by keyword, so a parameter after one cannot be passed by position
    dependency_at = next((i for i, p in enumerate(plan.params) if p.source == _DEPENDENCY), len(plan.params))
    by_keyword = frozenset(p.name for p in plan.params[dependency_at:])
    data = [p for p in params if p.source in (_DATA, _PAYLOAD)]
    # one data parameter typed with a class the payload is an instance of: it gets the payload
    whole = data[0] if len(data) == 1 else None
    whole_type = _runtime_type(whole.annotation) if whole is not None else None
    if whole_type in _UNTYPED:
        whole_type = None
    arguments_only = plan.style == "arguments"
    none_is_argument = bool(data) and data[0].required and data[0].kind in _POSITIONAL
    var_positional = plan.var_positional
    var_keyword = plan.var_keyword
    name = plan.name

    def call(event: Event, extra: Mapping[str, Any] | None = None) -> Any:
        payload = event.payload
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        positional = True  # still filling positionally (stops at the first one left to its default)
        if type(payload) is Arguments:
            given = list(payload.args)
            named = dict(payload.kwargs)
            fields: Any = None
        elif arguments_only:  # emit(name, payload): the payload is the one argument
            # None is "no payload" too: it fills a required first parameter, else the defaults hold
            given = [payload] if payload is not None or none_is_argument else []
            named = {}
            fields = None
        else:
            given = []
            named = {}
            fields = payload
        value: Any
        for param in params:
            source = param.source
            if source == _ENVELOPE:
                value = event
            elif (source == _PAYLOAD and isinstance(payload, param.annotation_type)) or (
                whole is param
                and whole_type is not None
                and isinstance(payload, whole_type)
                and (fields is None or _field(fields, param.name) is _MISSING)  # a field of its name wins
            ):
                value = payload
                if given and given[0] is payload:  # bind="arguments": the payload was the one argument
                    given.pop(0)
            elif (
                type(fields) is TypedDump
                and param.event_class is not None
                and param.event_class_key in fields.type_keys
            ):
                value = param.revive(fields, event, name)  # an instance of this class, read back from the log
            elif given and param.kind in _POSITIONAL:
                value = given.pop(0)
            elif param.name in named:
                value = named.pop(param.name)
            elif (
                fields is not None
                and (value := _field(fields, param.name)) is not _MISSING
                and (source != _PAYLOAD or param.event_class is None or _could_be(value, param.event_class))
            ):
                if value is None and param.event_class is not None and not param.nullable:
                    raise TypeError(
                        f"handler {name} takes {param.name}: {param.event_class.__qualname__}, but "
                        f"field {param.name!r} of event {event.name!r} ({event.id}) is None (annotate "
                        f"it {param.event_class.__qualname__} | None to accept that)"
                    )
            elif whole is param and param.event_class is not None and isinstance(fields, Mapping):
                # the handler's one typed parameter, and the class's fields as a dict (read back
                # from the log as JSON, or emitted under a name with no schema): an instance
                value = param.revive(fields, event, name)
            elif source == _PAYLOAD:
                raise TypeError(
                    f"handler {name} takes {param.name}: {_describe(_strip_annotated(param.annotation))}, "
                    f"but event {event.name!r} ({event.id}) carries a {type(payload).__name__}"
                )
            elif not param.required:
                if positional and param.kind is inspect.Parameter.POSITIONAL_ONLY:
                    value = param.default  # a later positional-only one may be given: keep the places
                else:
                    positional = False
                    continue
            else:
                raise TypeError(
                    f"handler {name} needs {param.name!r}, which event {event.name!r} "
                    f"({event.id}) does not carry"
                )
            if (
                param.event_class is not None
                and type(value) is not param.event_class  # the common case, and cheaper than isinstance
                and isinstance(value, Mapping)
            ):
                value = param.revive(value, event, name)  # an argument or field read back from the log
            if positional and param.kind in _POSITIONAL and param.name not in by_keyword:
                args.append(value)
            else:
                kwargs[param.name] = value
        if given:
            if not var_positional:
                raise TypeError(f"handler {name} takes no more positional arguments, got {len(given)} more")
            args.extend(given)
        if named:
            if not var_keyword:
                raise TypeError(f"handler {name} got unexpected keyword argument(s): {', '.join(named)}")
            kwargs.update(named)
        elif var_keyword and isinstance(fields, Mapping):
            taken = {p.name for p in params}
            kwargs.update({k: v for k, v in fields.items() if k not in taken and isinstance(k, str)})
        if extra:
            kwargs.update(extra)
        return fn(*args, **kwargs)

    return call


def _could_be(value: object, cls: type) -> bool:
    """Whether a typed parameter can take ``value``: an instance, ``None``, or a dict to validate."""
    return value is None or isinstance(value, cls | Mapping)


def _field(payload: Any, name: str) -> Any:
    """The payload's field ``name``: a mapping's key, a model's or dataclass's field, else nothing.

    Never any attribute: an optional parameter named ``copy`` must get its default, not a method.
    """
    if isinstance(payload, Mapping):
        return payload.get(name, _MISSING)
    if name in field_names(type(payload)):
        return getattr(payload, name, _MISSING)
    return _MISSING
