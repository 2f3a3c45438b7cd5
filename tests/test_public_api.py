"""Pins the public namespace: a change here is a change of the public API."""

from __future__ import annotations

import inspect
import subprocess
import sys

import tidings
import tidings.asgi
import tidings.exceptions
import tidings.store

EXPECTED = [
    "Arguments",
    "BusState",
    "BusStateError",
    "ConfigurationError",
    "DeadLetters",
    "DrainTimeoutError",
    "Event",
    "EventBus",
    "EventValidationError",
    "FailureHook",
    "HandlerCancelledError",
    "HandlerError",
    "HandlerSpec",
    "HandlerTimeoutError",
    "Limits",
    "PendingDelivery",
    "ReplayResult",
    "RequestErrorPolicy",
    "RequestHandlerMode",
    "RetryPolicy",
    "SerializationError",
    "StoreError",
    "TidingsError",
    "TidingsMiddleware",
    "default_bus",
    "emit",
    "on",
]


def test_all_is_pinned_and_sorted() -> None:
    assert tidings.__all__ == EXPECTED
    assert sorted(tidings.__all__) == tidings.__all__


def test_every_public_name_exists_and_claims_the_top_level_module() -> None:
    for name in tidings.__all__:
        obj = getattr(tidings, name)
        if isinstance(obj, type) or inspect.isfunction(obj):
            assert obj.__module__ == "tidings", name


def test_submodule_exports() -> None:
    assert tidings.asgi.__all__ == ["TidingsMiddleware"]
    assert tidings.store.__all__ == [
        "DeadLetter", "Delivery", "MemoryStore", "SQLiteStore", "Store", "UnreadableLetter", "store_from_url"
    ]  # fmt: skip
    assert set(tidings.exceptions.__all__) <= set(dir(tidings.exceptions))


def test_importing_tidings_imports_no_framework_or_broker() -> None:
    code = (
        "import sys, tidings, tidings.asgi;"
        "heavy = {'starlette', 'fastapi', 'litestar', 'pydantic', 'anyio', 'redis', 'httpx'};"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_typed_marker_is_shipped() -> None:
    from importlib.resources import files

    assert files("tidings").joinpath("py.typed").is_file()
