"""A mapping of event names to the Pydantic models their payloads must fit."""

from __future__ import annotations

import sys
from abc import ABCMeta
from collections import UserDict
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ..errors import MissingEventNameDuringRegistration

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..typing import EventName

__all__ = ["BaseEventPayloadSchemaRegistry"]

SchemaT = TypeVar("SchemaT", bound=type)


def _check_model(schema: type) -> None:
    pydantic = sys.modules.get("pydantic")  # a class that is a Pydantic model has imported it
    base: Any = getattr(pydantic, "BaseModel", None)
    if base is None or not (isinstance(schema, type) and issubclass(schema, base)):
        # AssertionError, as fastapi-events raises (code may catch it)
        raise AssertionError("'schema' must be a subclass of Pydantic BaseModel")


class BaseEventPayloadSchemaRegistry(UserDict[Any, type], metaclass=ABCMeta):
    """Event name -> Pydantic model; ``dispatch()`` validates payloads against it.

    Keys are event names as given: a ``str``, or an ``Enum`` member (looked up with the name
    ``dispatch()`` is given, as in fastapi-events). Wildcards are not supported.

    Example:
        >>> import pydantic
        >>> from tidings.compat.fastapi_events.registry.payload_schema import EventPayloadSchemaRegistry
        >>> schemas = EventPayloadSchemaRegistry()
        >>> @schemas.register(event_name="user.signed_up")
        ... class SignUp(pydantic.BaseModel):
        ...     user_id: int
        >>> @schemas.register
        ... class Activated(pydantic.BaseModel):
        ...     __event_name__ = "user.activated"
        ...     user_id: int
        >>> sorted(schemas)
        ['user.activated', 'user.signed_up']
    """

    @overload
    def register(self, _schema: SchemaT, event_name: EventName | None = None) -> SchemaT: ...

    @overload
    def register(
        self, _schema: None = None, event_name: EventName | None = None
    ) -> Callable[[SchemaT], SchemaT]: ...

    def register(
        self, _schema: SchemaT | None = None, event_name: EventName | None = None
    ) -> SchemaT | Callable[[SchemaT], SchemaT]:
        """Register a Pydantic model as the payload schema of an event; works as a decorator too.

        Args:
            _schema: the model (omitted when used as ``@registry.register(event_name=...)``).
            event_name: the event's name; defaults to the model's ``__event_name__``.

        Returns:
            The model, unchanged (or a decorator that registers one).

        Raises:
            MissingEventNameDuringRegistration: no ``event_name`` and no ``__event_name__``.
            AssertionError: the schema is not a Pydantic model.
        """

        def wrap(schema: SchemaT) -> SchemaT:
            _check_model(schema)
            name = event_name or getattr(schema, "__event_name__", None)
            if not name:
                raise MissingEventNameDuringRegistration
            self.data[name] = schema
            return schema

        if _schema is None:
            return wrap
        return wrap(_schema)
