"""fastapi-events' API on tidings: change ``fastapi_events`` to ``tidings.compat.fastapi_events``.

The modules mirror fastapi-events' own: ``dispatcher`` (``dispatch``), ``middleware``
(``EventHandlerASGIMiddleware``), ``handlers.local`` (``local_handler``, ``LocalHandler``),
``handlers.base`` (``BaseEventHandler``), ``handlers.echo``, ``handlers.null``,
``registry.payload_schema`` (``registry``), ``registry.base``, ``typing``, ``errors``, ``constants``,
``utils`` and ``otel.attributes``. What behaves the same, what is better and what differs is in
``docs/migrating-from-fastapi-events.md``.

Not provided: fastapi-events' internal context variables (``event_store``, ``handler_store``,
``in_req_res_cycle``, ``middleware_identifier``), and the SQS and Pub/Sub forwarders
(``handlers.aws``, ``handlers.gcp``), which arrive with tidings' broker transports.
"""

from .handlers.base import BaseEventHandler as BaseEventHandler

__all__ = ["BaseEventHandler"]
