"""The default bus: register handlers with a decorator at import time, with no bus object to pass.

Some apps prefer one process-wide bus to passing a bus around (the fastapi-opinionated-eventbus
way). :func:`default_bus` creates it on first use; :func:`on` registers on it; add
``TidingsMiddleware(app, bus=default_bus())`` to serve it. It is created only when asked for, so
apps that make their own buses share nothing through it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from .bus import EventBus
    from .policies import RetryPolicy

__all__ = ["default_bus", "on", "reset_default_bus"]

_lock = threading.Lock()
_bus: EventBus | None = None


def default_bus() -> EventBus:
    """The process's default bus, created on first use (named ``"default"``).

    Example:
        >>> from tidings import default_bus, on
        >>> @on("user.created")
        ... async def welcome(email: str) -> None: ...
        >>> default_bus().registry.named(welcome.__module__ + ".welcome") is not None
        True
    """
    global _bus
    bus = _bus
    if bus is None:
        from .bus import EventBus

        with _lock:
            if _bus is None:
                _bus = EventBus(name="default")
            bus = _bus
    return bus


def reset_default_bus() -> None:
    """Forget the default bus (tests use it to start from an empty one); it must not be running.

    Raises:
        BusStateError: the default bus is running.
    """
    global _bus
    from ..exceptions import BusStateError
    from .bus import BusState

    with _lock:
        if _bus is not None and _bus.state in (BusState.RUNNING, BusState.DRAINING):
            raise BusStateError("the default bus is running; close it before resetting it")
        _bus = None


def on(
    *patterns: str | type,
    retry: RetryPolicy | None = None,
    name: str | None = None,
    **options: Any,
) -> Callable[[Any], Any]:
    """Register the decorated function on the default bus; see :meth:`EventBus.on`.

    Example:
        >>> from tidings import on
        >>> @on("payment.processed")
        ... async def settle(payment_id: str, status: str, amount: float) -> None: ...
    """
    return default_bus().on(*patterns, retry=retry, name=name, **options)
