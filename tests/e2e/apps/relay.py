"""One of several processes working through the same PostgreSQL log (tests/e2e/test_postgres_relays.py).

``python -m tests.e2e.apps.relay``: connects to the log, prints ``ready`` and waits for a line on stdin
(the test sends one to every process once all are ready, so that their relays claim at the same
moment), then starts a bus on the log, lets its relay take deliveries until none is pending, and
prints ``idle``. Each handler run appends ``<pid> <n>`` to ``$RELAY_RUNS``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from tidings import Event, EventBus
from tidings.store.postgres import PostgresStore

RUNS = os.open(os.environ["RELAY_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
store = PostgresStore(os.environ["RELAY_DSN"], schema=os.environ["RELAY_SCHEMA"])
bus = EventBus(store=store, resubmit_after=30)


@bus.on("job", name="jobs.run")
async def run(event: Event) -> None:
    await asyncio.sleep(0.001)  # some work, so that both processes are busy at once
    os.write(RUNS, f"{os.getpid()} {event.payload['n']}\n".encode())


async def main() -> None:
    await store.open()  # connected: the bus's start below claims at once
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    async with bus:
        async with asyncio.timeout(120):
            # the log is shared with another process: its count, polled under a deadline, is the signal
            while await store.pending_count():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    print("idle", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
