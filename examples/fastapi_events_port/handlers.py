"""What happens after the response: local handlers with dependencies, and an audit trail handler."""

# fastapi-events reads dependencies from parameter defaults only (no Annotated): hence `= Depends()`.
# ruff: noqa: B008

from collections.abc import Iterable
from typing import Any

from fastapi import Depends

from tidings.compat.fastapi_events.dispatcher import dispatch
from tidings.compat.fastapi_events.handlers.base import BaseEventHandler
from tidings.compat.fastapi_events.handlers.local import local_handler
from tidings.compat.fastapi_events.typing import Event

from .db import CRM, Database, Mailer, crm, database
from .events import UserEvents


async def get_database() -> Database:
    return database


async def get_settings() -> dict[str, str]:
    return {"mail_sender": "hello@shop.example"}


async def get_mailer(
    db: Database = Depends(get_database),
    settings: dict[str, str] = Depends(get_settings),
) -> Mailer:
    return Mailer(db, settings["mail_sender"])


async def get_crm() -> CRM:
    return crm


@local_handler.register(event_name=UserEvents.SIGNED_UP)
async def send_welcome_email(event: Event, mailer: Mailer = Depends(get_mailer)) -> None:
    _, payload = event
    await mailer.send(payload["email"], "Welcome!")


@local_handler.register(event_name=UserEvents.SIGNED_UP)
async def track_sign_up(event: Event, crm: CRM = Depends(get_crm)) -> None:
    _, payload = event
    await crm.track(str(payload["user_id"]), "signed up")


@local_handler.register(event_name="order.*")
async def count_orders(event: Event, db: Database = Depends(get_database)) -> None:
    event_name, payload = event
    db.insert("order_stats", {"event": event_name, "order_id": payload["order_id"]})


@local_handler.register(event_name="order.placed")
async def reserve_stock(event: Event, db: Database = Depends(get_database)) -> None:
    _, payload = event
    db.insert("reservations", {"sku": payload["sku"], "quantity": payload["quantity"]})
    dispatch("inventory.reserved", {"sku": payload["sku"], "quantity": payload["quantity"]})


@local_handler.register(event_name="inventory.*")
def write_inventory_ledger(event: Event) -> None:
    # a blocking call to the warehouse system: fine, plain def handlers do not run on the event loop
    event_name, payload = event
    database.insert("ledger", {"event": event_name, **payload})


class AuditTrail(BaseEventHandler):
    """Writes every event to the audit table: one insert per request, however many events it had."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def row(event: Event) -> dict[str, Any]:
        event_name, payload = event
        return {"event": event_name, "payload": payload}

    async def handle(self, event: Event) -> None:
        self.db.insert_many("audit", [self.row(event)])

    async def handle_many(self, events: Iterable[Event]) -> None:
        rows = [self.row(event) for event in events]
        if rows:
            self.db.insert_many("audit", rows)
