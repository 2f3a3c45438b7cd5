"""The module paths and names of fastapi-events, under ``tidings.compat.fastapi_events``."""

from __future__ import annotations

import asyncio
import enum
import importlib
import importlib.util
import inspect
from typing import Any, get_args

import pytest

import tidings.compat.fastapi_events as compat
from tidings.compat.fastapi_events import constants, errors, typing, utils
from tidings.compat.fastapi_events._support import dispatch_disabled, event_tuple, name_key
from tidings.compat.fastapi_events.otel.attributes import SpanAttributes

PREFIX = "tidings.compat.fastapi_events"

# What fastapi-events' README and docstrings have users import, module by module.
PUBLIC = {
    "": ["BaseEventHandler"],
    ".dispatcher": ["dispatch"],
    ".middleware": ["EventHandlerASGIMiddleware"],
    ".handlers.base": ["BaseEventHandler"],
    ".handlers.local": ["LocalHandler", "local_handler"],
    ".handlers.echo": ["EchoHandler"],
    ".handlers.null": ["NullHandler"],
    ".registry.base": ["BaseEventPayloadSchemaRegistry"],
    ".registry.payload_schema": ["EventPayloadSchemaRegistry", "registry"],
    ".typing": [
        "Event",
        "EventName",
        "Payload",
        "PydanticModel",
        "ASGIApp",
        "Message",
        "Receive",
        "Scope",
        "Send",
    ],
    ".errors": [
        "ConfigurationError",
        "FastapiEventError",
        "MissingEventNameDuringDispatch",
        "MissingEventNameDuringRegistration",
        "MissingEventNameError",
        "MultiplePayloadsDetectedDuringDispatch",
    ],
    ".constants": ["FASTAPI_EVENTS_DISABLE_DISPATCH_ENV_VAR", "FASTAPI_EVENTS_USE_SPAN_LINKING_ENV_VAR"],
    ".utils": ["strtobool", "chunk"],
    ".otel.attributes": ["SpanAttributes"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_module_path_and_name_is_there(module: str) -> None:
    imported = importlib.import_module(PREFIX + module)
    for name in PUBLIC[module]:
        assert hasattr(imported, name), f"{PREFIX}{module}.{name}"
    if module:
        assert set(PUBLIC[module]) <= set(imported.__all__)


@pytest.mark.parametrize("module", sorted(m for m in PUBLIC if m))
def test_the_same_names_exist_in_fastapi_events(module: str) -> None:
    if importlib.util.find_spec("fastapi_events") is None:
        pytest.skip("fastapi-events is not installed (uv sync --group bench)")
    original = importlib.import_module("fastapi_events" + module)
    for name in PUBLIC[module]:
        assert hasattr(original, name), f"fastapi_events{module}.{name}"


def test_the_error_hierarchy_is_fastapi_events_own() -> None:
    def chain(cls: type) -> list[str]:
        return [c.__name__ for c in cls.__mro__]

    assert chain(errors.MultiplePayloadsDetectedDuringDispatch) == [
        "MultiplePayloadsDetectedDuringDispatch",
        "FastapiEventError",
        "ValueError",
        "Exception",
        "BaseException",
        "object",
    ]
    assert chain(errors.MissingEventNameDuringDispatch)[:4] == [
        "MissingEventNameDuringDispatch",
        "MissingEventNameError",
        "FastapiEventError",
        "BaseException",
    ]
    if importlib.util.find_spec("fastapi_events") is not None:
        original = importlib.import_module("fastapi_events.errors")
        for name in PUBLIC[".errors"]:
            assert chain(getattr(errors, name)) == chain(getattr(original, name)), name
        for name in ("MissingEventNameDuringDispatch", "MultiplePayloadsDetectedDuringDispatch"):
            assert str(getattr(errors, name)()) == str(getattr(original, name)())


def test_the_aws_and_gcp_forwarders_say_they_are_not_here_yet() -> None:
    for module, name in (("aws", "SQSForwardHandler"), ("gcp", "GoogleCloudSimplePubSubHandler")):
        imported = importlib.import_module(f"{PREFIX}.handlers.{module}")
        with pytest.raises(ImportError, match="broker transports") as raised:
            getattr(imported, name)
        assert f"fastapi_events.handlers.{module} import {name}" in str(raised.value)
        with pytest.raises(AttributeError):
            imported.__wrapped__  # noqa: B018 - introspection gets the usual answer
    with pytest.raises(ImportError, match="not provided"):
        exec(f"from {PREFIX}.handlers.aws import SQSForwardHandler", {})


def test_constants_typing_utils_and_otel() -> None:
    assert constants.FASTAPI_EVENTS_DISABLE_DISPATCH_ENV_VAR == "FASTAPI_EVENTS_DISABLE_DISPATCH"
    assert constants.FASTAPI_EVENTS_USE_SPAN_LINKING_ENV_VAR == "FASTAPI_EVENTS_USE_SPAN_LINKING"
    assert SpanAttributes.HANDLER == "fastapi_events.handler"
    assert set(get_args(typing.EventName)) == {str, enum.Enum}
    assert utils.strtobool("ON") is True
    assert utils.strtobool("f") is False
    with pytest.raises(ValueError, match="invalid truth value"):
        utils.strtobool("maybe")
    assert list(utils.chunk("abcde", 2)) == [("a", "b"), ("c", "d"), ("e",)]
    assert inspect.isabstract(compat.BaseEventHandler)


def test_the_disable_switch_is_read_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTAPI_EVENTS_DISABLE_DISPATCH", raising=False)
    assert not dispatch_disabled()
    monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", "1")
    assert dispatch_disabled()
    monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", "0")
    assert not dispatch_disabled()


class Plain(enum.Enum):
    A = "a-value"


class Mixed(str, enum.Enum):  # noqa: UP042 - not a StrEnum: str() differs, fnmatch sees the value
    B = "b-value"


class Numbered(enum.IntEnum):
    C = 7


@pytest.mark.parametrize(
    ("name", "key"),
    [("x.y", "x.y"), (Plain.A, "Plain.A"), (Mixed.B, "b-value"), (Numbered.C, "7")],
)
def test_names_are_matched_as_fastapi_events_matches_them(name: Any, key: str) -> None:
    """``str(name)``, unless it is a ``str`` already (fnmatch then sees its value)."""
    from tidings import Event

    found, headers = name_key(name)
    assert found == key
    assert type(found) is str
    envelope = Event(found, 1, headers or {})
    handed = event_tuple(envelope)
    assert handed == (name, 1)
    assert handed[0] is name or type(name) is str
    if importlib.util.find_spec("fastapi_events") is not None:
        local = importlib.import_module("fastapi_events.handlers.local")
        theirs = local.LocalHandler()
        theirs.register(lambda event: None, event_name=key)
        assert theirs._get_handlers_for_event(name)


def test_a_member_comes_back_from_an_event_read_from_a_log() -> None:
    """The header names the member by import path, so a new process finds it (no dispatch needed)."""
    from tidings import Event

    ref = f"{__name__}:Numbered.C"
    assert event_tuple(Event("7", None, {"fastapi-events-name": ref}))[0] is Numbered.C
    gone = Event("x", None, {"fastapi-events-name": f"{__name__}:Nowhere.X"})
    assert event_tuple(gone) == ("x", None)


def test_echo_handler_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tidings.compat.fastapi_events.handlers.echo import EchoHandler

    asyncio.run(EchoHandler().handle(("e", [1, 2])))
    assert capsys.readouterr().out == "('e', [1, 2])\n"


def test_importing_the_layer_imports_no_framework() -> None:
    """Pydantic, FastAPI and Starlette are imported by the app that uses them, not by this layer."""
    import subprocess
    import sys

    modules = ", ".join(f"{PREFIX}{m}" for m in PUBLIC if m)
    code = (
        f"import sys, {modules};"
        "heavy = {'starlette', 'fastapi', 'pydantic', 'anyio', 'httpx', 'opentelemetry'};"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
