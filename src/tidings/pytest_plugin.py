"""The tidings pytest plugin: capture events, wait for handlers, keep the tests' buses apart.

Installing tidings registers it with pytest (entry point ``tidings`` in the ``pytest11`` group);
``-p no:tidings`` turns it off. Fixtures:

``tidings_bus``
    The bus the other fixtures work on. By default the bus named by the ``tidings_bus`` setting
    (``module:attribute`` of an :class:`~tidings.EventBus`, or of an app whose
    ``TidingsMiddleware`` has one, as ``tidings list`` takes it), else
    :func:`tidings.default_bus`. Override it in ``conftest.py`` to name yours::

        @pytest.fixture
        def tidings_bus() -> EventBus:
            return myapp.events.bus

``tidings_events``
    A :class:`~tidings.testing.EventCapture` of every event emitted on ``tidings_bus`` during the
    test: ``tidings_events.assert_emitted("user.created", email="ada@example.com")``.

``tidings_inline``
    ``tidings_bus`` runs each request's handlers inline during the test, so a test client's call
    returns once they are done (see :func:`~tidings.testing.inline_handlers`).

``tidings_default_bus``
    A fresh, empty :func:`tidings.default_bus` for the test, forgotten afterwards (for tests that
    register handlers on the default bus themselves).

And for every test: a bus the test started and left running on an open event loop is reported
with a :class:`~tidings.testing.BusLeftRunningWarning` and taken out of the process's list of
running buses, so the next tests' ``emit()`` calls do not reach it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import pytest

from ._core import default as _default
from ._core.dispatcher import live_buses, unregister_running
from .cli import UsageError, load_bus
from .testing import BusLeftRunningWarning, EventCapture, capture, inline_handlers

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._core.bus import EventBus

__all__ = [
    "pytest_addoption",
    "tidings_bus",
    "tidings_default_bus",
    "tidings_events",
    "tidings_inline",
]

_SETTING = "tidings_bus"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``tidings_bus`` setting (``[tool.pytest.ini_options]`` or ``pytest.ini``)."""
    parser.addini(
        _SETTING,
        help="module:attribute of the EventBus (or of an app with TidingsMiddleware) that the "
        "tidings_events fixture captures; default: tidings.default_bus()",
        default="",
    )


@pytest.fixture
def tidings_bus(request: pytest.FixtureRequest) -> EventBus:
    """The bus the tidings fixtures work on: the ``tidings_bus`` setting's, or the default bus.

    Override this fixture to name the app's bus.
    """
    target = str(request.config.getini(_SETTING)).strip()
    if not target:
        if "tidings_default_bus" in request.fixturenames:
            # pytest sets fixtures up in the order the test names them: tidings_events named first
            # would capture the default bus that tidings_default_bus is about to replace.
            request.getfixturevalue("tidings_default_bus")
        return _default.default_bus()
    try:
        return load_bus(target)
    except UsageError as exc:
        pytest.fail(f"the {_SETTING} setting {target!r}: {exc}", pytrace=False)


@pytest.fixture
def tidings_events(tidings_bus: EventBus) -> Iterator[EventCapture]:
    """Every event emitted on ``tidings_bus`` during the test, to assert on."""
    with capture(tidings_bus) as events:
        yield events


@pytest.fixture
def tidings_inline(tidings_bus: EventBus) -> Iterator[EventBus]:
    """``tidings_bus``, running each request's handlers in the request itself during the test."""
    with inline_handlers(tidings_bus):
        yield tidings_bus


@pytest.fixture
def tidings_default_bus() -> Iterator[EventBus]:
    """A fresh :func:`tidings.default_bus` for this test; the one before it is back after it.

    The default bus of the tests that run later is the one they would have had: an app that
    registered its handlers on it when it was imported still finds them there. Apps like that must
    not use this fixture in the tests of those handlers: their handlers are on the bus it replaces.
    """
    # reset_default_bus() refuses a running bus; a test that left one running is reported by
    # _tidings_no_bus_left_running, and the next test must not inherit it either way.
    with _default._lock:
        before, _default._bus = _default._bus, None
    try:
        yield _default.default_bus()
    finally:
        with _default._lock:
            _default._bus = before


@pytest.fixture(autouse=True)
def _tidings_no_bus_left_running() -> Iterator[None]:
    # Function-scoped and autouse, so it is set up before the test's other function-scoped
    # fixtures and torn down after them: a bus a fixture closes is not reported, and buses started
    # by session or module fixtures (running before this test began) are not this test's.
    before = live_buses()
    yield
    leaked = [bus for bus in live_buses() if all(bus is not other for other in before)]
    if not leaked:
        return
    for bus in leaked:
        unregister_running(bus)  # the next tests' emit() calls must not land on it
    names = ", ".join(repr(bus) for bus in leaked)
    warnings.warn(
        BusLeftRunningWarning(
            f"the test left {len(leaked)} bus(es) running: {names}; close them (async with bus, "
            "the app's lifespan, or await bus.aclose())"
        ),
        stacklevel=1,
    )
