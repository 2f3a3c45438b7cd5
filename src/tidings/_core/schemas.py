"""Typed events: event names of classes, and the schemas that payloads emitted by name must fit.

A typed event is an instance of a Pydantic model or a dataclass. Its event name is the class's
``__event_name__`` attribute if it has one, else the class's ``__name__``. A bus's schema registry
maps event names to such classes: a ``dict`` payload emitted under a registered name is validated
into an instance of the class at emit time (so handlers see the same typed payload whether the
caller emitted an instance or a dict), and payloads read back from the event log as JSON become
instances again before handlers see them.

Pydantic is optional: models need it anyway; dataclasses are validated with Pydantic when it is
installed, and built with ``cls(**payload)`` (no type checks) when it is not.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from ..exceptions import ConfigurationError, EventValidationError
from .envelope import Arguments
from .logs import described

__all__ = ["Schema", "SchemaRegistry", "class_key", "class_keys", "event_name_of", "is_event_class"]

# Caches of pure functions of a class. Bounded: an app that makes classes as it runs
# (``create_model``, ``make_dataclass``) must not keep every one of them alive.
_CLASS_CACHE_LIMIT: Final = 4096
_NAMES: dict[type, str] = {}
_NAME_ATTRIBUTE: Final = "__event_name__"


def is_event_class(cls: object) -> bool:
    """Whether ``cls`` is a class whose instances can be emitted as typed events."""
    return isinstance(cls, type) and (
        dataclasses.is_dataclass(cls) or callable(getattr(cls, "model_validate", None))
    )


def class_key(cls: type) -> str:
    """How the event log names a typed event's class (``module:qualname``)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def class_keys(cls: type) -> list[str]:
    """:func:`class_key` of ``cls`` and of its bases that are event classes themselves (not Pydantic's)."""
    return [
        class_key(base)
        for base in cls.__mro__
        if is_event_class(base) and not base.__module__.startswith("pydantic.")
    ]


def event_name_of(cls: type) -> str:
    """The event name of a typed event class: ``__event_name__`` if set, else the class's name.

    Raises:
        ConfigurationError: ``__event_name__`` is set to something other than a non-empty ``str``.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class UserCreated:
        ...     email: str
        >>> event_name_of(UserCreated)
        'UserCreated'
        >>> @dataclass
        ... class OrderPlaced:
        ...     __event_name__ = "order.placed"
        ...     order_id: int
        >>> event_name_of(OrderPlaced)
        'order.placed'
    """
    try:
        return _NAMES[cls]
    except KeyError:
        pass
    name = getattr(cls, _NAME_ATTRIBUTE, None)
    if name is None:
        name = cls.__name__
    elif hasattr(name, "value") and isinstance(name.value, str):  # an Enum member
        name = name.value
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{cls.__qualname__}.__event_name__ must be a non-empty str, got {name!r}")
    _remember(_NAMES, cls, name)
    return name


_FIELDS: dict[type, frozenset[str]] = {}


def field_names(cls: type) -> frozenset[str]:
    """The declared fields of a Pydantic model or dataclass (none for any other class)."""
    try:
        return _FIELDS[cls]
    except KeyError:
        pass
    model_fields = getattr(cls, "model_fields", None)
    if isinstance(model_fields, Mapping):
        names = frozenset(model_fields)
    elif dataclasses.is_dataclass(cls):
        names = frozenset(field.name for field in dataclasses.fields(cls))
    else:
        names = frozenset()
    _remember(_FIELDS, cls, names)
    return names


def _remember(cache: dict[type, Any], cls: type, value: Any) -> None:
    if len(cache) >= _CLASS_CACHE_LIMIT:
        cache.clear()
    cache[cls] = value


def _by_name(validate: Callable[..., Any]) -> Callable[[Any], Any]:
    """``validate`` accepting field names besides aliases, where Pydantic can (2.11 and later)."""
    try:
        supported = "by_name" in inspect.signature(validate).parameters
    except (TypeError, ValueError):
        supported = False
    return functools.partial(validate, by_name=True) if supported else validate


def _build_validators(cls: type) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """How to validate a payload emitted by a caller, and one read back from the log.

    The log holds models by field name (see :mod:`tidings.store.codec`), so revival also accepts
    field names where the class's own validation wants aliases.
    """
    model_validate = getattr(cls, "model_validate", None)
    if callable(model_validate):
        return model_validate, _by_name(model_validate)
    try:
        from pydantic import TypeAdapter
    except ImportError:  # no Pydantic: build the dataclass, which checks names but not types

        def construct(payload: Any) -> Any:
            if not isinstance(payload, Mapping):
                raise TypeError(f"expected a {cls.__qualname__} or a mapping, got {type(payload).__name__}")
            return cls(**payload)

        return construct, construct
    validate_python: Callable[..., Any] = TypeAdapter(cls).validate_python
    return validate_python, _by_name(validate_python)


def _problems(exc: Exception) -> list[tuple[str, str]]:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # a pydantic ValidationError
        try:
            found = errors(include_url=False)
        except TypeError:
            found = errors()
        return [
            (".".join(str(part) for part in error.get("loc", ())), str(error.get("msg", "")))
            for error in found
        ]
    return [("", described(exc))]


class Schema:
    """One registered event class: its name, fields and validator."""

    __slots__ = ("_revive", "_validate", "cls", "fields", "name")

    def __init__(self, cls: type, name: str) -> None:
        self.cls = cls
        self.name = name
        self.fields = field_names(cls)
        self._validate, self._revive = _build_validators(cls)

    def coerce(self, payload: Any, *, read_back: bool = False) -> Any:
        """``payload`` as an instance of the class: as it is if it is one, else validated into one.

        A dict, ``None`` (no fields) and keyword-only :class:`~tidings.Arguments` are validated.
        ``read_back``: the payload was read back from the log (or is a dict a handler's typed
        parameter is given), so field names are accepted besides aliases.

        Raises:
            EventValidationError: it does not fit.
        """
        if isinstance(payload, self.cls):
            return payload
        if payload is None:
            payload = {}
        elif type(payload) is Arguments and not payload.args:  # emit_now(name, field=value, ...)
            payload = dict(payload.kwargs)
        elif not isinstance(payload, Mapping):
            raise EventValidationError(
                self.name,
                self.cls,
                [("", f"expected a {self.cls.__qualname__} or a dict, got {type(payload).__name__}")],
            )
        elif type(payload) is not dict:  # Pydantic validates dataclasses from dicts only
            payload = dict(payload)
        try:
            return (self._revive if read_back else self._validate)(payload)
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            raise EventValidationError(self.name, self.cls, _problems(exc)) from exc


class SchemaRegistry:
    """The event classes one bus knows, by event name.

    ``by_name`` is read on the emit path: it stays empty (and falsy) until a schema is registered,
    so a bus without schemas pays one truth test per emit.
    """

    __slots__ = ("by_name", "names")

    def __init__(self) -> None:
        self.by_name: dict[str, Schema] = {}
        self.names: dict[type, str] = {}  # each class's first registered name

    def name_for(self, cls: type) -> str:
        """The event name of ``cls`` on this bus: the name it was registered under, else its own."""
        return self.names.get(cls) or event_name_of(cls)

    def add(self, cls: type, name: str | None = None) -> Schema:
        """Register ``cls`` as the schema of event ``name`` (default: the class's event name).

        Registering the same class under the same name again is a no-op.

        Raises:
            ConfigurationError: ``cls`` is not a Pydantic model or a dataclass, or the name has a
                different class already.
        """
        if not is_event_class(cls):
            raise ConfigurationError(f"an event schema must be a Pydantic model or a dataclass, got {cls!r}")
        if name is None:
            name = self.name_for(cls)
        elif not isinstance(name, str) or not name:
            raise ConfigurationError(f"an event name must be a non-empty str, got {name!r}")
        existing = self.by_name.get(name)
        if existing is not None:
            if existing.cls is cls:
                return existing
            raise ConfigurationError(
                f"event {name!r} has the schema {existing.cls.__qualname__} already; "
                f"{cls.__qualname__} needs a name of its own (set __event_name__)"
            )
        schema = Schema(cls, name)
        self.by_name[name] = schema
        # emit(cls(...)) goes by its first registered name, its own included: a second name
        # registered later (bus.schema(Cls, name="user.imported")) must not take its events away
        # from the handlers of the first
        self.names.setdefault(cls, name)
        return schema

    def snapshot(self) -> tuple[dict[str, Schema], dict[type, str]]:
        """The registrations as they are now, for :meth:`restore`."""
        return dict(self.by_name), dict(self.names)

    def restore(self, snapshot: tuple[dict[str, Schema], dict[type, str]]) -> None:
        """Put back the registrations of a :meth:`snapshot` (in place: the bus holds ``by_name``)."""
        by_name, names = snapshot
        self.by_name.clear()
        self.by_name.update(by_name)
        self.names.clear()
        self.names.update(names)

    def get(self, name: str) -> Schema | None:
        """The schema registered for ``name``, if any."""
        return self.by_name.get(name)

    def validate(self, name: str, payload: Any) -> Any:
        """``payload`` made to fit ``name``'s schema (unchanged when ``name`` has none).

        Raises:
            EventValidationError: it does not fit.
        """
        schema = self.by_name.get(name)
        return payload if schema is None else schema.coerce(payload)

    def revive(self, name: str, payload: Any) -> Any:
        """A payload read back from the log as JSON, as its class again when it can be.

        A payload that no longer fits (the class changed since it was written) stays as it was
        read; a handler that asks for the class then fails, visibly, with the validation error.
        """
        schema = self.by_name.get(name)
        if schema is None or isinstance(payload, schema.cls):
            return payload
        try:
            return schema.coerce(payload, read_back=True)
        except EventValidationError:
            return payload

    def __iter__(self) -> Iterator[Schema]:
        return iter(tuple(self.by_name.values()))

    def __len__(self) -> int:
        return len(self.by_name)
