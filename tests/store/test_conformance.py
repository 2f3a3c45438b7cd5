"""One suite every store passes: the protocol's behaviour, store by store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tidings import Event
from tidings.store import DeadLetter, MemoryStore, SQLiteStore, Store
from tidings.store.postgres import PostgresStore

from ..conftest import POSTGRES_DSN

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(tmp_path / "log.db")
    else:
        made = PostgresStore(POSTGRES_DSN, schema=request.getfixturevalue("pg_schema"))
    await made.open()
    yield made
    await made.aclose()


def letter(event: Event, handler: str = "h", attempts: int = 3) -> DeadLetter:
    return DeadLetter(
        event, handler, attempts, "ValueError: x", "Traceback ...", datetime(2026, 1, 2, tzinfo=UTC)
    )


def seen(letter: DeadLetter) -> tuple[object, ...]:
    """All a dead letter holds (events compare by identity)."""
    event = letter.event
    return (
        letter.id,
        event.name,
        event.payload,
        dict(event.headers),
        event.timestamp_ns,
        letter.attempts,
        letter.error,
        letter.traceback,
        letter.failed_at,
    )


async def test_recorded_deliveries_are_claimable_only_once_their_lease_ran_out(store: Store) -> None:
    events = [Event("a", {"n": i}) for i in range(3)]
    assert await store.record([(e, "h") for e in events], lease=3600) == {}
    assert await store.claim(limit=10, lease=60) == []
    await store.record([(Event("b", [1, "two"]), "h")], lease=0)
    [claimed] = await store.claim(limit=10, lease=60)
    assert (claimed.event.name, claimed.event.payload, claimed.handler, claimed.attempts) == (
        "b",
        [1, "two"],
        "h",
        0,
    )
    assert await store.claim(limit=10, lease=60) == []  # leased to us now


async def test_claim_returns_the_oldest_event_first_and_respects_the_limit(store: Store) -> None:
    events = [Event("a", i) for i in range(5)]
    await store.record([(e, "h") for e in reversed(events)], lease=0)
    first = await store.claim(limit=2, lease=60)
    rest = await store.claim(limit=10, lease=60)
    assert [d.event.payload for d in first + rest] == [0, 1, 2, 3, 4]
    assert [d.event.id for d in first + rest] == [e.id for e in events]


async def test_completed_deliveries_are_gone(store: Store) -> None:
    done, kept = Event("a", 1), Event("a", 2)
    await store.record([(done, "h"), (kept, "h"), (done, "other")], lease=0)
    store.complete([(done.id, "h")])
    await store.flush()
    claimed = await store.claim(limit=10, lease=60)
    assert sorted((d.event.payload, d.handler) for d in claimed) == [(1, "other"), (2, "h")]


async def test_a_retry_keeps_its_attempts_and_waits_for_its_backoff(store: Store) -> None:
    event = Event("a", 1)
    await store.record([(event, "h")], lease=0)
    store.retry_later(event.id, "h", attempts=2, due_in=3600, lease=0)
    await store.flush()
    assert await store.claim(limit=10, lease=60) == []
    store.retry_later(event.id, "h", attempts=3, due_in=0, lease=0)
    await store.flush()
    [claimed] = await store.claim(limit=10, lease=60)
    assert claimed.attempts == 3


async def test_renew_extends_but_never_shortens_a_lease(store: Store) -> None:
    event = Event("a", 1)
    await store.record([(event, "h")], lease=0)
    store.renew([(event.id, "h")], lease=3600)
    await store.flush()
    assert await store.claim(limit=10, lease=60) == []
    store.renew([(event.id, "h")], lease=0)  # shorter: ignored
    await store.flush()
    assert await store.claim(limit=10, lease=60) == []


async def test_dead_letters_are_kept_filtered_revived_and_purged(store: Store) -> None:
    recorded = Event("order.paid", {"order": 1}, {"trace": "t1"})
    never_recorded = Event("user.created", {"user": 2})
    await store.record([(recorded, "billing")], lease=0)
    store.bury([letter(recorded, "billing"), letter(never_recorded, "mail", attempts=1)])
    await store.flush()
    assert await store.claim(limit=10, lease=60) == []  # dead letters are not pending
    letters = await store.dead_letters()
    assert [(d.event.name, d.handler, d.attempts) for d in letters] == [
        ("order.paid", "billing", 3),
        ("user.created", "mail", 1),
    ]
    first = letters[0]
    assert first.event.id == recorded.id
    assert first.event.payload == {"order": 1}
    assert dict(first.event.headers) == {"trace": "t1"}
    assert first.event.timestamp_ns == recorded.timestamp_ns
    assert (first.error, first.traceback) == ("ValueError: x", "Traceback ...")
    assert first.failed_at == datetime(2026, 1, 2, tzinfo=UTC)
    assert [d.handler for d in await store.dead_letters(event="user.*")] == ["mail"]
    assert [d.handler for d in await store.dead_letters(handler="bill*")] == ["billing"]
    assert [d.handler for d in await store.dead_letters(ids=[first.id])] == ["billing"]

    revived = await store.revive([first.id, "no/such"], lease=3600)
    assert [d.id for d in revived] == [first.id]
    assert [d.handler for d in await store.dead_letters()] == ["mail"]
    assert await store.revive([first.id], lease=3600) == []  # not a dead letter any more

    assert await store.purge([letters[1].id, "no/such"]) == 1
    assert await store.dead_letters() == []


async def test_burying_again_updates_the_letter(store: Store) -> None:
    event = Event("a")
    store.bury([letter(event, attempts=1)])
    store.bury([letter(event, attempts=4)])
    await store.flush()
    assert [d.attempts for d in await store.dead_letters()] == [4]


async def test_recording_twice_keeps_one_delivery(store: Store) -> None:
    event = Event("a")
    await store.record([(event, "h")], lease=0)
    await store.record([(event, "h")], lease=0)
    assert len(await store.claim(limit=10, lease=60)) == 1


async def test_dead_letters_are_looked_up_revived_and_purged_by_id(store: Store) -> None:
    # an event id may hold a '/' (Event(id=...), a CloudEvent's id); a handler name never does
    slashed = Event("order.paid", 1, id="orders/42")
    others = [Event("order.paid", i) for i in range(3)]
    store.bury([letter(e, h) for e in [*others, slashed] for h in ("billing", "mail")])
    await store.flush()
    wanted = [f"{slashed.id}/mail", others[2].id + "/billing", others[0].id + "/mail", "no/such", "nothing"]
    found = await store.dead_letters(ids=[*wanted, others[0].id + "/mail"])  # one id twice: one letter
    expected = sorted([(others[0].id, "mail"), (others[2].id, "billing"), (slashed.id, "mail")])
    assert [(d.event.id, d.handler) for d in found] == expected  # oldest event first, as listed
    assert list(map(seen, found)) == [seen(d) for d in await store.dead_letters() if d.id in wanted]
    assert [d.id for d in await store.dead_letters(ids=wanted, handler="mail")] == [
        f"{others[0].id}/mail",
        f"{slashed.id}/mail",
    ]
    assert await store.dead_letters(ids=[]) == []

    assert [d.id for d in await store.revive([f"{slashed.id}/mail"], lease=3600)] == [f"{slashed.id}/mail"]
    assert await store.purge([f"{slashed.id}/billing", f"{slashed.id}/mail"]) == 1
    assert slashed.id not in {d.event.id for d in await store.dead_letters()}


async def test_revive_takes_many_dead_letters_in_the_order_given_and_nothing_else(store: Store) -> None:
    dead = [Event("a", n) for n in range(30)]
    pending = Event("a", "pending")
    await store.record([(pending, "h")], lease=3600)
    store.bury([letter(event) for event in dead])
    await store.flush()
    chosen = [f"{event.id}/h" for event in reversed(dead[::2])]
    asked = [chosen[0], "no/such", f"{pending.id}/h", *chosen[1:], chosen[3], f"{dead[1].id}/other"]
    revived = await store.revive(asked, lease=0)
    assert [d.id for d in revived] == chosen  # as given, each once; unknown and pending ids left out
    assert [(d.event.payload, d.attempts, d.error) for d in revived] == [
        (n, 3, "ValueError: x") for n in reversed(range(0, 30, 2))
    ]
    assert [d.event.payload for d in await store.dead_letters()] == list(range(1, 30, 2))
    assert await store.revive(chosen, lease=0) == []  # not dead letters any more
    if store.durable:  # pending again, attempts from zero, leased for 0s: claimable
        claimed = await store.claim(limit=100, lease=60)
        assert sorted(d.event.payload for d in claimed) == list(range(0, 30, 2))
        assert {d.attempts for d in claimed} == {0}


async def test_dead_letters_are_purged_by_filter_and_all(store: Store) -> None:
    paid, created = Event("order.paid", 1), Event("user.created", 2)
    store.bury(
        [letter(paid, "billing"), letter(paid, "mail"), letter(created, "mail"), letter(created, "crm")]
    )
    await store.flush()
    assert await store.unreadable() == []  # every one of these reads back
    assert await store.purge(event="order.*", handler="bill*") == 1
    assert await store.purge([f"{paid.id}/mail", f"{created.id}/mail", "no/such"], event="user.*") == 1
    assert await store.purge(handler="mail") == 1
    assert [d.id for d in await store.dead_letters()] == [f"{created.id}/crm"]
    store.bury([letter(paid, "billing")])
    await store.flush()
    assert await store.purge() == 2  # no filter: every dead letter
    assert await store.dead_letters() == []
    assert await store.purge() == 0
