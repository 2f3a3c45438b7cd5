"""Payloads that used to poison the log: shaped like the codec's markers, nested too deep, not UTF-8.

Each of them used to escape the codec (or be misread by it) and take down more than its own event: a
claim of every other row, the relay, the job with its sibling events, a request.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tidings import (
    Arguments,
    Event,
    EventBus,
    HandlerError,
    RetryPolicy,
    SerializationError,
    StoreError,
    TidingsMiddleware,
)
from tidings._core.envelope import TypedDump
from tidings.store import DeadLetter, SQLiteStore
from tidings.store.codec import decode_event, encode_event, encode_payload

from ..conftest import Recorder, Records
from .conftest import Log, overwrite_payload

pytestmark = pytest.mark.anyio

DEEP = 100_000  # past any interpreter's recursion limit, for encoding and for decoding alike


def deep_payload() -> dict[str, Any]:
    tree: list[Any] = []
    for _ in range(DEEP):
        tree = [tree]
    return {"tree": tree}


class Key(enum.StrEnum):
    TYPED = "$tidings.typed"


@dataclass
class Wrapper:
    """Not an event class of the bus's, just a dataclass whose dump is a marker-shaped dict."""

    inner: Any


MARKER_SHAPED: list[dict[Any, Any]] = [
    {"$tidings.arguments": 5},
    {"$tidings.typed": "x"},
    {"$tidings.arguments": [[1, 2], {"a": 3}]},  # well formed: read back as Arguments before
    {"$tidings.typed": [["m:C"], {"x": 1}]},
    {"$tidings.plain": {"a": 1}},
    {"$tidings.plain": 5},
    {"$tidings.not-a-marker": 1},
    {Key.TYPED: "x"},
]
# as they come back: JSON keys are plain strings
AS_READ = [{str(key): value for key, value in payload.items()} for payload in MARKER_SHAPED]


def round_trip(event: Event) -> Event:
    payload, headers = encode_event(event)
    return decode_event(event.id, event.name, payload, headers, event.timestamp_ns)


# -- the codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "expected"), list(zip(MARKER_SHAPED, AS_READ, strict=True)))
def test_a_user_dict_shaped_like_a_marker_comes_back_as_that_dict(
    payload: dict[Any, Any], expected: dict[str, Any]
) -> None:
    back = round_trip(Event("x", payload)).payload
    assert type(back) is dict
    assert repr(back) == repr(expected)


def test_a_marker_shaped_dict_reached_through_a_conversion_comes_back_as_that_dict() -> None:
    # the encoder's own conversions (an Enum's value, a model_dump) can produce one at the top too
    Shape = enum.Enum("Shape", {"MARKER": {"$tidings.typed": "x"}})
    assert round_trip(Event("x", Shape.MARKER)).payload == {"$tidings.typed": "x"}
    assert round_trip(Event("x", [Wrapper({"$tidings.typed": "x"})])).payload == [
        {"inner": {"$tidings.typed": "x"}}
    ]


def test_markers_inside_a_payload_are_data() -> None:
    payload = {"list": [{"$tidings.typed": "x"}], "two": {"$tidings.arguments": 1, "b": 2}}
    assert round_trip(Event("x", payload)).payload == payload
    args = Arguments(({"$tidings.typed": "x"},), {"k": {"$tidings.arguments": 5}})
    assert round_trip(Event("x", args)).payload == args


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"$tidings.arguments":[[1],{"a":2}]}', Arguments((1,), {"a": 2})),
        ('{"$tidings.typed":[["m:C"],{"x":1}]}', TypedDump({"x": 1}, type_keys=("m:C",))),
        ('{"$tidings.typed":[[],{"x":1}]}', TypedDump({"x": 1})),  # a RootModel of a dict
        ('{"$tidings.typed":[["m:R"],[1,2]]}', [1, 2]),
        ('{"$tidings.other":1}', {"$tidings.other": 1}),
        ('{"a":1}', {"a": 1}),
        ("[1]", [1]),
    ],
)
def test_rows_written_before_the_escape_still_read(text: str, expected: Any) -> None:
    payload = decode_event("e", "x", text, '{"h":"v"}', 0).payload
    assert payload == expected
    assert type(payload) is type(expected)
    if isinstance(expected, TypedDump):
        assert payload.type_keys == expected.type_keys


@pytest.mark.parametrize(
    ("payload", "headers", "why"),
    [
        ('{"$tidings.arguments":5}', "{}", "malformed '\\$tidings.arguments' marker"),
        ('{"$tidings.arguments":[[1]]}', "{}", "malformed"),
        ('{"$tidings.arguments":[1,{}]}', "{}", "malformed"),
        ('{"$tidings.typed":"x"}', "{}", "malformed '\\$tidings.typed' marker"),
        ('{"$tidings.typed":[[1],{}]}', "{}", "malformed"),
        ('{"$tidings.plain":5}', "{}", "malformed '\\$tidings.plain' marker"),
        ("{not json", "{}", "JSONDecodeError"),
        ("1", "[1]", "headers are not a JSON object"),
        ("[" * DEEP + "]" * DEEP, "{}", "RecursionError"),
    ],
)
def test_a_row_that_is_not_what_the_codec_writes_is_refused_as_a_store_error(
    payload: str, headers: str, why: str
) -> None:
    refused = f"event 'x' \\(e\\) cannot be read back from the event log: .*{why}"
    with pytest.raises(StoreError, match=refused):
        decode_event("e", "x", payload, headers, 0)


class DumpFails:
    def model_dump(self, **options: Any) -> Any:
        raise RuntimeError("cannot dump")


class GaveUp(BaseException):
    """Not an Exception: what a serializer built on a framework's cancellation raises, say."""


class DumpRaises:
    """A payload whose ``model_dump`` raises ``error``, whatever it is."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def model_dump(self, **options: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (Event("x", deep_payload()), "RecursionError"),
        (Event("x", DumpFails()), "RuntimeError: cannot dump"),
        (Event("x", DumpRaises(GaveUp("no more"))), "GaveUp: no more"),
        (Event("x", DumpRaises(asyncio.CancelledError())), "CancelledError"),
        (Event("x", 1, {"h": DumpRaises(GaveUp("in a header"))}), "GaveUp: in a header"),  # type: ignore[dict-item]
        (Event("x", {"note": "\ud800"}), "UnicodeEncodeError"),
        (Event("x", "\udfff"), "UnicodeEncodeError"),
        (Event("x", 1, MappingProxyType({"h": "\ud800"})), "UnicodeEncodeError"),
        (Event("x\ud800", 1), "UnicodeEncodeError"),
        (Event("x\x00y", 1), "NUL"),
    ],
)
def test_any_failure_to_encode_an_event_is_a_serialization_error(event: Event, why: str) -> None:
    with pytest.raises(SerializationError, match=why) as raised:
        encode_event(event)
    assert raised.value.event is event


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(3)])
def test_a_request_to_stop_the_process_is_not_taken_for_a_bad_payload(stop: BaseException) -> None:
    with pytest.raises(type(stop)):
        encode_event(Event("x", DumpRaises(stop)))


def test_the_size_limit_counts_utf8_bytes() -> None:
    encode_payload(Event("x", "é" * 4), max_bytes=10)  # 10 bytes with its quotes
    with pytest.raises(SerializationError, match="11 bytes"):
        encode_payload(Event("x", "é" * 4 + "a"), max_bytes=10)


# -- the stores -----------------------------------------------------------------------------------


async def test_the_log_keeps_marker_shaped_payloads_as_they_were(log: Log) -> None:
    store = log()
    await store.open()
    events = [Event("x", payload) for payload in MARKER_SHAPED]
    assert await store.record([(event, "h") for event in events], lease=0) == {}
    claimed = await store.claim(limit=100, lease=60)
    assert [repr(d.event.payload) for d in claimed] == list(map(repr, AS_READ))
    store.bury([_letter(event) for event in events])
    await store.flush()
    assert [repr(d.event.payload) for d in await store.dead_letters()] == list(map(repr, AS_READ))
    await store.aclose()


def _letter(event: Event) -> DeadLetter:
    return DeadLetter(event, "h", 1, "ValueError: x", "", DeadLetter.now())


async def test_an_event_that_cannot_be_written_is_refused_alone_and_its_siblings_are_recorded(
    log: Log,
) -> None:
    store = log()
    await store.open()
    good = [Event("ok", 1), Event("ok", 2)]
    bad = [
        Event("deep", deep_payload()),
        Event("surrogate", {"note": "\ud800"}),
        Event("header", 1, MappingProxyType({"h": "\ud800"})),
        Event("nul\x00name", 1),
        Event("gave up", DumpRaises(GaveUp("no more"))),
    ]
    with anyio.fail_after(10):  # the SQLite log's writer thread, which encodes, used to die of GaveUp
        refused = await store.record([(event, "h") for event in [good[0], *bad, good[1]]], lease=0)
        assert set(refused) == {event.id for event in bad}
        for event in bad:
            assert f"({event.id}) cannot be written to the event log" in refused[event.id]
        claimed = await store.claim(limit=100, lease=60)
        assert [d.event.id for d in claimed] == [event.id for event in good]
        await store.aclose()


async def test_a_row_that_cannot_be_read_back_becomes_a_dead_letter_and_the_others_are_claimed(
    log: Log, records: Records
) -> None:
    store = log()
    await store.open()
    first, poisoned, last = Event("x", 1), Event("x", 2), Event("x", 3)
    await store.record([(first, "h"), (poisoned, "h"), (last, "h")], lease=0)
    await overwrite_payload(store, poisoned.id, '{"$tidings.arguments":5}')

    claimed = await store.claim(limit=100, lease=60)
    assert [d.event.id for d in claimed] == [first.id, last.id]
    logged = await records.wait_for(f"delivery {poisoned.id}/h is not run")
    assert logged.tidings_event_id == poisoned.id  # type: ignore[attr-defined]
    assert logged.tidings_handler == "h"  # type: ignore[attr-defined]
    assert "it is made a dead letter" in logged.getMessage()
    assert await store.claim(limit=100, lease=0) == []  # dead, not claimed again
    assert await store.pending_count() == 2

    # listed without it (logged by id); not revived; purged by its id
    assert await store.dead_letters() == []
    await records.wait_for(f"dead letter {poisoned.id}/h is left out of the list")
    assert await store.revive([f"{poisoned.id}/h"], lease=60) == []
    await records.wait_for(f"dead letter {poisoned.id}/h is not replayed")
    assert await EventBus(store=store).dead_letters.purge([f"{poisoned.id}/h"]) == 1
    await store.aclose()


async def test_a_dead_letter_that_cannot_be_read_back_is_purged_by_any_filter_and_never_replayed(
    log: Log, records: Records
) -> None:
    store = log()
    bus = EventBus(store=store)
    bus.on("x", "y", name="h")(lambda event: None)
    poisoned, other, kept, poisoned_too = Event("x", 1), Event("x", 2), Event("y", 3), Event("y", 4)
    store.bury([_letter(event) for event in (poisoned, other, kept, poisoned_too)])
    await store.flush()
    for event in (poisoned, poisoned_too):
        await overwrite_payload(store, event.id, '{"$tidings.arguments":5}')
    letter_id, why = f"{poisoned.id}/h", "its payload has a malformed '$tidings.arguments' marker"
    try:
        await bus.start(resubmit=False)
        try:
            result = await bus.dead_letters.replay([letter_id])
            assert (result.succeeded, result.failed, result.skipped) == ((), (), ())
            [unreadable] = result.unreadable
            assert (unreadable.id, unreadable.event_name, unreadable.handler) == (letter_id, "x", "h")
            assert unreadable.error.endswith(f"cannot be read back from the event log: {why}")
            logged = await records.wait_for(f"dead letter {letter_id} cannot be replayed")
            assert why in logged.getMessage() and logged.tidings_handler == "h"  # type: ignore[attr-defined]
            result = await bus.dead_letters.replay(event="x")  # by a filter: named as well
            assert [d.id for d in result.succeeded] == [f"{other.id}/h"]
            assert [d.id for d in result.unreadable] == [letter_id]
        finally:
            await bus.aclose()
        with pytest.raises(StoreError, match=f"dead letter {letter_id} .*{re.escape(why)}"):
            await bus.dead_letters.get(letter_id)  # not "no such dead letter"

        # the filters read the event name and the handler, never the payload
        assert await bus.dead_letters.purge(event="x") == 1
        assert await bus.dead_letters.purge([f"{poisoned_too.id}/h"], handler="nope") == 0
        assert [d.id for d in await store.dead_letters()] == [f"{kept.id}/h"]
        assert [d.id for d in await store.unreadable()] == [f"{poisoned_too.id}/h"]
        assert await bus.dead_letters.purge(all=True) == 2
        assert await store.unreadable() == []
        assert await store.dead_letters() == []
    finally:
        await store.aclose()


# -- the bus --------------------------------------------------------------------------------------


async def test_a_dead_letter_that_cannot_be_read_back_is_named_once_by_replay_and_get(
    log: Log, records: Records
) -> None:
    # replay listed the selection (which logged the letter as left out of the list), then asked
    # for the unreadable letters and logged it again: `tidings dead-letters replay --all` named it
    # twice; get() logged it and raised naming it
    store = log()
    bus = EventBus(store=store)
    bus.on("x", name="h")(lambda event: None)
    poisoned, fine = Event("x", 1), Event("x", 2)
    store.bury([_letter(poisoned), _letter(fine)])
    await store.flush()
    await overwrite_payload(store, poisoned.id, "not json")
    letter_id = f"{poisoned.id}/h"

    def naming() -> list[str]:
        return [r.getMessage() for r in records.recorder.items if letter_id in r.getMessage()]

    try:
        await bus.start(resubmit=False)
        try:
            for selection in ({"all": True}, {"event": "x"}, {"ids": [letter_id]}):
                records.recorder.items.clear()
                result = await bus.dead_letters.replay(**selection)
                assert [d.id for d in result.unreadable] == [letter_id]
                [logged] = naming()
                assert logged.startswith(f"dead letter {letter_id} cannot be replayed: ")
        finally:
            await bus.aclose()
        records.recorder.items.clear()
        with pytest.raises(StoreError, match=f"dead letter {letter_id} cannot be shown"):
            await bus.dead_letters.get(letter_id)
        assert naming() == []  # the error names it
        assert await bus.dead_letters.list() == []  # the other one was replayed
        [listed] = naming()  # a listing still logs what it leaves out
        assert listed.startswith(f"dead letter {letter_id} is left out of the list")
    finally:
        await store.aclose()


async def test_marker_shaped_payloads_left_by_a_dead_process_are_run_as_they_were(
    log: Log, recorder: Recorder
) -> None:
    crashed = log()  # recorded, then the process died: its leases run out at once
    await crashed.open()
    await crashed.record([(Event("thing", payload), "h.thing") for payload in MARKER_SHAPED], lease=0)
    await crashed.aclose()
    bus = EventBus(store=log(), resubmit_after=0.4)

    @bus.on("thing", name="h.thing")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    async with bus:
        seen = await recorder.wait_count(len(MARKER_SHAPED))
        await bus.drain()
        await bus.store.flush()
        assert await bus.store.pending_count() == 0  # type: ignore[attr-defined]
    assert sorted(map(repr, seen)) == sorted(map(repr, AS_READ))


async def test_the_relay_survives_whatever_a_claim_raises(
    log: Log, recorder: Recorder, records: Records
) -> None:
    store = log()
    await store.open()
    await store.record([(Event("x", 1), "h")], lease=0)
    real_claim = store.claim
    calls = 0

    async def claim(**options: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in a claim")
        return await real_claim(**options)

    store.claim = claim  # type: ignore[method-assign]
    bus = EventBus(store=store, resubmit_after=0.2)

    @bus.on("x", name="h")
    async def handler(event: Event) -> None:
        recorder.add(event.payload)

    async with bus:
        await records.wait_for("failed to relay its event log's deliveries: RuntimeError: a bug in a claim")
        assert await recorder.wait_count(1) == [1]  # claimed at the next tick


async def test_an_event_that_cannot_be_written_is_named_and_its_siblings_stay_durable(
    log: Log, recorder: Recorder, records: Records
) -> None:
    bus = EventBus(store=log())
    release = asyncio.Event()

    @bus.on("*", name="h")
    async def handler(event: Event) -> None:
        recorder.add(event.name)
        await release.wait()

    async with bus:
        bus.emit("ok")
        bus.emit("deep", deep_payload())
        bus.emit("surrogate", {"note": "\ud800"})
        bus.emit("gave up", DumpRaises(GaveUp("no more")))
        with pytest.raises(StoreError, match="refused 1 job") as raised:
            await bus.flush()
        assert "3 event(s) could not be written" in str(raised.value.__cause__)
        logged = await records.wait_for("'deep' (")
        assert logged.tidings_event == "deep"  # type: ignore[attr-defined]
        await records.wait_for("'surrogate' (")
        await records.wait_for("'gave up' (")
        assert await bus.store.pending_count() == 1  # type: ignore[attr-defined]
        release.set()
        await recorder.wait_count(4)
        await bus.drain()
    assert sorted(recorder.items) == ["deep", "gave up", "ok", "surrogate"]


async def test_a_deep_payload_emitted_in_a_request_reaches_neither_the_server_nor_its_siblings(
    log: Log, recorder: Recorder
) -> None:
    bus = EventBus(store=log())

    @bus.on("*", name="h")
    async def handler(event: Event) -> None:
        recorder.add(event.name)

    async def endpoint(request: Request) -> PlainTextResponse:
        bus.emit("audit")
        bus.emit("deep", deep_payload())
        return PlainTextResponse("ok")

    app = TidingsMiddleware(Starlette(routes=[Route("/", endpoint)]), bus=bus)
    async with bus:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/")).status_code == 200
        await recorder.wait_count(2)
        await bus.drain()
    assert sorted(recorder.items) == ["audit", "deep"]


async def test_a_dead_letter_that_cannot_be_written_is_logged_and_the_job_goes_on(
    log: Log, recorder: Recorder, records: Records, failures: list[HandlerError]
) -> None:
    bus = EventBus(store=log(), on_failure=failures.append, retry=RetryPolicy(max_attempts=1))

    @bus.on("deep", name="h.fails")
    async def fails(event: Event) -> None:
        raise RuntimeError("boom")

    @bus.on("deep", name="h.after")
    async def after(event: Event) -> None:
        recorder.add("after")

    @bus.on("other", name="h.other")
    async def other(event: Event) -> None:
        recorder.add("other")

    async with bus:
        bus.emit("deep", deep_payload())
        bus.emit("other")
        await recorder.wait_count(2)
        await bus.drain()
        [failure] = failures
        await records.wait_for(f"dead letter {failure.event.id}/h.fails (handler h.fails) cannot be written")
    assert sorted(recorder.items) == ["after", "other"]


class Raises:
    """Stands in for a store method that raises instead of queuing its write (a bug in a store)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{self.name} is broken")


async def test_whatever_the_store_raises_the_handlers_still_run(
    tmp_path: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="tidings")
    bus = EventBus(store=SQLiteStore(tmp_path / "log.db"), retry=RetryPolicy(max_attempts=2, backoff=0.01))
    store = bus.store
    attempts: dict[Any, int] = {}

    @bus.on("x", name="h")
    async def handler(event: Event) -> None:
        attempts[event.payload] = attempts.get(event.payload, 0) + 1
        recorder.add(event.payload)
        if event.payload == "fails":
            raise ValueError("fails")

    async def record(*args: Any, **kwargs: Any) -> dict[str, str]:
        raise RuntimeError("record is broken")

    async with bus:
        for name in ("complete", "retry_later", "bury"):
            setattr(store, name, Raises(name))
        store.record = record  # type: ignore[method-assign]
        bus.emit("x", "ok")
        bus.emit("x", "fails")
        with pytest.raises(StoreError, match="failed to record 2 deliveries: RuntimeError: record is broken"):
            await bus.flush()
        await recorder.wait_for(lambda items: items.count("fails") == 2)  # retried, then a dead letter
        await bus.drain()
    assert attempts == {"ok": 1, "fails": 2}
    assert "2 deliveries run without being durable" in caplog.text
    assert "could not complete" in caplog.text
    assert "could not note the failed attempt of" in caplog.text
    assert "could not write the dead letters of" in caplog.text
