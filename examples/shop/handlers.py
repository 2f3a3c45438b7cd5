"""The shop's event handlers: what happens *because* something happened.

None of them delays a response: tidings runs them after the response has been sent. A handler that
raises is logged and reported to ``on_failure``; the other handlers of the event still run.

Every delivery is recorded in a SQLite event log (``shop-events.db``, or ``$SHOP_EVENT_LOG``) before
its handler runs, so a crash loses nothing; a delivery whose last attempt fails is kept there as a
dead letter, to be replayed once the cause is fixed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from tidings import Event, EventBus, HandlerError, RetryPolicy, emit
from tidings.store import SQLiteStore

from .events import OrderCancelled, OrderConfirmed, OrderPlaced, UserCreated

__all__ = ["AnalyticsForwarder", "Stats", "Warehouse", "bus", "stats", "warehouse"]

logger = logging.getLogger("shop")


@dataclass
class Stats:
    """What the handlers did (served by ``GET /stats``)."""

    opened: bool = False
    emails_sent: list[str] = field(default_factory=list)
    orders_placed: int = 0
    orders_shipped: list[int] = field(default_factory=list)
    orders_confirmed: list[int] = field(default_factory=list)
    orders_cancelled: int = 0
    revenue: float = 0.0
    audited: list[str] = field(default_factory=list)
    analytics_batches: list[list[str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # calls that gave up: now dead letters
    failed_attempts: int = 0

    def reset(self) -> None:
        vars(self).update(vars(Stats()))


stats = Stats()


class Warehouse:
    """The outside service ``notify_warehouse`` talks to."""

    ships_gremlins = False


warehouse = Warehouse()


def record_failure(error: HandlerError) -> None:
    """tidings has logged the failure with its traceback already; we also count it."""
    stats.failed_attempts += 1
    if error.dead_letters:
        stats.failures.append(f"{error.handler.rsplit('.', 1)[-1]}: {error.__cause__!r}")


bus = EventBus(
    handler_timeout=5.0,
    on_failure=record_failure,
    store=SQLiteStore(os.environ.get("SHOP_EVENT_LOG", "shop-events.db")),
    name="shop",
)


@bus.on("*")
def audit(event: Event) -> None:
    """A plain ``def`` handler for every event: it runs in a worker thread, so blocking I/O is fine."""
    logger.info("audit: %s %s %r", event.id, event.name, event.payload)
    stats.audited.append(event.name)  # list.append is atomic: safe from the worker thread


@bus.on("shop.opened")
async def mark_open(event: Event) -> None:
    stats.opened = True


@bus.on(UserCreated)
async def send_welcome_email(email: str) -> None:
    """Asks for the one field it needs, by name."""
    logger.info("sending a welcome email to %s", email)
    stats.emails_sent.append(email)


@bus.on(OrderPlaced)
async def count_order(total: float) -> None:
    stats.orders_placed += 1
    stats.revenue += total


@bus.on(OrderPlaced, retry=RetryPolicy(max_attempts=3, backoff=0.1))
async def notify_warehouse(order: OrderPlaced) -> None:
    """Fails on purpose for gremlins, to show that one failing handler does not stop the others.

    It is tried three times, then becomes a dead letter: ``POST /warehouse/gremlins`` changes the
    warehouse's mind, and ``POST /dead-letters/replay`` ships the order after all (the payload comes
    back from the event log as an ``OrderPlaced`` again).
    """
    if order.item == "gremlin" and not warehouse.ships_gremlins:
        raise RuntimeError("the warehouse refuses to ship gremlins")
    stats.orders_shipped.append(order.id)


@bus.on(OrderPlaced)
async def confirm_order(order: OrderPlaced) -> None:
    """Chaining: an event emitted by a handler is handled right after, in the same job."""
    emit(OrderConfirmed(id=order.id))


@bus.on(OrderConfirmed)
async def record_confirmation(id: int) -> None:
    stats.orders_confirmed.append(id)


@bus.on(OrderCancelled)
async def refund(cancelled: OrderCancelled) -> None:
    stats.orders_cancelled += 1
    stats.revenue -= cancelled.total


class AnalyticsForwarder:
    """A batch handler: ``handle_many`` gets every matching event of one request in one call,
    so a real forwarder would make one upstream call per batch instead of one per event."""

    async def handle_many(self, events: list[Event]) -> None:
        logger.info("forwarding %d event(s) to analytics", len(events))
        stats.analytics_batches.append([event.name for event in events])


bus.subscribe(AnalyticsForwarder(), "user.*", "order.*", "stock.*")
