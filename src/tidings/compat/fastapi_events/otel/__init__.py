"""OpenTelemetry names of fastapi-events, for code that imports them.

tidings traces handler runs itself, linked to the request that emitted the event (pass
``EventBus(tracing=...)`` to the middleware's ``bus=``); this layer creates no spans of its own and,
unlike fastapi-events, never writes a ``traceparent`` into your payloads.
"""
