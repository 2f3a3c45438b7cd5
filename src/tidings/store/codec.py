"""How events are written to a durable log: JSON, never pickle.

A payload is written as JSON. Besides what ``json`` takes, dataclass instances, Pydantic models
(``model_dump(mode="json", round_trip=True)``: by field name, without computed fields), ``datetime``
/``date``/``time`` (ISO 8601), ``UUID`` and ``Decimal`` (strings), sets (lists) and ``Enum`` members
(their value) are accepted. Handlers of a recorded event that is run again from the log (after a
crash, a retry in another process, a replay) receive the payload as the JSON it became: dicts,
lists, strings and numbers, except that a payload whose event name has a schema on the bus, or
that a handler's parameter asks for as a typed event class, becomes an instance of that class
again, and the :class:`~tidings.Arguments` of an event emitted with several arguments are kept as
such. A typed event is written with the ``module:qualname`` of its class and of its event-class
bases, so a handler whose parameter is typed with one of them gets an instance of that class back
(a subclass's own fields are dropped, or refused by ``extra="forbid"``), never a field of the same
name. A ``RootModel`` whose root is a list or a single value comes back as that value. Revival accepts
field names besides aliases on Pydantic 2.11 and later, so models whose fields have aliases come
back there; on older Pydantic they need ``populate_by_name=True``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .._core.envelope import EMPTY_HEADERS, Arguments, Event, TypedDump
from .._core.schemas import class_keys, is_event_class
from ..exceptions import SerializationError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "decode_event", "encode_headers", "encode_payload"]

DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
# The JSON shapes of Arguments and of a typed event: one key no payload of a user's would plausibly have.
_ARGUMENTS_KEY = "$tidings.arguments"
_TYPED_KEY = "$tidings.typed"


def _default(value: Any) -> Any:
    if type(value) is Arguments:
        return {_ARGUMENTS_KEY: [list(value.args), dict(value.kwargs)]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        # By field name (what handlers bind by name, and what revival accepts whatever the aliases),
        # without computed fields (extra="forbid" would refuse them when it is read back).
        return model_dump(mode="json", round_trip=True)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"{type(value).__qualname__} is not JSON-serialisable")


_encoder = json.JSONEncoder(default=_default, ensure_ascii=False, separators=(",", ":"))


def encode_payload(event: Event, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """The payload of ``event`` as JSON text.

    Raises:
        SerializationError: it cannot be written as JSON, or it is longer than ``max_bytes``.
    """
    payload = event.payload
    if type(payload) is TypedDump and payload.type_keys:  # read back, written again (a revived dead letter)
        payload = {_TYPED_KEY: [list(payload.type_keys), dict(payload)]}
    elif is_event_class(type(payload)):  # its class goes with it, for handlers typed with that class
        payload = {_TYPED_KEY: [class_keys(type(payload)), payload]}
    try:
        text = _encoder.encode(payload)
    except (TypeError, ValueError) as exc:
        raise SerializationError(
            f"event {event.name!r} ({event.id}) cannot be written to the event log: {exc}", event=event
        ) from exc
    if len(text) > max_bytes and len(text.encode()) > max_bytes:
        raise SerializationError(
            f"event {event.name!r} ({event.id}) has a payload of {len(text.encode())} bytes, over the "
            f"event log's limit of {max_bytes}",
            event=event,
        )
    return text


def encode_headers(headers: Mapping[str, str]) -> str:
    """The headers as a JSON object (``"{}"`` when there are none)."""
    return "{}" if not headers else _encoder.encode(dict(headers))


def decode_event(event_id: str, name: str, payload: str, headers: str, timestamp_ns: int) -> Event:
    """Rebuild an event read from the log (payloads come back as plain JSON values)."""
    decoded_headers = json.loads(headers)
    decoded = json.loads(payload)
    if type(decoded) is dict and len(decoded) == 1:
        if _ARGUMENTS_KEY in decoded:
            args, kwargs = decoded[_ARGUMENTS_KEY]
            decoded = Arguments(tuple(args), kwargs)
        elif _TYPED_KEY in decoded:
            type_keys, fields = decoded[_TYPED_KEY]
            # a RootModel of a list or a value comes back as that value, without its class
            decoded = TypedDump(fields, type_keys=tuple(type_keys)) if type(fields) is dict else fields
    return Event(
        name,
        decoded,
        MappingProxyType(decoded_headers) if decoded_headers else EMPTY_HEADERS,
        timestamp_ns,
        id=event_id,
    )
