"""tidings: application events for ASGI apps.

Emit anywhere, handle after the response, lose nothing::

    from tidings import Event, EventBus, TidingsMiddleware, emit

    bus = EventBus()

    @bus.on("user.created")
    async def send_welcome(event: Event) -> None:
        ...

    app.add_middleware(TidingsMiddleware, bus=bus)

    # anywhere in request code:
    emit("user.created", {"id": 1})
"""

from inspect import isfunction as _isfunction

from ._core.bus import BusState as BusState
from ._core.bus import EventBus as EventBus
from ._core.dead_letters import DeadLetters as DeadLetters
from ._core.dead_letters import ReplayResult as ReplayResult
from ._core.default import default_bus as default_bus
from ._core.default import on as on
from ._core.dispatcher import emit as emit
from ._core.envelope import Arguments as Arguments
from ._core.envelope import Event as Event
from ._core.policies import Limits as Limits
from ._core.policies import RequestErrorPolicy as RequestErrorPolicy
from ._core.policies import RequestHandlerMode as RequestHandlerMode
from ._core.policies import RetryPolicy as RetryPolicy
from ._core.registry import HandlerSpec as HandlerSpec
from ._core.runner import FailureHook as FailureHook
from .asgi.middleware import TidingsMiddleware as TidingsMiddleware
from .exceptions import BusStateError as BusStateError
from .exceptions import ConfigurationError as ConfigurationError
from .exceptions import DrainTimeoutError as DrainTimeoutError
from .exceptions import EventValidationError as EventValidationError
from .exceptions import HandlerCancelledError as HandlerCancelledError
from .exceptions import HandlerError as HandlerError
from .exceptions import HandlerTimeoutError as HandlerTimeoutError
from .exceptions import PendingDelivery as PendingDelivery
from .exceptions import SerializationError as SerializationError
from .exceptions import StoreError as StoreError
from .exceptions import TidingsError as TidingsError

__all__ = [
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

__version__ = "0.1.0"

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or _isfunction(_obj):  # not the type aliases
        _obj.__module__ = __name__
del _name, _obj
