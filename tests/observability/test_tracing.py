"""OpenTelemetry tracing with the real SDK: handler spans, their parent and links, headers, the log."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import Depends, FastAPI
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, Tracer

from tidings import ConfigurationError, Event, EventBus, HandlerError, RetryPolicy, TidingsMiddleware, emit
from tidings.store import SQLiteStore
from tidings.types import ASGIApp, Receive, Scope, Send

from ..conftest import Recorder, Records
from ..e2e.support import lifespan
from ..integrations.test_fastapi_dependencies import hangs_with_a_background_task

pytestmark = pytest.mark.anyio


class Spans:
    """An SDK tracer provider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = self.provider.get_tracer("tests")

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.finished() if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        (span,) = self.named(name)
        return span


@pytest.fixture
def spans() -> Iterator[Spans]:
    made = Spans()
    yield made
    made.provider.shutdown()


class RequestSpans:
    """A server span around each HTTP request, current while the app runs (what instrumentation does)."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name = f"{scope['method']} {scope['path']}"
        with self.tracer.start_as_current_span(name, kind=SpanKind.SERVER):
            await self.app(scope, receive, send)


def fastapi_app(bus: EventBus, spans: Spans, emits: list[tuple[str, Any]]) -> ASGIApp:
    app = FastAPI()

    @app.post("/signup")
    async def signup() -> dict[str, str]:
        for name, payload in emits:
            emit(name, payload)
        return {"ok": "yes"}

    app.add_middleware(TidingsMiddleware, bus=bus)
    return RequestSpans(app, spans.tracer)


async def post(app: ASGIApp, path: str = "/signup") -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        response = await http.post(path)
    assert response.status_code == 200


def traceparent_of(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def trace_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.trace_id


def linked_ids(span: ReadableSpan) -> list[int]:
    return [link.context.span_id for link in span.links]


# -- the request, its events, their handlers -------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_handler_span_is_a_child_of_the_request_span_and_links_to_it(
    spans: Spans, recorder: Recorder, kind: str
) -> None:
    bus = EventBus(tracing=spans.provider)
    payload = {"email": "ada@example.com"}

    if kind == "async":

        @bus.on("user.created", name="mail.welcome")
        async def welcome(event: Event) -> None:
            recorder.add(event)

    else:

        @bus.on("user.created", name="mail.welcome")
        def welcome_sync(event: Event) -> None:
            recorder.add(event)

    async with bus:
        await post(fastapi_app(bus, spans, [("user.created", payload)]))
        [event] = await recorder.wait_count(1)

    request = spans.one("POST /signup")
    handler = spans.one("process user.created")
    assert handler.kind is SpanKind.CONSUMER
    assert parent_id(handler) == span_id(request)
    assert trace_id(handler) == trace_id(request)
    assert linked_ids(handler) == [span_id(request)]
    assert dict(handler.attributes or {}) == {
        "messaging.system": "tidings",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "user.created",
        "messaging.message.id": event.id,
        "tidings.handler": "mail.welcome",
        "tidings.attempt": 1,
    }
    assert handler.status.status_code is StatusCode.UNSET
    # the trace context is in the headers, the payload is what was emitted and nothing more
    assert event.headers["traceparent"] == traceparent_of(request)
    assert event.payload == {"email": "ada@example.com"}
    assert payload == {"email": "ada@example.com"}


async def test_the_events_of_a_request_share_its_context_and_each_handler_gets_a_span(
    spans: Spans, recorder: Recorder
) -> None:
    bus = EventBus(tracing=spans.provider)
    bus.on("order.*", name="audit")(lambda event: recorder.add(event))

    @bus.on("order.placed", name="stock")
    async def stock(event: Event) -> None:
        recorder.add(event)

    async with bus:
        await post(fastapi_app(bus, spans, [("order.placed", 1), ("order.paid", 2)]))
        await recorder.wait_count(3)

    request = spans.one("POST /signup")
    handlers = spans.named("process order.placed") + spans.named("process order.paid")
    assert sorted(str((h.attributes or {})["tidings.handler"]) for h in handlers) == [
        "audit",
        "audit",
        "stock",
    ]
    assert all(parent_id(h) == span_id(request) for h in handlers)
    assert {event.headers["traceparent"] for event in recorder.items} == {traceparent_of(request)}


async def test_typed_events_and_sync_endpoints_get_the_requests_context_too(
    spans: Spans, recorder: Recorder
) -> None:
    bus = EventBus(tracing=spans.provider)

    @dataclass
    class UserCreated:
        __event_name__ = "user.created"
        email: str

    @bus.on(UserCreated)
    async def welcome(user: UserCreated, event: Event) -> None:
        recorder.add(event)

    app = FastAPI()

    @app.post("/typed")
    async def typed() -> None:
        emit(UserCreated("ada@example.com"))  # through EventBus.emit, into the request's buffer

    @app.post("/sync")
    def sync_endpoint() -> None:  # runs in a worker thread: its emit crosses to the loop
        emit(UserCreated("grace@example.com"))

    app.add_middleware(TidingsMiddleware, bus=bus)
    async with bus:
        await post(RequestSpans(app, spans.tracer), "/typed")
        await post(RequestSpans(app, spans.tracer), "/sync")
        items = await recorder.wait_count(2)
    requests = [spans.one("POST /typed"), spans.one("POST /sync")]
    assert [event.headers["traceparent"] for event in items] == [traceparent_of(r) for r in requests]
    handlers = spans.named("process user.created")
    assert [parent_id(h) for h in handlers] == [span_id(r) for r in requests]


async def test_spans_a_handler_starts_are_children_of_its_span(spans: Spans, recorder: Recorder) -> None:
    bus = EventBus(tracing=spans.provider)

    @bus.on("user.created")
    async def welcome(event: Event) -> None:
        with spans.tracer.start_as_current_span("smtp send"):
            recorder.add(trace.get_current_span().get_span_context())

    async with bus:
        await post(fastapi_app(bus, spans, [("user.created", None)]))
        await recorder.wait_count(1)
    assert parent_id(spans.one("smtp send")) == span_id(spans.one("process user.created"))


async def test_a_batch_handler_span_links_to_every_event(spans: Spans, recorder: Recorder) -> None:
    bus = EventBus(tracing=spans.provider)

    @bus.on("user.created", batch=True)
    async def index(events: list[Event]) -> None:
        recorder.add(len(events))

    async with bus:
        await post(fastapi_app(bus, spans, [("user.created", 1), ("user.created", 2)]))
        await recorder.wait_count(1)
    request = spans.one("POST /signup")
    batch = spans.one("process user.created")
    assert linked_ids(batch) == [span_id(request), span_id(request)]
    assert parent_id(batch) == span_id(request)  # they share one context, so it is the parent too
    assert (batch.attributes or {})["messaging.batch.message_count"] == 2
    assert "messaging.message.id" not in (batch.attributes or {})


# -- chains, emits outside requests, given headers ------------------------------------------------


async def test_chained_events_form_one_trace_through_async_and_sync_handlers(
    spans: Spans, recorder: Recorder
) -> None:
    bus = EventBus(tracing=spans.provider)

    @bus.on("order.placed")
    async def reserve(event: Event) -> None:
        emit("stock.reserved", event.payload)  # the fast path, into the job's buffer

    @bus.on("stock.reserved")
    def ship(event: Event) -> None:  # a worker thread: its emit goes through bus.emit
        emit("order.shipped", event.payload)

    @bus.on("order.shipped")
    async def notify(event: Event) -> None:
        recorder.add(event)

    async with bus:
        await post(fastapi_app(bus, spans, [("order.placed", {"order": 7})]))
        await recorder.wait_count(1)

    request = spans.one("POST /signup")
    placed = spans.one("process order.placed")
    reserved = spans.one("process stock.reserved")
    shipped = spans.one("process order.shipped")
    assert parent_id(placed) == span_id(request)
    assert parent_id(reserved) == span_id(placed)
    assert linked_ids(reserved) == [span_id(placed)]
    assert parent_id(shipped) == span_id(reserved)
    assert linked_ids(shipped) == [span_id(reserved)]
    assert {trace_id(s) for s in (request, placed, reserved, shipped)} == {trace_id(request)}
    assert recorder.items[0].headers["traceparent"] == traceparent_of(reserved)


@pytest.mark.parametrize("found", ["given", "detected after the start"])
async def test_an_event_a_task_started_by_a_handler_emits_after_it_returned_carries_its_span(
    spans: Spans, recorder: Recorder, monkeypatch: pytest.MonkeyPatch, found: str
) -> None:
    # The task runs in a copy of the handler's context, so the handler's span is current in it; its
    # emit lands in the job's buffer after the handler returned, while the job's next handler runs.
    bus = EventBus(tracing=spans.provider) if found == "given" else EventBus()
    gate = asyncio.Event()
    emitted = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def later() -> None:
        await gate.wait()
        emit("stock.reserved")
        emitted.set()

    @bus.on("order.placed")
    async def reserve(event: Event) -> None:
        tasks.append(asyncio.create_task(later()))

    @bus.on("order.placed")
    async def bill(event: Event) -> None:
        gate.set()
        await emitted.wait()

    @bus.on("stock.reserved")
    async def ship(event: Event) -> None:
        recorder.add(event)

    async with bus:
        if found != "given":  # as for a provider the app's startup code sets up (the middleware asks)
            monkeypatch.setattr(trace, "get_tracer_provider", lambda: spans.provider)
            assert bus.detect_tracing()
        await post(fastapi_app(bus, spans, [("order.placed", None)]))
        await recorder.wait_count(1)
        await asyncio.gather(*tasks)
    reserving = next(s for s in spans.named("process order.placed") if "reserve" in str(s.attributes))
    shipped = spans.one("process stock.reserved")
    assert parent_id(shipped) == span_id(reserving)
    assert linked_ids(shipped) == [span_id(reserving)]
    assert recorder.items[0].headers["traceparent"] == traceparent_of(reserving)


async def test_an_event_emitted_outside_requests_carries_the_context_of_its_emitter(
    spans: Spans, recorder: Recorder
) -> None:
    bus = EventBus(tracing=spans.provider)
    bus.on("report.*")(lambda event: recorder.add(event))

    async with bus:
        with spans.tracer.start_as_current_span("nightly job"):
            bus.emit("report.requested", {"month": 11})
            await bus.emit_now("report.requested", {"month": 12})
        await recorder.wait_count(2)
        # Emitted with no span current: no parent, not the one of the code that emitted first in the
        # same tick, nor of a drain's caller (the drain starts what waits at once)
        with spans.tracer.start_as_current_span("another job"):
            bus.emit("report.requested", {"month": 13})
        bus.emit("report.untraced")
        await recorder.wait_count(4)
        bus.emit("report.untraced")
        with spans.tracer.start_as_current_span("shutdown"):
            await bus.drain()
        await recorder.wait_count(5)
    job = spans.one("nightly job")
    handlers = spans.named("process report.requested")
    assert [parent_id(h) for h in handlers] == [span_id(job), span_id(job), span_id(spans.one("another job"))]
    assert [parent_id(h) for h in spans.named("process report.untraced")] == [None, None]


async def test_headers_given_to_emit_are_kept_and_a_given_traceparent_wins(
    spans: Spans, recorder: Recorder
) -> None:
    bus = EventBus(tracing=spans.provider)
    bus.on("a")(lambda event: recorder.add(dict(event.headers)))
    foreign = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    async with bus:
        with spans.tracer.start_as_current_span("caller"):
            bus.emit("a", headers={"tenant": "acme"})
            bus.emit("a", headers={"traceparent": foreign})
        items = await recorder.wait_count(2)
    assert items == [
        {"tenant": "acme", "traceparent": traceparent_of(spans.one("caller"))},
        {"traceparent": foreign},
    ]
    handler = spans.named("process a")[1]
    assert handler.parent is not None and handler.parent.trace_id == 0x0AF7651916CD43DD8448EB211C80319C


async def test_headers_given_to_emits_in_a_request_get_the_requests_context_in_a_new_mapping(
    spans: Spans, recorder: Recorder
) -> None:
    bus = EventBus(tracing=spans.provider)
    bus.on("user.*")(lambda event: recorder.add((event.name, dict(event.headers))))
    given = {"tenant": "acme"}
    foreign = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    app = FastAPI()

    @app.post("/signup")
    async def signup() -> None:  # on the loop: into the request's buffer, prepared with its job
        bus.emit("user.created", {"id": 1}, headers=given)
        bus.emit("user.invited", {"id": 2}, headers={"tenant": "acme", "traceparent": foreign})
        emit("user.welcomed", {"id": 3})

    @app.post("/sync")
    def sync_signup() -> None:  # a worker thread: injected as it crosses to the loop
        bus.emit("user.created", {"id": 4}, headers=given)

    app.add_middleware(TidingsMiddleware, bus=bus)
    async with bus:
        await post(RequestSpans(app, spans.tracer), "/signup")
        await post(RequestSpans(app, spans.tracer), "/sync")
        items = await recorder.wait_count(4)

    signup_span, sync_span = spans.one("POST /signup"), spans.one("POST /sync")
    assert sorted(items, key=repr) == sorted(
        [
            ("user.created", {"tenant": "acme", "traceparent": traceparent_of(signup_span)}),
            ("user.invited", {"tenant": "acme", "traceparent": foreign}),  # the caller's own wins
            ("user.welcomed", {"traceparent": traceparent_of(signup_span)}),
            ("user.created", {"tenant": "acme", "traceparent": traceparent_of(sync_span)}),
        ],
        key=repr,
    )
    assert given == {"tenant": "acme"}  # the caller's mapping is never written to
    created = spans.named("process user.created")
    assert len(created) == 2
    assert {parent_id(h) for h in created} == {span_id(signup_span), span_id(sync_span)}
    assert all(linked_ids(h) == [parent_id(h)] for h in created)
    invited = spans.one("process user.invited")
    assert invited.parent is not None and invited.parent.trace_id == 0x0AF7651916CD43DD8448EB211C80319C


async def test_an_event_an_async_handler_emits_with_headers_carries_the_handlers_span(
    spans: Spans, recorder: Recorder
) -> None:
    bus = EventBus(tracing=spans.provider)
    given = {"tenant": "acme"}

    @bus.on("order.placed")
    async def reserve(event: Event) -> None:
        bus.emit("stock.reserved", event.payload, headers=given)  # into the job's buffer
        emit("stock.counted", event.payload)

    bus.on("stock.*")(lambda event: recorder.add((event.name, dict(event.headers))))

    async with bus:
        await post(fastapi_app(bus, spans, [("order.placed", {"order": 7})]))
        items = await recorder.wait_count(2)

    placed = spans.one("process order.placed")
    assert sorted(items) == [
        ("stock.counted", {"traceparent": traceparent_of(placed)}),
        ("stock.reserved", {"tenant": "acme", "traceparent": traceparent_of(placed)}),
    ]
    assert given == {"tenant": "acme"}
    reserved = spans.one("process stock.reserved")
    assert parent_id(reserved) == span_id(placed)
    assert linked_ids(reserved) == [span_id(placed)]
    assert trace_id(reserved) == trace_id(spans.one("POST /signup"))


class BrokenPropagator(TextMapPropagator):
    """A propagator that raises, whose error quotes what it was given (a log must not repeat it)."""

    def inject(self, carrier: Any, context: Context | None = None, setter: Any = None) -> None:
        raise RuntimeError(f"cannot inject into {carrier!r}")

    def extract(self, carrier: Any, context: Context | None = None, getter: Any = None) -> Context:
        raise RuntimeError(f"cannot extract from {carrier!r}")

    @property
    def fields(self) -> set[str]:
        return {"traceparent"}


@pytest.fixture
def broken_propagator() -> Iterator[None]:
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(BrokenPropagator())
    try:
        yield
    finally:
        propagate.set_global_textmap(before)


@pytest.mark.usefixtures("broken_propagator")
async def test_a_raising_propagator_never_fails_an_emit_or_a_handler_and_is_logged_once_per_kind(
    spans: Spans, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    bus = EventBus(tracing=spans.provider)
    foreign = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    @bus.on("order.placed")
    async def reserve(event: Event) -> None:
        recorder.add(("placed", dict(event.headers)))
        emit("stock.reserved", event.payload)  # stamped with the handler's span as it returns

    bus.on("stock.reserved", name="stock")(lambda event: recorder.add(("reserved", dict(event.headers))))
    bus.on("report", name="report")(lambda event: recorder.add(("report", dict(event.headers))))

    with caplog.at_level(logging.WARNING, logger="tidings"):
        async with bus:
            await post(fastapi_app(bus, spans, [("order.placed", {"card": "4111-secret"})]))
            with spans.tracer.start_as_current_span("nightly job"):
                bus.emit("report", {"card": "4111-secret"}, headers={"tenant": "acme"})
                bus.emit("report", headers={"traceparent": foreign})  # read back by the handler
            items = await recorder.wait_count(4)

    assert sorted(items, key=repr) == sorted(
        [
            ("placed", {}),
            ("reserved", {}),
            ("report", {"tenant": "acme"}),
            ("report", {"traceparent": foreign}),
        ],
        key=repr,
    )
    # every call still has its span: one that could not read its parent starts a trace of its own
    assert len(spans.named("process order.placed")) == 1
    assert len(spans.named("process stock.reserved")) == 1
    reports = spans.named("process report")
    assert len(reports) == 2 and all(r.parent is None and not r.links for r in reports)
    warnings = [r for r in caplog.records if r.name == "tidings" and "propagator" in r.getMessage()]
    assert sorted(r.getMessage() for r in warnings) == [
        "the OpenTelemetry propagator raised RuntimeError in extract; events go on without trace "
        "context (further failures of this kind are not logged)",
        "the OpenTelemetry propagator raised RuntimeError in inject; events go on without trace "
        "context (further failures of this kind are not logged)",
    ]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in warnings)
    assert "secret" not in caplog.text and "acme" not in caplog.text


@pytest.mark.usefixtures("broken_propagator")
async def test_a_raising_propagator_leaves_the_outbox_event_untraced(spans: Spans, tmp_path: Path) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from tidings.integrations.sqlalchemy import Outbox

    path = tmp_path / "shop.db"
    bus = EventBus(store=SQLiteStore(path), tracing=spans.provider)
    recorder = Recorder()
    bus.on("order.placed")(lambda event: recorder.add(event))
    engine = create_engine(f"sqlite:///{path}")
    async with bus:
        with spans.tracer.start_as_current_span("checkout"), Session(engine) as session, session.begin():
            Outbox(bus).emit(session, "order.placed", {"order": 7}, headers={"tenant": "acme"})
        [event] = await recorder.wait_count(1)
    engine.dispose()
    assert dict(event.headers) == {"tenant": "acme"}
    assert spans.one("process order.placed").parent is None


# -- failures ---------------------------------------------------------------------------------------


async def test_a_failed_call_records_the_exception_on_each_attempts_span(
    spans: Spans, recorder: Recorder
) -> None:
    bus = EventBus(
        tracing=spans.provider,
        retry=RetryPolicy(max_attempts=2, backoff=0.01, jitter=0),
        on_failure=recorder.add,
    )

    @bus.on("payment.due", name="billing.charge")
    async def charge(event: Event) -> None:
        raise ConnectionError("gateway down")

    async with bus:
        await post(fastapi_app(bus, spans, [("payment.due", 1)]))
        await recorder.wait_count(2)

    request = spans.one("POST /signup")
    first, second = spans.named("process payment.due")
    assert [(s.attributes or {})["tidings.attempt"] for s in (first, second)] == [1, 2]
    for span in (first, second):
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "ConnectionError: gateway down"
        assert (span.attributes or {})["error.type"] == "ConnectionError"
        [exception] = [e for e in span.events if e.name == "exception"]
        assert (exception.attributes or {})["exception.type"] == "ConnectionError"
        assert parent_id(span) == span_id(request)  # the retry still belongs to the request's trace
        assert linked_ids(span) == [span_id(request)]


async def test_a_timed_out_call_is_an_error_span_of_type_timeout(spans: Spans, recorder: Recorder) -> None:
    bus = EventBus(tracing=spans.provider, on_failure=recorder.add)

    @bus.on("slow", timeout=0.05)
    async def hangs(event: Event) -> None:
        await asyncio.Event().wait()

    async with bus:
        bus.emit("slow")
        [error] = await recorder.wait_count(1)
    assert isinstance(error, HandlerError)
    span = spans.one("process slow")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "timeout"
    assert "timed out after 0.05s" in (span.status.description or "")


async def _session() -> str:  # (module level: this module's annotations are strings)
    return "session"


@pytest.mark.parametrize("ends", ["returns", "raises", "still runs at shutdown"])
async def test_a_plain_def_handler_with_dependencies_left_behind_has_one_span_to_its_end(
    ends: str, spans: Spans, recorder: Recorder
) -> None:
    # As a plain def handler's span covers its thread: the span of one with FastAPI dependencies
    # (an async call around it) ends when its thread does, not at its timeout.
    bus = EventBus(tracing=spans.provider, on_failure=recorder.add, drain_timeout=0.1)
    release = threading.Event()
    returned = Recorder()

    @bus.on("slow", timeout=0.05)
    def hangs(s: Annotated[str, Depends(_session)]) -> None:
        assert release.wait(5)
        returned.add(s)
        if ends == "raises":
            raise ValueError("late and wrong")

    try:
        async with bus:
            bus.emit("slow")
            await recorder.wait_count(1)  # past its timeout: left behind
            assert spans.named("process slow") == []  # still running
            if ends != "still runs at shutdown":
                release.set()
                await returned.wait_count(1)
                await bus.drain()
    finally:
        release.set()
    span = spans.one("process slow")
    assert span.events[0].name == "left behind past its timeout"
    if ends == "returns":
        assert span.status.status_code is StatusCode.UNSET
    elif ends == "raises":
        assert span.status.status_code is StatusCode.ERROR
        assert (span.attributes or {})["error.type"] == "ValueError"
        assert [event.name for event in span.events][1:] == ["exception"]
    else:
        assert (span.attributes or {})["error.type"] == "unfinished"


@pytest.mark.parametrize("job", ["still runs", "ended"])
async def test_what_the_background_tasks_of_a_left_behind_call_emit_carries_its_span(
    job: str, spans: Spans, recorder: Recorder
) -> None:
    # They run on the loop once its thread returned, as part of the call: what they emit is the
    # call's, under its span, whether its job still runs by then (the events join it) or not.
    bus = EventBus(tracing=spans.provider, on_failure=recorder.add)
    release = threading.Event()
    emitted = asyncio.Event()
    seen = Recorder()

    async def notify() -> None:
        emit("mail.sent")
        emitted.set()

    hangs_with_a_background_task(bus, release, notify)

    if job == "still runs":

        @bus.on("slow", name="keeps")
        async def keeps(event: Event) -> None:  # the job runs until the background task emitted
            await emitted.wait()

    @bus.on("mail.sent")
    async def on_mail(event: Event) -> None:
        seen.add(event)

    try:
        async with bus:
            bus.emit("slow")
            await recorder.wait_count(1)  # past its timeout: left behind
            if job == "ended":
                await anyio.wait_all_tasks_blocked()
                assert not bus._runner.jobs
            release.set()
            await seen.wait_count(1)
            await bus.drain()
    finally:
        release.set()
    hung = next(span for span in spans.named("process slow") if "hangs" in str(span.attributes))
    mail = spans.one("process mail.sent")
    assert parent_id(mail) == span_id(hung)
    assert seen.items[0].headers["traceparent"] == traceparent_of(hung)
    assert [type(failure).__name__ for failure in recorder.items] == ["HandlerTimeoutError"]


async def _failing_close() -> AsyncIterator[str]:
    try:
        yield "session"
    finally:
        raise RuntimeError("the session failed to close")


async def test_the_span_of_a_left_behind_call_whose_clean_up_fails_lasts_to_its_end(
    spans: Spans, recorder: Recorder, records: Records
) -> None:
    # The clean-up's failure is only logged (the call's outcome is its thread's): its span goes on.
    bus = EventBus(tracing=spans.provider, on_failure=recorder.add)
    release = threading.Event()
    returned = Recorder()

    @bus.on("slow", timeout=0.05)
    def hangs(s: Annotated[str, Depends(_failing_close)]) -> None:
        assert release.wait(5)
        returned.add(s)

    try:
        async with bus:
            bus.emit("slow")
            await records.wait_for("what ran after it was left behind past its timeout raised")
            assert spans.named("process slow") == []  # still running
            release.set()
            await returned.wait_count(1)
            await bus.drain()
    finally:
        release.set()
    span = spans.one("process slow")
    assert span.events[0].name == "left behind past its timeout"
    assert span.status.status_code is StatusCode.UNSET  # it returned


async def test_a_failing_sync_handler_is_recorded_in_its_thread(spans: Spans, recorder: Recorder) -> None:
    bus = EventBus(tracing=spans.provider, on_failure=recorder.add)

    @bus.on("a")
    def broken(event: Event) -> None:
        raise ValueError("bad row")

    async with bus:
        bus.emit("a")
        await recorder.wait_count(1)
    span = spans.one("process a")
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "ValueError"


async def test_a_handler_error_whose_str_raises_still_makes_an_error_span(
    spans: Spans, recorder: Recorder
) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no message for you")

    bus = EventBus(tracing=spans.provider, on_failure=recorder.add)

    @bus.on("a")
    async def broken(event: Event) -> None:
        raise Unprintable()

    async with bus:
        bus.emit("a")
        [error] = await recorder.wait_count(1)
    assert isinstance(error.__cause__, Unprintable)  # its own error, not the tracer's
    span = spans.one("process a")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "Unprintable: <its str() raised RuntimeError>"


# -- the durable log --------------------------------------------------------------------------------


async def test_a_delivery_resubmitted_after_a_crash_still_links_to_its_request(
    spans: Spans, recorder: Recorder, tmp_path: Path
) -> None:
    # the first process is cut off mid-handler: its delivery stays in the log, leased
    first = EventBus(
        store=SQLiteStore(tmp_path / "log.db"),
        tracing=spans.provider,
        drain_timeout=0.05,
        resubmit_after=0.2,
        request_handlers="task",  # so the request returns while its handler hangs
    )

    @first.on("report", name="reports.build")
    async def hangs(event: Event) -> None:
        await asyncio.Event().wait()

    async with first:
        await post(fastapi_app(first, spans, [("report", {"month": 11})]))
        await first.flush()
    request = spans.one("POST /signup")
    cut_off = spans.one("process report")  # the drain bound cancelled it
    assert (cut_off.attributes or {})["error.type"] == "cancelled"

    # the next process (a new provider: nothing shared but the file) takes it over
    later = Spans()
    second = EventBus(store=SQLiteStore(tmp_path / "log.db"), tracing=later.provider, resubmit_after=0.2)

    @second.on("report", name="reports.build")
    async def works(event: Event) -> None:
        recorder.add(event)

    async with second:
        [event] = await recorder.wait_count(1)
        await second.drain()
    assert event.headers["traceparent"] == traceparent_of(request)
    resubmitted = later.one("process report")
    assert parent_id(resubmitted) == span_id(request)
    assert linked_ids(resubmitted) == [span_id(request)]
    assert trace_id(resubmitted) == trace_id(request)
    later.provider.shutdown()


async def test_a_dead_letter_replayed_from_the_sqlite_log_links_to_its_request(
    spans: Spans, recorder: Recorder, tmp_path: Path
) -> None:
    first = EventBus(store=SQLiteStore(tmp_path / "log.db"), tracing=spans.provider)

    @first.on("invoice.due", name="billing.send")
    async def broken(event: Event) -> None:
        raise ConnectionError("mail server down")

    async with first:
        await post(fastapi_app(first, spans, [("invoice.due", {"invoice": 7})]))
        await first.drain()
    request = spans.one("POST /signup")

    second = EventBus(store=SQLiteStore(tmp_path / "log.db"), tracing=spans.provider)

    @second.on("invoice.due", name="billing.send")
    async def fixed(event: Event) -> None:
        recorder.add(event)

    async with second:
        result = await second.dead_letters.replay(all=True)
        assert len(result.succeeded) == 1
    failed, replayed = spans.named("process invoice.due")
    assert failed.status.status_code is StatusCode.ERROR
    assert replayed.status.status_code is StatusCode.UNSET
    assert parent_id(replayed) == span_id(request)
    assert linked_ids(replayed) == [span_id(request)]


async def test_a_replay_of_a_call_that_fails_again_is_reported_failed(spans: Spans, tmp_path: Path) -> None:
    # replay tells its failures by their events, whatever handler object (traced or not) ran them
    bus = EventBus(store=SQLiteStore(tmp_path / "log.db"), tracing=spans.provider)

    @bus.on("a", name="always.broken")
    async def broken(event: Event) -> None:
        raise ValueError("still broken")

    async with bus:
        bus.emit("a")
        await bus.drain()
        result = await bus.dead_letters.replay(all=True)
    assert len(result.failed) == 1 and not result.succeeded


async def test_the_outbox_writes_the_emitters_context_into_the_event(spans: Spans, tmp_path: Path) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from tidings.integrations.sqlalchemy import Outbox

    path = tmp_path / "shop.db"
    bus = EventBus(store=SQLiteStore(path), tracing=spans.provider)
    recorder = Recorder()
    bus.on("order.placed")(lambda event: recorder.add(event))
    outbox = Outbox(bus)
    engine = create_engine(f"sqlite:///{path}")
    async with bus:
        with spans.tracer.start_as_current_span("checkout"), Session(engine) as session, session.begin():
            outbox.emit(session, "order.placed", {"order": 7})
        [event] = await recorder.wait_count(1)
    engine.dispose()
    assert event.headers["traceparent"] == traceparent_of(spans.one("checkout"))
    assert parent_id(spans.one("process order.placed")) == span_id(spans.one("checkout"))


# -- turning it on and off ---------------------------------------------------------------------------


@pytest.mark.parametrize("tracing", [None, False])
async def test_with_tracing_off_there_are_no_handler_spans_and_no_headers(
    spans: Spans, recorder: Recorder, tracing: bool | None
) -> None:
    # None: the global provider is OpenTelemetry's default proxy (no SDK set), so the bus does not trace
    bus = EventBus(tracing=tracing)
    bus.on("user.created")(lambda event: recorder.add(event))

    async with bus:
        await post(fastapi_app(bus, spans, [("user.created", {"id": 1})]))
        with spans.tracer.start_as_current_span("outside"):
            bus.emit("user.created", {"id": 2})
        items = await recorder.wait_count(2)
    assert bus.tracing is None
    assert [dict(event.headers) for event in items] == [{}, {}]
    assert sorted(span.name for span in spans.finished()) == ["POST /signup", "outside"]


async def test_by_default_the_bus_traces_when_the_app_set_a_real_provider_globally(
    spans: Spans, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: spans.provider)
    bus = EventBus()
    bus.on("a")(lambda event: recorder.add(event))
    async with bus:
        assert bus.tracing is not None
        with spans.tracer.start_as_current_span("caller"):
            bus.emit("a")
        await recorder.wait_count(1)
    assert parent_id(spans.one("process a")) == span_id(spans.one("caller"))


async def test_a_provider_set_up_by_the_apps_startup_code_is_found(
    spans: Spans, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = EventBus()
    bus.on("a")(lambda event: recorder.add(event))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # the bus started before this startup code ran, and found no provider yet
                assert bus.tracing is None
                monkeypatch.setattr(trace, "get_tracer_provider", lambda: spans.provider)
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    async with lifespan(TidingsMiddleware(app, bus=bus)):
        assert bus.tracing is not None
        with spans.tracer.start_as_current_span("caller"):
            bus.emit("a")
        await recorder.wait_count(1)
    assert parent_id(spans.one("process a")) == span_id(spans.one("caller"))


async def test_tracing_true_uses_the_global_provider_even_one_set_after_the_start(
    spans: Spans, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = EventBus(tracing=True)
    bus.on("a")(lambda event: recorder.add(event))
    async with bus:
        assert bus.tracing is not None
        # what a later trace.set_tracer_provider() does to the proxy tracer the bus holds
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", spans.provider)
        with spans.tracer.start_as_current_span("caller"):
            bus.emit("a")
        await recorder.wait_count(1)
    assert parent_id(spans.one("process a")) == span_id(spans.one("caller"))


def test_a_starlette_app_under_auto_detection_with_no_provider_imports_no_opentelemetry() -> None:
    code = """
import asyncio, sys
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
import httpx
from tidings import EventBus, TidingsMiddleware, emit

bus = EventBus()
seen = []
bus.on("a")(lambda event: seen.append(dict(event.headers)))

async def index(request):
    emit("a", 1)
    return PlainTextResponse("ok")

app = TidingsMiddleware(Starlette(routes=[Route("/", index)]), bus=bus)

async def main():
    async with bus, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/")).status_code == 200
        bus.emit("a", 2)
        await bus.drain()

asyncio.run(main())
assert seen == [{}, {}], seen
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_tracing_needs_opentelemetry_and_a_valid_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="tracing must be"):
        EventBus(tracing="yes")  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)  # as if the otel extra were missing
    with pytest.raises(ConfigurationError, match=r'pip install "tidings\[otel\]"'):
        EventBus(tracing=True)
    EventBus(tracing=False)
    EventBus()  # auto: finds no OpenTelemetry, so it will not trace


async def test_litestar_apps_that_set_up_tracing_in_their_lifespan_are_traced(
    spans: Spans, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextlib import asynccontextmanager

    from litestar import Litestar, Request, get
    from litestar.events import listener
    from litestar.testing import AsyncTestClient

    from tidings.integrations.litestar import TidingsPlugin

    bus = EventBus()

    @listener("user_created")
    async def welcome(email: str) -> None:
        recorder.add(email)

    @asynccontextmanager
    async def set_up_tracing(app: Litestar) -> AsyncIterator[None]:
        assert bus.tracing is None  # the bus started first, with no provider in sight
        monkeypatch.setattr(trace, "get_tracer_provider", lambda: spans.provider)
        yield

    @get("/")
    async def index(request: Request[Any, Any, Any]) -> str:
        with spans.tracer.start_as_current_span("request"):
            request.app.emit("user_created", email="ann@example.com")
        return "ok"

    app = Litestar(
        route_handlers=[index],
        listeners=[welcome],
        plugins=[TidingsPlugin(bus)],
        lifespan=[set_up_tracing],
        logging_config=None,
    )
    async with AsyncTestClient(app) as client:
        assert bus.tracing is not None
        assert (await client.get("/")).status_code == 200
        await recorder.wait_count(1)
    assert spans.one("process user_created").kind is SpanKind.CONSUMER
