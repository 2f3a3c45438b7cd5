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

Arguments and typed events are written as one-key objects whose key starts with ``$tidings.``. A
payload of your own shaped like that (a dict with one such key) is written wrapped, and comes back
exactly as it was emitted.

A payload that cannot be written, for whatever reason (a type JSON does not take, a ``model_dump``
that raises, nesting deeper than the interpreter's recursion limit, text that is not valid UTF-8
such as a lone surrogate, more than the store's ``max_payload_bytes``), and likewise headers or an
event name that cannot be written, raise :class:`~tidings.SerializationError` for that event alone:
it is still handled, not durably, and the error is logged naming it; the other events written with
it are durable. A row that cannot be read back (not JSON, or one of the markers above in the wrong
shape: altered by hand, or a payload shaped like a marker that an older version wrote unwrapped)
raises :class:`~tidings.StoreError`: a claim makes that delivery a dead letter holding the error
instead of running it. A listing of dead letters leaves it out, logging it by id; a lookup by its
id, or a replay that selects it, says that it cannot be read back and why
(:attr:`~tidings.ReplayResult.unreadable`), and leaves it. A purge removes it like any other, by its
id, by event or handler (a filter reads the name columns, never the payload) or of all.
One shape is ambiguous: a payload that an older version wrote as your own dict
``{"$tidings.plain": value}`` now reads back as ``value``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from .._core.envelope import EMPTY_HEADERS, Arguments, Event, TypedDump
from .._core.logs import described
from .._core.schemas import class_keys, is_event_class
from ..exceptions import SerializationError, StoreError

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "decode_event", "encode_event", "encode_payload"]

DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
# The JSON shapes of Arguments, of a typed event, and of a user's dict that could pass for one of
# them: a one-key object whose key is in this namespace. Every such user dict is written wrapped in
# the third, so that what the log holds is never ambiguous, and the namespace is free for more.
_MARKER_PREFIX = "$tidings."
_ARGUMENTS_KEY = "$tidings.arguments"
_TYPED_KEY = "$tidings.typed"
_PLAIN_KEY = "$tidings.plain"
_JSON_NATIVE = (str, int, float, list, tuple)  # what the encoder writes without `_default` (dicts aside)


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


_STOPS = (KeyboardInterrupt, SystemExit)
"""A request to stop (the process; in a thread, SystemExit stops that thread): never a payload's
failure, so never refused as one."""

_encoder = json.JSONEncoder(default=_default, ensure_ascii=False, separators=(",", ":"))


def _top_level(payload: Any) -> Any:
    """What the encoder is to write for ``payload``: the top of it converted as the encoder would,
    and a dict that could be read back as one of our markers wrapped, so that it comes back as is.

    Only the top can be misread (:func:`decode_event` looks nowhere else), so only the top is
    converted here; the encoder converts the rest as it goes.
    """
    if type(payload) is Arguments:
        return payload  # the encoder writes it as its marker
    if isinstance(payload, dict):
        if len(payload) == 1:
            key = next(iter(payload))
            if isinstance(key, str) and key.startswith(_MARKER_PREFIX):
                return {_PLAIN_KEY: payload}
        return payload
    if payload is None or isinstance(payload, _JSON_NATIVE):
        return payload
    # recursing, like the encoder: a conversion that never ends is a RecursionError, refused as such
    return _top_level(_default(payload))


def _unwritable(event: Event, exc: BaseException) -> SerializationError:
    return SerializationError(
        f"event {event.name!r} ({event.id}) cannot be written to the event log: {described(exc)}",
        event=event,
    )


def _utf8_size(text: str) -> int:
    """The length of ``text`` in UTF-8; raises UnicodeEncodeError for a lone surrogate."""
    return len(text) if text.isascii() else len(text.encode())


def encode_payload(event: Event, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """The payload of ``event`` as JSON text, which :func:`decode_event` reads back as it was written.

    Raises:
        SerializationError: it cannot be written as JSON (whatever the reason: a type JSON does not
            take, a ``model_dump`` that raised, nesting too deep, a string that is not valid
            UTF-8, such as a lone surrogate), or it is longer than ``max_bytes``.
    """
    payload = event.payload
    try:
        # a TypedDump is a typed event read back, written again (a revived dead letter)
        if type(payload) is TypedDump and payload.type_keys:
            payload = {_TYPED_KEY: [list(payload.type_keys), dict(payload)]}
        elif is_event_class(type(payload)):  # its class goes with it, for handlers typed with that class
            payload = {_TYPED_KEY: [class_keys(type(payload)), payload]}
        else:
            payload = _top_level(payload)
        text = _encoder.encode(payload)
        size = _utf8_size(text)
    except _STOPS:
        raise
    except BaseException as exc:  # a payload is the app's data: no failure of it may reach the job
        # (nor a serializer's CancelledError or other BaseException: raised in the SQLite log's
        # writer thread it ended the thread, and every later call of the log waited forever)
        raise _unwritable(event, exc) from exc
    if size > max_bytes:
        raise SerializationError(
            f"event {event.name!r} ({event.id}) has a payload of {size} bytes, over the "
            f"event log's limit of {max_bytes}",
            event=event,
        )
    return text


def encode_event(event: Event, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> tuple[str, str]:
    """The payload (see :func:`encode_payload`) and the headers of ``event`` as JSON text.

    Also checks the event's name, which the log keeps as text: it must be valid UTF-8 without NUL
    (PostgreSQL's text refuses NUL), or no write that holds the event could succeed.

    Raises:
        SerializationError: the payload, the headers or the name cannot be written.
    """
    payload = encode_payload(event, max_bytes)
    headers = event.headers
    try:
        _utf8_size(event.name)
        if "\x00" in event.name:
            raise ValueError("its name holds a NUL character")
        text = "{}" if not headers else _encoder.encode(dict(headers))
        _utf8_size(text)
    except _STOPS:
        raise
    except BaseException as exc:  # headers are the app's data too
        raise _unwritable(event, exc) from exc
    return payload, text


def _malformed(event_id: str, name: str, what: str) -> StoreError:
    return StoreError(f"event {name!r} ({event_id}) cannot be read back from the event log: {what}")


def _unmarked(event_id: str, name: str, decoded: dict[str, Any]) -> Any:
    """The payload a one-key object stands for, when its key is one of our markers."""
    key, value = next(iter(decoded.items()))
    if key == _ARGUMENTS_KEY:
        if type(value) is list and len(value) == 2 and type(value[0]) is list and type(value[1]) is dict:
            return Arguments(tuple(value[0]), value[1])
    elif key == _TYPED_KEY:
        if (
            type(value) is list
            and len(value) == 2
            and type(value[0]) is list
            and all(type(type_key) is str for type_key in value[0])
        ):
            type_keys, fields = value
            # a RootModel of a list or a value comes back as that value, without its class
            return TypedDump(fields, type_keys=tuple(type_keys)) if type(fields) is dict else fields
    elif key == _PLAIN_KEY:
        if type(value) is dict:
            return value
    else:  # a key this version never writes alone: a user's dict, as versions before the escape wrote it
        return decoded
    raise _malformed(event_id, name, f"its payload has a malformed {key!r} marker")


def decode_event(event_id: str, name: str, payload: str, headers: str, timestamp_ns: int) -> Event:
    """Rebuild an event read from the log (payloads come back as plain JSON values).

    Raises:
        StoreError: the payload or the headers are not what :func:`encode_event` writes: not JSON,
            headers that are not an object, or a marker of ours in the wrong shape (the row was
            altered, or written by a version that did not escape a user's dict shaped like one).
    """
    try:
        decoded_headers = json.loads(headers)
        decoded = json.loads(payload)
    except Exception as exc:  # RecursionError too: whatever the row holds, it is refused as one
        raise _malformed(event_id, name, described(exc)) from exc
    if type(decoded_headers) is not dict:
        raise _malformed(event_id, name, "its headers are not a JSON object")
    if type(decoded) is dict and len(decoded) == 1 and next(iter(decoded)).startswith(_MARKER_PREFIX):
        decoded = _unmarked(event_id, name, decoded)
    return Event(
        name,
        decoded,
        MappingProxyType(decoded_headers) if decoded_headers else EMPTY_HEADERS,
        timestamp_ns,
        id=event_id,
    )
