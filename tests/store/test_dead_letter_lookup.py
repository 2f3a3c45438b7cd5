"""Dead letters looked up by id, on the durable logs: the rows of those ids are read, no others.

A lookup used to read (and decode) every dead letter and pick in Python: about a second at 50,000
letters, for ``tidings dead-letters show ID``. Counting the rows decoded shows what SQL selected.
"""

from __future__ import annotations

import asyncpg
import pytest

from tidings import Event, EventBus
from tidings.store import DeadLetter
from tidings.store.postgres import PostgresStore

from ..conftest import POSTGRES_DSN, Records
from .conftest import Log, overwrite_payload

pytestmark = pytest.mark.anyio


async def test_get_replay_and_purge_by_id_read_only_the_rows_of_those_ids(
    log: Log, decoded: list[str]
) -> None:
    bus = EventBus(store=log())
    bus.on("a", name="h")(lambda event: None)
    events = [Event("a", n) for n in range(20)]
    bus.store.bury([DeadLetter(event, "h", 1, "ValueError: x", "", DeadLetter.now()) for event in events])
    await bus.store.flush()
    first, second, third = (f"{events[n].id}/h" for n in (3, 7, 11))
    try:
        found = await bus.dead_letters.get(first)
        assert found is not None and found.event.payload == 3
        assert await bus.dead_letters.get(f"{events[3].id}/other") is None
        assert decoded == [events[3].id]

        decoded.clear()
        await bus.start(resubmit=False)
        try:
            result = await bus.dead_letters.replay([second, f"{events[5].id}/other"])
        finally:
            await bus.aclose()
        assert [letter.id for letter in result.succeeded] == [second]
        assert set(decoded) == {events[7].id}

        decoded.clear()
        assert await bus.dead_letters.purge([third, second], handler="h") == 1  # replayed: gone
        assert set(decoded) <= {events[7].id, events[11].id}
        assert len(await bus.dead_letters.list()) == 18
    finally:
        await bus.store.aclose()


async def test_postgres_revives_many_ids_in_a_bounded_number_of_statements(
    pg_schema: str, records: Records
) -> None:
    # revive locked, read and updated each id in statements of its own: two round trips to the
    # server per dead letter replayed (about 2.4 s for 5,000 on loopback). SQLite keeps a statement
    # per id: it has no round trip, and one statement for many ids measured slower.
    store = PostgresStore(POSTGRES_DSN, schema=pg_schema)
    await store.open()
    try:
        events = [Event("a", n) for n in range(1000)]
        store.bury([DeadLetter(event, "h", 1, "ValueError: x", "", DeadLetter.now()) for event in events])
        await store.flush()
        await overwrite_payload(store, events[10].id, "not json")
        ids = [f"{event.id}/h" for event in reversed(events)] + ["no/such", f"{events[5].id}/h"]
        connection = store._connection  # the one connection the store reads and writes on
        assert connection is not None
        statements: list[str] = []

        def logged(record: asyncpg.connection.LoggedQuery) -> None:
            if store.deliveries_table in record.query:  # not BEGIN, COMMIT and the like
                statements.append(record.query)

        connection.add_query_logger(logged)
        try:
            revived = await store.revive(ids, lease=60)
        finally:
            connection.remove_query_logger(logged)
        assert [d.id for d in revived] == [i for i in ids[:-2] if i != f"{events[10].id}/h"]
        assert len(statements) == 2, statements[:4]
        [logged_once] = [r.getMessage() for r in records.recorder.items if events[10].id in r.getMessage()]
        assert logged_once.startswith(f"dead letter {events[10].id}/h is not replayed")
        assert await store.dead_letters() == []
        assert [u.id for u in await store.unreadable()] == [f"{events[10].id}/h"]
        assert await store.pending_count() == 999
        assert await store.claim(limit=10, lease=60) == []  # leased to this process for 60s
    finally:
        await store.aclose()
