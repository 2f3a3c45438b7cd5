"""Not provided yet: the Google Cloud Pub/Sub forwarder of fastapi-events.

Forwarding events to a broker arrives with tidings' broker transports. Until then, importing a name
from this module raises an ``ImportError`` that says so. (The module itself imports, so that tools
which walk the package, such as doctest and pydoc, keep working.)
"""

from __future__ import annotations

from typing import NoReturn

__all__: list[str] = []

_MESSAGE = (
    "tidings.compat.fastapi_events.handlers.gcp is not provided: the "
    "Google Cloud Pub/Sub forwarder of fastapi-events arrives with "
    "tidings' broker transports. Until then, keep 'from fastapi_events.handlers.gcp import "
    "GoogleCloudSimplePubSubHandler' (fastapi-events installed): its handler objects work in "
    "the handlers=[...] of tidings.compat.fastapi_events' EventHandlerASGIMiddleware."
)


def __getattr__(name: str) -> NoReturn:
    if name.startswith("__") and name.endswith("__"):  # introspection asks for dunders: the usual answer
        raise AttributeError(name)
    raise ImportError(_MESSAGE, name=__name__)
