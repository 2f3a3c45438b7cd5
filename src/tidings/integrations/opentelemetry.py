"""OpenTelemetry tracing: a span around every handler run, tied to the request that emitted the event.

You do not import this module: the bus does, when tracing is on. Needs the ``otel`` extra
(``opentelemetry-api``) and, to record anything, an OpenTelemetry SDK set up by the app.

When tracing is on (see ``EventBus(tracing=...)``):

* **The emitting context travels in the event's headers**, as the global propagator writes it
  (W3C ``traceparent``, plus ``tracestate``/``baggage`` when there are): never in the payload.
  Which context:

  - events emitted in a request's code on the event loop: the context current when the request's
    events become :class:`~tidings.Event` objects, after the app returned. That is the request's
    span when the tracing middleware wraps :class:`~tidings.TidingsMiddleware`
    (``FastAPIInstrumentor``'s does: it is the outermost middleware). It is read once per
    request, not once per emit. (With tracing on, ``emit()`` goes through ``EventBus.emit``,
    which looks at the emitting task: a few tenths of a µs more per emit; with it off, nothing.)
  - events emitted by an ``async def`` handler: that handler's span (written into their headers
    when the handler returns). A task the handler started runs in a copy of its context, so what
    the task emits carries the span current in the task at the emit: the handler's, or one the
    task started (also after the handler returned, while the job runs other handlers);
  - events emitted anywhere else (outside requests, in sync handlers, sync endpoints and other
    threads, the outbox): the context current at the emit, that is the sync handler's span in one.
  - headers given to the emit get the same context, merged into a new mapping (the caller's is
    never changed). A header the caller set wins over the propagator's: headers that hold a
    ``traceparent`` already keep it, and so the span the caller named.

* **A span per handler call**, per attempt: kind ``CONSUMER``, named ``process {event name}`` (the
  OpenTelemetry messaging conventions' ``{operation} {destination}``), with the attributes
  ``messaging.system`` (``"tidings"``), ``messaging.operation.type`` and ``.name`` (``"process"``),
  ``messaging.destination.name`` (the event name), ``messaging.message.id`` (the event id),
  ``tidings.handler`` (the handler's name) and ``tidings.attempt`` (1 for the first attempt).

  Its **parent** is the event's emitting context and it also **links** to it. The conventions ask
  for the link (a consumer span links to each message's creation context); the parent puts the
  handlers an action caused into that action's trace, so a request, the handlers of its events,
  the events those handlers emit and their handlers form one trace, as Celery's and most
  single-message consumers' instrumentations do. A batch handler's span links to every event of
  the batch (``messaging.batch.message_count``) and has the events' context as parent only when
  they all share one.

  The span is current while the handler runs (spans the handler starts are its children) and
  ends when the call returns. A call that raises records the exception, sets the status to
  ``ERROR`` and ``error.type`` to the exception's class name; one cut off by its timeout gets
  ``error.type`` ``"timeout"``, one cancelled ``"cancelled"``. Sync handlers get their span in
  the worker thread, around the call itself.

* **Tracing never fails an emit or a handler**: a propagator that raises while writing or reading
  headers is logged once per kind (``inject``, ``extract``) at ``WARNING`` on the ``tidings``
  logger, with the exception's type only (headers and payloads may hold what a log must not), and
  the event goes on without trace context (its handler spans start a trace of their own).

* **The event log keeps it**: headers are written with the event, so a delivery run again after a
  crash, a retry or a dead-letter replay gets a span with the same parent and link as the first.

What tracing costs is stated in ``bench/README.md`` (``python -m bench.tracing``); with tracing
off, this module is not even imported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from .. import __version__
from .._core.dispatcher import current_scope
from .._core.envelope import Prebuilt
from .._core.logs import described, fields

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - the extra is installed in the test environment
    raise ImportError(
        'tidings.integrations.opentelemetry needs OpenTelemetry: pip install "tidings[otel]"'
    ) from exc

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanContext, TracerProvider

    from .._core.dispatcher import Record
    from .._core.envelope import Event
    from .._core.registry import HandlerSpec, Registry

__all__ = ["INSTRUMENTATION_NAME", "Tracing"]

logger = logging.getLogger("tidings")

INSTRUMENTATION_NAME: Final = "tidings"
"""The instrumentation scope name of tidings' spans (what ``get_tracer`` is called with)."""

_NAMES_LIMIT: Final = 4096  # like the registry's own cache: names built from data stay bounded
_CONTEXTS_LIMIT: Final = 256  # headers whose context is known; a request's events share one
_CONSUMER: Final = SpanKind.CONSUMER
_get_current_span = trace.get_current_span
_set_span_in_context = trace.set_span_in_context
_attach = otel_context.attach
_detach = otel_context.detach
_inject = propagate.inject
_extract = propagate.extract
_Context = otel_context.Context


class Tracing:
    """The OpenTelemetry instrumentation of one bus (built by the bus when tracing is on).

    It decorates each handler's call with a span (the runner runs the decorated handlers, so the
    runner itself has no tracing code) and puts trace context into event headers.

    Args:
        registry: the bus's handler registry.
        provider: the tracer provider; ``None`` for the global one.

    Example:
        >>> from opentelemetry.sdk.trace import TracerProvider
        >>> from tidings import EventBus
        >>> bus = EventBus(tracing=TracerProvider())  # spans go to this provider's processors
    """

    __slots__ = ("_by_name", "_contexts", "_registry", "_specs", "_warn_lock", "_warned", "tracer")

    def __init__(self, registry: Registry, provider: TracerProvider | None = None) -> None:
        if provider is None:
            provider = trace.get_tracer_provider()
        self.tracer = provider.get_tracer(INSTRUMENTATION_NAME, __version__)
        self._registry = registry
        self._specs: dict[HandlerSpec, HandlerSpec] = {}
        self._by_name: dict[str, tuple[tuple[HandlerSpec, ...], tuple[HandlerSpec, ...]]] = {}
        # The context of recent headers, by identity. The events of one request share one headers
        # mapping, which we wrote from a context we had: a handler call finds its parent here
        # instead of parsing the headers again (one parse costs about as much as a third of a span).
        self._contexts: dict[int, tuple[Mapping[str, str], Context, SpanContext | None]] = {}
        self._warned: set[str] = set()  # the kinds of propagator failure logged already
        self._warn_lock = threading.Lock()  # emits from several threads may fail at once

    # -- trace context into headers ----------------------------------------------------------------
    def inject(self, headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
        """``headers`` with the current trace context added (unless they carry one, or there is none).

        The result is a new mapping; a key ``headers`` has already keeps its value. Never raises:
        a failing propagator leaves ``headers`` as they were.
        """
        if headers and "traceparent" in headers:
            return headers
        try:
            context = otel_context.get_current()
            span_context = _get_current_span(context).get_span_context()
            if not span_context.is_valid:
                return headers
            carrier = self._carrier(context, span_context)
            return self._merge(headers, carrier, context, span_context) if headers else carrier
        except Exception as exc:  # tracing must never fail an emit: the event goes untraced
            self._propagation_failed("inject", exc)
            return headers

    def prepare(self, records: list[Record]) -> list[Record]:
        """Give records emitted without trace context the current one (one injection for them all)."""
        for record in records:  # _wants_context, inlined: this runs for every job when tracing
            headers = record[3]
            if headers is None or (type(headers) is not Prebuilt and "traceparent" not in headers):
                break
        else:
            return records
        try:
            context = otel_context.get_current()
            span_context = _get_current_span(context).get_span_context()
            if not span_context.is_valid:
                return records
            prepared = list(records)
            self._fill(prepared, 0, context, span_context)
        except Exception as exc:  # tracing must never fail an emit: the events go untraced
            self._propagation_failed("inject", exc)
            return records
        return prepared

    def _stamp(self, buffer: list[Record], start: int, span: Span, context: Context) -> None:
        """Give the records an async handler emitted (``buffer[start:]``) its span's context."""
        try:
            self._fill(buffer, start, context, span.get_span_context())
        except Exception as exc:  # runs as the handler returns, whose outcome it must not change
            self._propagation_failed("inject", exc)

    def _fill(self, records: list[Record], start: int, context: Context, span_context: SpanContext) -> None:
        """Put ``context`` into the headers of ``records[start:]`` that lack trace context, in place.

        Only the loop's thread calls this. ``records`` is left untouched if the propagator raises:
        it does so before the first record is replaced.
        """
        carrier: Mapping[str, str] | None = None
        merged: dict[int, Mapping[str, str]] = {}  # the records of one emit site share headers
        for index in range(start, len(records)):
            record = records[index]
            headers = record[3]
            if not _wants_context(headers):
                continue
            if carrier is None:
                carrier = self._carrier(context, span_context)
            if headers:
                made = merged.get(id(headers))
                if made is None:
                    made = merged[id(headers)] = self._merge(headers, carrier, context, span_context)
            else:
                made = carrier
            records[index] = (*record[:3], made)

    def _carrier(self, context: Context, span_context: SpanContext) -> Mapping[str, str]:
        """The headers the propagator writes for ``context`` (remembered: handlers skip the parse)."""
        carrier: dict[str, str] = {}
        _inject(carrier, context)
        made = MappingProxyType(carrier)
        self._remember(made, context, span_context)
        return made

    def _merge(
        self,
        headers: Mapping[str, str],
        carrier: Mapping[str, str],
        context: Context,
        span_context: SpanContext,
    ) -> Mapping[str, str]:
        """The caller's ``headers`` plus the keys of ``carrier`` they lack, in a new mapping."""
        merged = dict(headers)
        kept_own = False
        for key, value in carrier.items():
            if key in merged:
                kept_own = True
            else:
                merged[key] = value
        made = MappingProxyType(merged)
        # A caller's tracestate or baggage makes the headers' context differ from ``context``: a
        # handler must then read it from the headers, as it would after a restart.
        if not kept_own:
            self._remember(made, context, span_context)
        return made

    def _propagation_failed(self, kind: str, exc: Exception) -> None:
        # Once per kind: a broken propagator fails every emit, and a log line each would flood.
        # The type only: the message of a propagator's error may quote header values.
        with self._warn_lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        logger.warning(
            "the OpenTelemetry propagator raised %s in %s; events go on without trace context "
            "(further failures of this kind are not logged)",
            type(exc).__qualname__,
            kind,
            extra=fields(None),
        )

    def _remember(
        self, headers: Mapping[str, str], context: Context, span_context: SpanContext | None
    ) -> None:
        contexts = self._contexts
        if len(contexts) >= _CONTEXTS_LIMIT:
            contexts.clear()
        contexts[id(headers)] = (headers, context, span_context)

    # -- traced handlers ---------------------------------------------------------------------------
    def resolve(self, name: str) -> tuple[HandlerSpec, ...]:
        """The traced handlers of event ``name`` (the registry's, each with its call decorated)."""
        handlers = self._registry.resolve(name)
        entry = self._by_name.get(name)
        if entry is None or entry[0] is not handlers:  # new, or the registry changed since
            if len(self._by_name) >= _NAMES_LIMIT:
                self._by_name.clear()
            entry = (handlers, tuple(self.traced(spec) for spec in handlers))
            self._by_name[name] = entry
        return entry[1]

    def traced_calls(self, calls: Iterable[tuple[HandlerSpec, Any]]) -> list[tuple[HandlerSpec, Any]]:
        """``calls`` with their handlers traced (the arguments are the same objects)."""
        return [(self.traced(spec), arg) for spec, arg in calls]

    def traced(self, spec: HandlerSpec) -> HandlerSpec:
        """``spec`` with its call wrapped in a span (idempotent)."""
        traced = self._specs.get(spec)
        if traced is None:
            call = self._async_call(spec) if spec.is_async else self._sync_call(spec)
            traced = dataclasses.replace(spec, call=call)
            self._specs[spec] = self._specs[traced] = traced
        return traced

    def _context_of(self, headers: Mapping[str, str]) -> tuple[Context, SpanContext | None]:
        known = self._contexts.get(id(headers))
        if known is not None and known[0] is headers:
            return known[1], known[2]
        try:
            parent = _extract(headers)
            span_context = _get_current_span(parent).get_span_context()
            found = span_context if span_context.is_valid else None
        except Exception as exc:  # tracing must never fail a handler: its span starts a new trace
            self._propagation_failed("extract", exc)
            parent, found = _Context(), None
        self._remember(headers, parent, found)
        return parent, found

    def _start(self, spec: HandlerSpec, arg: Any, attempt: int) -> tuple[Span, Context]:
        """Start the span of one call; return it and the context to make current during the call."""
        if not spec.batch:
            event: Event = arg
            parent, creation = self._context_of(event.headers)
            span = self.tracer.start_span(
                f"process {event.name}",
                parent,
                _CONSUMER,
                {
                    "messaging.system": "tidings",
                    "messaging.operation.type": "process",
                    "messaging.operation.name": "process",
                    "messaging.destination.name": event.name,
                    "messaging.message.id": event.id,
                    "tidings.handler": spec.name,
                    "tidings.attempt": attempt,
                },
                (Link(creation),) if creation is not None else (),
            )
            return span, _set_span_in_context(span, parent)
        events: Sequence[Event] = arg
        contexts = [self._context_of(e.headers) for e in events]
        links = [Link(creation) for _, creation in contexts if creation is not None]
        shared = {None if c is None else (c.trace_id, c.span_id) for _, c in contexts}
        parent = contexts[0][0] if len(shared) == 1 and contexts else _Context()  # a new trace
        names = {e.name for e in events}
        attributes: dict[str, Any] = {
            "messaging.system": "tidings",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.batch.message_count": len(events),
            "tidings.handler": spec.name,
            "tidings.attempt": attempt,
        }
        if len(names) == 1:
            attributes["messaging.destination.name"] = next(iter(names))
        span = self.tracer.start_span(
            f"process {next(iter(names))}" if len(names) == 1 else "process",
            parent,
            _CONSUMER,
            attributes,
            links,
        )
        return span, _set_span_in_context(span, parent)

    def _async_call(self, spec: HandlerSpec) -> Callable[[Any], Any]:
        inner = spec.call
        start = self._start
        stamp = self._stamp

        async def traced_call(arg: Any) -> Any:
            job = current_scope()
            try:
                span, context = start(spec, arg, getattr(job, "attempt", 1))
            except Exception:  # tracing must never fail a handler: run it without its span
                _start_failed(spec)
                return await inner(arg)
            token = _attach(context)
            buffer = job.buffer if job is not None else None
            mark = len(buffer) if buffer is not None else 0
            ends_later = False
            try:
                return await inner(arg)
            except BaseException as exc:
                left = getattr(job, "current_left", None)
                if left is not None:
                    # Past its timeout, a plain def body runs on in its thread (FastAPI dependencies):
                    # the span covers it, to its end, as a plain def handler's span does. (What ends
                    # the async part here, a clean-up that raised, say, is not the call's outcome.)
                    span.add_event("left behind past its timeout", {"tidings.timeout": spec.timeout or 0.0})
                    left.when_ended(functools.partial(_end_left_behind, span, spec.name))
                    ends_later = True
                elif isinstance(exc, asyncio.CancelledError):
                    if getattr(job, "timed_out", False):
                        _error(span, "timeout", f"handler {spec.name} timed out after {spec.timeout}s")
                    else:
                        _error(span, "cancelled", f"handler {spec.name} was cancelled")
                elif isinstance(exc, Exception):
                    _failed(span, exc)
                raise
            finally:
                _detach(token)
                if buffer is not None and len(buffer) > mark:
                    stamp(buffer, mark, span, context)
                if not ends_later:
                    span.end()

        return traced_call

    def _sync_call(self, spec: HandlerSpec) -> Callable[[Any], Any]:
        inner = spec.call
        start = self._start

        def traced_call(arg: Any) -> Any:  # in a worker thread, in the job's context
            try:
                span, context = start(spec, arg, getattr(current_scope(), "attempt", 1))
            except Exception:  # tracing must never fail a handler: run it without its span
                _start_failed(spec)
                return inner(arg)
            token = _attach(context)
            try:
                return inner(arg)
            except Exception as exc:
                _failed(span, exc)
                raise
            finally:
                _detach(token)
                span.end()

        return traced_call


def _wants_context(headers: Mapping[str, str] | None) -> bool:
    """Whether a record's headers lack trace context (an outbox event has its own, from the log)."""
    return headers is None or (type(headers) is not Prebuilt and "traceparent" not in headers)


def _start_failed(spec: HandlerSpec) -> None:
    logger.exception(
        "could not start the span of a call of handler %s; it runs untraced",
        spec.name,
        extra=fields(None, None, spec.name),
    )


def _end_left_behind(span: Span, handler: str, failure: BaseException | None, unfinished: bool) -> None:
    """End the span of a call left behind in its thread past its timeout, as the call ended."""
    if unfinished:
        _error(span, "unfinished", f"handler {handler} was still running in its thread at shutdown")
    elif isinstance(failure, Exception):
        _failed(span, failure)
    elif failure is not None:
        _error(span, type(failure).__qualname__, described(failure))
    span.end()


def _failed(span: Span, exc: Exception) -> None:
    try:
        span.record_exception(exc)
    except Exception:  # its __str__ raised, say: the span goes without it, the handler's error stands
        logger.debug("could not record the exception of a handler call on its span", exc_info=True)
    _error(span, type(exc).__qualname__, described(exc))


def _error(span: Span, kind: str, description: str) -> None:
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR, description))
