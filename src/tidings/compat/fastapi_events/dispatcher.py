"""``dispatch()``: fastapi-events' way to emit an event, on tidings' machinery.

Where an event goes:

* in an HTTP request served by
  :class:`~tidings.compat.fastapi_events.middleware.EventHandlerASGIMiddleware`: buffered, handled
  after the response has been sent (as in fastapi-events);
* in a handler: handled by the same job, right after the handlers running now, in order;
* with ``middleware_id=``: to that middleware's bus (buffered if this is one of its requests);
* in the app's lifespan (startup code), a websocket, or a task started from one of them: to that
  app's bus at once;
* anywhere else (a thread, a task with no context): to the process's running bus if exactly one is
  running; otherwise the event is logged as an error and dropped. fastapi-events raised
  ``LookupError`` there; tidings never fails the caller for a reason it did not cause.
"""

from __future__ import annotations

import logging
import sys
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, cast

from ..._core.dispatcher import current_scope, live_buses
from ..._core.dispatcher import emit as _emit
from ..._core.logs import fields
from ._support import bus_for, dispatch_disabled, dispatch_off, name_key
from .errors import MissingEventNameDuringDispatch, MultiplePayloadsDetectedDuringDispatch
from .registry.payload_schema import registry as _default_registry

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .registry.base import BaseEventPayloadSchemaRegistry
    from .typing import EventName

__all__ = ["DEFAULT_PAYLOAD_SCHEMA_CLS_DICT_ARGS", "dispatch"]

logger = logging.getLogger("tidings")

DEFAULT_PAYLOAD_SCHEMA_CLS_DICT_ARGS: Final[Mapping[str, Any]] = {"exclude_unset": True}
"""What ``model_dump()`` is given when ``payload_schema_cls_dict_args`` is not."""

_schemas = _default_registry.data  # read on the fast path: one dict, cleared in place, never replaced


def _disabled() -> bool:
    """The switch as the request the middleware checked read it; else as the environment says now."""
    off = dispatch_off()
    return dispatch_disabled() if off is None else off


def dispatch(
    event_name_or_model: object = None,
    payload: object = None,
    event_name: EventName | None = None,
    validate_payload: bool = True,
    payload_schema_cls_dict_args: Mapping[str, Any] | None = None,
    payload_schema_registry: BaseEventPayloadSchemaRegistry | None = None,
    middleware_id: int | None = None,
    payload_schema_dump: bool = True,
) -> None:
    """Dispatch an event: handled after the response when called in a request.

    Handlers receive ``(event_name, payload)``: the name as given (a ``str`` or the ``Enum`` member)
    and the payload, validated and dumped as described below.

    Args:
        event_name_or_model: the event's name (a ``str`` or an ``Enum`` member), or a Pydantic model
            instance whose class sets ``__event_name__``: its ``model_dump()`` becomes the payload
            (or the instance itself, with ``payload_schema_dump=False``).
        payload: the payload: anything, usually a ``dict``. Not allowed with a model.
        event_name: the event's name; takes precedence over the model's ``__event_name__``.
        validate_payload: validate a ``dict`` (or empty) payload against the schema registered for
            the name, if any, and pass on the validated model's dump.
        payload_schema_cls_dict_args: keyword arguments for ``model_dump()``; default
            ``{"exclude_unset": True}``.
        payload_schema_registry: the schema registry to validate against; default
            ``registry.payload_schema.registry``. (An empty one counts as none given, as in
            fastapi-events.)
        middleware_id: send the event to the bus of the middleware created with this id, from
            anywhere (a task started at startup, a thread). Not needed in requests or handlers.
        payload_schema_dump: pass handlers the dump of a model (``True``) or the model instance.

    Raises:
        MultiplePayloadsDetectedDuringDispatch: a model and a ``payload`` were both given.
        MissingEventNameDuringDispatch: no name: neither ``event_name``, nor a name as first
            argument, nor ``__event_name__`` on the model.
        pydantic.ValidationError: the payload does not fit the schema registered for the name.
        TypeError: the name is neither a ``str`` nor an ``Enum`` member.

    Example:
        >>> from tidings.compat.fastapi_events.dispatcher import dispatch
        >>> def adopt(cat_id: str) -> None:
        ...     dispatch("cat-requested-a-fish", payload={"cat_id": cat_id})
    """
    # The fast path, as tidings.emit() in a request: a str name, nothing to validate, and a scope
    # that buffers (a request the middleware checked the disable switch for, or a handler job).
    if (
        type(event_name_or_model) is str
        and event_name is None
        and middleware_id is None
        and payload_schema_registry is None
        and (not _schemas or not validate_payload or event_name_or_model not in _schemas)
    ):
        scope = current_scope()
        if scope is not None and scope.buffer is not None:
            off = dispatch_off()  # _disabled(), inlined: this is the path dispatch() is timed on
            if not (dispatch_disabled() if off is None else off):
                _emit(event_name_or_model, payload)
            return
    _dispatch(
        event_name_or_model,
        payload,
        event_name,
        validate_payload,
        payload_schema_cls_dict_args,
        payload_schema_registry,
        middleware_id,
        payload_schema_dump,
    )


def _is_model(value: object) -> bool:
    pydantic = sys.modules.get("pydantic")  # no Pydantic imported: no model exists
    return pydantic is not None and isinstance(value, pydantic.BaseModel)


def _dump(model: Any, args: Mapping[str, Any] | None) -> Any:
    dump = getattr(model, "model_dump", None) or model.dict  # Pydantic 2, else 1
    return dump(**(args or DEFAULT_PAYLOAD_SCHEMA_CLS_DICT_ARGS))


def _dispatch(
    event_name_or_model: object,
    payload: object,
    event_name: EventName | None,
    validate_payload: bool,
    dict_args: Mapping[str, Any] | None,
    schema_registry: BaseEventPayloadSchemaRegistry | None,
    middleware_id: int | None,
    dump: bool,
) -> None:
    given = event_name_or_model
    is_name = isinstance(given, str | Enum)
    if given and not is_name and payload:
        raise MultiplePayloadsDetectedDuringDispatch
    name: Any = event_name
    if not name:
        name = given if is_name else getattr(given, "__event_name__", None)
    if given is not None and not is_name:
        # A model (or another object naming its event, a dataclass say): it is the payload.
        if not name:
            raise MissingEventNameDuringDispatch
        if not payload:
            payload = _dump(given, dict_args) if dump and _is_model(given) else given
    elif name is None:
        raise MissingEventNameDuringDispatch
    elif validate_payload and (not payload or isinstance(payload, dict)):
        schemas = schema_registry or _default_registry
        schema = schemas.get(name)
        if schema is not None:
            # a pydantic.ValidationError reaches the caller: the payload is the caller's bug
            validated = schema(**(cast("Mapping[str, Any]", payload) or {}))
            payload = _dump(validated, dict_args) if dump else validated
    key, headers = name_key(name)
    # Read after validation, as fastapi-events does: a bad payload raises even while disabled.
    if _disabled():
        return
    if middleware_id is not None:
        bus = bus_for(middleware_id)
        if bus is not None:
            bus.emit(key, payload, headers=headers)
            return
    scope = current_scope()
    if scope is not None:
        scope.bus.emit(key, payload, headers=headers)
        return
    buses = live_buses()
    if len(buses) == 1:
        buses[0].emit(key, payload, headers=headers)
        return
    why = (
        "no tidings bus is running (the app's lifespan starts it)"
        if not buses
        else f"{len(buses)} buses are running and it is not clear which one is meant"
    )
    logger.error(
        "event %r was dropped: it was dispatched outside any request, handler or lifespan, and %s; "
        "pass middleware_id= (and the same middleware_id to EventHandlerASGIMiddleware)",
        key,
        why,
        extra=fields(key),
    )
