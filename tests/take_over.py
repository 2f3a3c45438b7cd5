"""An emit of a plain def call past its timeout, driven into one moment of the call's take-over.

What a call left behind emits is the call's: the log holds it before the call leaves the log. The
moment the call's thread emits ``"child"`` in is chosen with handshakes, never by timing:

- ``"routed before"``: the emit found the call still its job's, and reaches the loop only once
  the job has gone on without the call and ended (the thread was held up in between);
- ``"handed over before"``: the emit is queued for the loop as the take-over begins, which then
  runs before the loop takes it;
- ``"returning"``: the call emits and returns while it is being taken over;
- ``"after"``: the call emits once it has been taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import anyio

from tidings import Event, EventBus, emit
from tidings._core.dispatcher import Record, Scope
from tidings.store import SQLiteStore

from .conftest import Recorder

MOMENTS: Final = ("routed before", "handed over before", "returning", "after")
CHILD: Final = "child"  # the event the call emits
BOUND: Final = 5.0  # how long a handshake waits before the test fails


class TakeOverRace:
    """A durable bus whose call emits :data:`CHILD` at ``moment`` of its take-over.

    ``failures`` gets the bus's failures, ``seen`` each :data:`CHILD` handled; ``order`` lists
    ``("recorded", handlers)`` once the log took deliveries and ``("completed", handlers)`` as it
    is asked to let them go.
    """

    def __init__(self, moment: str, path: Path) -> None:
        assert moment in MOMENTS
        self.moment = moment
        self.path = path
        self.failures = Recorder()
        self.seen = Recorder()
        self.order: list[tuple[str, list[str]]] = []
        self.routed = threading.Event()  # the emit is routed to the job, not queued for the loop yet
        self.may_hand_over = threading.Event()  # "routed before": the test saw the job end
        self.handed = threading.Event()  # the emit is queued for the loop
        self.returned = threading.Event()  # "returning": the call's thread has ended the call
        self.taking_over = threading.Event()  # the take-over has begun
        self.taken_over = threading.Event()
        self.end_handled = asyncio.Event()  # the loop has handled the end of the call left behind
        # handshakes that timed out: one on the loop or in a thread fails no test by itself
        self.missed: list[str] = []
        store = SQLiteStore(path)
        self.bus = bus = EventBus(on_failure=self.failures.add, name="test", store=store)
        self._runner = bus._runner

        @bus.on(CHILD, name=CHILD)
        async def child(event: Event) -> None:
            self.seen.add(event.name)

        hand_over, ended = bus._hand_over, self._runner._left_behind_ended

        def held_hand_over(scope: Scope | None, record: Record) -> None:
            if record[0] == CHILD and moment == "routed before":
                self.routed.set()
                self._wait(self.may_hand_over, "the job's end")
            hand_over(scope, record)
            if record[0] == CHILD:
                self.handed.set()

        def end_handled(*args: Any) -> None:
            ended(*args)
            self.end_handled.set()

        bus._hand_over = held_hand_over  # type: ignore[method-assign]
        self._runner._left_behind_ended = end_handled  # type: ignore[method-assign, assignment]
        record, complete = store.record, store.complete

        async def noted_record(deliveries: Any, *, lease: float) -> dict[str, str]:
            names = [handler for _, handler in deliveries]
            if CHILD in names and moment != "returning":
                # not before the end of the call left behind reached the loop: were it completed
                # there at once, the order would show it
                await asyncio.wait_for(self.end_handled.wait(), BOUND)
            refused = await record(deliveries, lease=lease)
            self.order.append(("recorded", names))
            return refused

        def noted_complete(deliveries: Any) -> None:
            self.order.append(("completed", [handler for _, handler in deliveries]))
            complete(deliveries)

        store.record = noted_record  # type: ignore[method-assign]
        store.complete = noted_complete  # type: ignore[method-assign]

    def wrap_take_over(self, name: str) -> None:
        """Hold up the runner's take-over method ``name`` until the emit is at its moment."""
        take_over: Callable[..., Any] = getattr(self._runner, name)

        def held(*args: Any) -> Any:
            self.at_take_over()
            result = take_over(*args)
            self.taken_over.set()
            return result

        setattr(self._runner, name, held)

    def at_take_over(self) -> None:
        """On the loop, as the take-over begins: wait (blocking the loop) for the emit's moment."""
        self.taking_over.set()
        before = {"routed before": self.routed, "handed over before": self.handed, "returning": self.returned}
        if self.moment in before:
            self._wait(before[self.moment], f"the emit's moment, {self.moment!r}")

    def emit_child(self) -> None:
        """In the call's thread: emit :data:`CHILD` at the moment chosen."""
        if self.moment == "after":
            self._wait(self.taken_over, "the take-over's end")
        else:  # once the loop is in the take-over, so that it cannot take what is queued before it
            self._wait(self.taking_over, "the take-over's start")
        emit(CHILD)
        if self.moment == "handed over before":  # still running when it is taken over
            self._wait(self.taken_over, "the take-over's end")

    def _wait(self, event: threading.Event, what: str) -> None:
        if not event.wait(BOUND):
            self.missed.append(what)
            raise AssertionError(f"{what} did not come within {BOUND}s")

    async def run_out(self) -> None:
        """Once the call was past its timeout: let the race run to its end, then drain the bus."""
        if self.moment == "routed before":  # its emit goes on once the job went on without it
            await anyio.wait_all_tasks_blocked()
            assert not self._runner.jobs
            self.may_hand_over.set()
        await self.seen.wait_count(1)
        await self.bus.drain()
        await self.bus.flush()

    def check(self, call: str) -> None:
        """Every handshake came; :data:`CHILD` ran once, logged before ``call`` left the now empty log."""
        assert not self.missed
        assert self.seen.items == [CHILD]
        order = self.order
        recorded = next(i for i, (what, names) in enumerate(order) if what == "recorded" and CHILD in names)
        completed = next(i for i, (what, names) in enumerate(order) if what == "completed" and call in names)
        assert recorded < completed, order  # a crash in between cannot lose the child
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            assert db.execute(f"SELECT count(*) FROM {SQLiteStore.deliveries_table}").fetchone() == (0,)
