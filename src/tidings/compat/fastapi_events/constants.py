"""The environment variables fastapi-events reads, under the names it exports them.

``FASTAPI_EVENTS_DISABLE_DISPATCH`` (a truthy value: ``1``, ``true``, ``yes``, ``y``, ``t``, ``on``,
any case) turns :func:`~tidings.compat.fastapi_events.dispatcher.dispatch` into a no-op. It is read
at the start of every HTTP request that
:class:`~tidings.compat.fastapi_events.middleware.EventHandlerASGIMiddleware` serves, and that
reading holds for every ``dispatch()`` of the request and of the handler chains its
events start; every ``dispatch()`` made outside such a request (startup code, background tasks,
``middleware_id=...``, threads, websockets) reads it itself.

``FASTAPI_EVENTS_USE_SPAN_LINKING`` is exported for code that imports it, and has no effect: tidings
links handler spans to the emitting request itself (``EventBus(tracing=...)``).
"""

from __future__ import annotations

from typing import Final

__all__ = ["FASTAPI_EVENTS_DISABLE_DISPATCH_ENV_VAR", "FASTAPI_EVENTS_USE_SPAN_LINKING_ENV_VAR"]

FASTAPI_EVENTS_DISABLE_DISPATCH_ENV_VAR: Final[str] = "FASTAPI_EVENTS_DISABLE_DISPATCH"
FASTAPI_EVENTS_USE_SPAN_LINKING_ENV_VAR: Final[str] = "FASTAPI_EVENTS_USE_SPAN_LINKING"
