"""Dead letters looked up by id, on the durable logs: the rows of those ids are read, no others.

A lookup used to read (and decode) every dead letter and pick in Python: about a second at 50,000
letters, for ``tidings dead-letters show ID``. Counting the rows decoded shows what SQL selected.
"""

from __future__ import annotations

import pytest

from tidings import Event, EventBus
from tidings.store import DeadLetter

from .conftest import Log

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
