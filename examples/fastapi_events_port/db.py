"""Stand-ins for the app's database, mailer and CRM client (in memory, so the example runs alone)."""

import threading
from typing import Any


class Database:
    """Tables of rows. Thread-safe: sync endpoints and sync handlers write from worker threads."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def insert(self, table: str, row: dict[str, Any]) -> None:
        with self._lock:
            self.tables.setdefault(table, []).append(row)

    def insert_many(self, table: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.insert(table, row)

    def rows(self, table: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.tables.get(table, []))


class Mailer:
    """Sends mail (records it)."""

    def __init__(self, database: Database, sender: str) -> None:
        self.database = database
        self.sender = sender

    async def send(self, to: str, subject: str) -> None:
        self.database.insert("mail", {"from": self.sender, "to": to, "subject": subject})


class CRMUnavailableError(Exception):
    """The CRM did not answer."""


class CRM:
    """A remote CRM; ``down`` makes every call fail, as the real one does now and then."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.down = False

    async def track(self, user_id: str, what: str) -> None:
        if self.down:
            raise CRMUnavailableError(f"CRM did not answer tracking {what} for {user_id}")
        self.database.insert("crm", {"user_id": user_id, "what": what})


database = Database()
crm = CRM(database)
