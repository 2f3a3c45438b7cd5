"""The fastapi-events app in examples/fastapi_events_port, end to end: on tidings, and on fastapi-events.

The example was written for fastapi-events and moved over by changing its imports only. Each test
runs it as it is (``tidings``) and, where fastapi-events is installed, again with the imports
switched back (``fastapi-events``): the same requests must have the same effects, except where
tidings fixes a fault of fastapi-events (then the test says so).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ..conftest import Recorder
from .conftest import client, lifespan

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_events_port"


class Port:
    """One loaded copy of the example: its app, database, CRM, events and handlers modules."""

    def __init__(self, package: str) -> None:
        self.app_module = importlib.import_module(f"{package}.app")
        self.db_module = importlib.import_module(f"{package}.db")
        self.events = importlib.import_module(f"{package}.events")
        self.handlers = importlib.import_module(f"{package}.handlers")
        self.app: Any = self.app_module.app
        self.database: Any = self.db_module.database
        self.crm: Any = self.db_module.crm

    def reset(self) -> None:
        self.database.tables.clear()
        self.crm.down = False

    def rows(self, table: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.database.rows(table)
        return rows


def _load_original(root: Path) -> str:
    """Copy the example, its ``tidings.compat.fastapi_events`` imports turned back into ``fastapi_events``.

    The copy must not mention tidings anywhere else: the example is fastapi-events code.
    """
    package = "fastapi_events_port_original"
    for source in EXAMPLE.rglob("*.py"):
        text = source.read_text()
        if source != EXAMPLE / "__init__.py":  # the package docstring tells the story
            for line in text.splitlines():
                if "tidings" in line:
                    assert line.startswith("from tidings.compat.fastapi_events."), (source.name, line)
        text = text.replace("tidings.compat.fastapi_events", "fastapi_events")
        assert not re.search(r"^\s*(from|import) tidings", text, re.MULTILINE), source
        target = root / package / source.relative_to(EXAMPLE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return package


@pytest.fixture(scope="session")
def ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Port]]:
    loaded = {"tidings": Port("examples.fastapi_events_port")}
    root = tmp_path_factory.mktemp("fastapi-events-port")
    if importlib.util.find_spec("fastapi_events") is not None:
        sys.path.insert(0, str(root))
        loaded["fastapi-events"] = Port(_load_original(root))
    yield loaded
    if str(root) in sys.path:
        sys.path.remove(str(root))


@pytest.fixture(params=["tidings", "fastapi-events"])
def port(request: pytest.FixtureRequest, ports: dict[str, Port]) -> Port:
    kind: str = request.param
    if kind not in ports:
        pytest.skip("fastapi-events is not installed (uv sync --group bench)")
    chosen = ports[kind]
    chosen.reset()
    return chosen


def watch(port: Port, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """A recorder of every row the app writes, from any thread, so tests can wait for one."""
    writes = Recorder()
    insert: Callable[[str, dict[str, Any]], None] = port.database.insert

    def recording_insert(table: str, row: dict[str, Any]) -> None:
        insert(table, row)
        writes.add((table, row))

    monkeypatch.setattr(port.database, "insert", recording_insert)
    return writes


def has(table: str, **fields: Any) -> Callable[[list[Any]], bool]:
    def check(items: list[Any]) -> bool:
        return any(t == table and all(row.get(k) == v for k, v in fields.items()) for t, row in items)

    return check


async def test_the_port_handles_every_event_as_fastapi_events_did(
    port: Port, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = watch(port, monkeypatch)
    signed_up = port.events.UserEvents.SIGNED_UP
    activated = port.events.UserEvents.ACTIVATED
    async with lifespan(port.app):
        # dispatched with middleware_id= by a task the lifespan started
        await writes.wait_for(has("audit", event="service.started"))
        async with client(port.app) as http:
            response = await http.post("/users", json={"email": "ada@example.com"})
            assert response.status_code == 201
            user_id = response.json()["id"]
            # handled once the app call has returned (ASGITransport returns after it)
            assert port.rows("mail") == [
                {"from": "hello@shop.example", "to": "ada@example.com", "subject": "Welcome!"}
            ]
            assert port.rows("crm") == [{"user_id": user_id, "what": "signed up"}]
            [audit] = [row for row in port.rows("audit") if row["event"] is signed_up]
            payload = audit["payload"]  # validated against SignUpPayload, dumped with exclude_unset
            assert set(payload) == {"user_id", "email", "created_at"}
            assert payload["user_id"] == uuid.UUID(user_id)
            assert isinstance(payload["created_at"], datetime)

            response = await http.post(f"/users/{user_id}/activate")  # a sync endpoint
            assert response.status_code == 200
            assert {"event": activated, "payload": {"user_id": user_id}} in port.rows("audit")

            order = {"user_id": user_id, "sku": "teapot", "quantity": 2, "unit_price": 12.5}
            response = await http.post("/orders", json=order)
            assert response.status_code == 201
            order_id = response.json()["id"]
            # reserve_stock dispatched inventory.reserved from a handler: a chained event
            await writes.wait_for(has("ledger", event="inventory.reserved"))
            await writes.wait_for(has("audit", event="inventory.reserved"))
            assert port.rows("reservations") == [{"sku": "teapot", "quantity": 2}]
            assert port.rows("ledger") == [{"event": "inventory.reserved", "sku": "teapot", "quantity": 2}]
            placed = [row["payload"] for row in port.rows("audit") if row["event"] == "order.placed"]
            assert placed == [
                {
                    "order_id": order_id,
                    "user_id": uuid.UUID(user_id),
                    "sku": "teapot",
                    "quantity": 2,
                    "total": 25.0,
                }
            ]

            assert (await http.post(f"/orders/{order_id}/ship")).status_code == 200
            assert (await http.post("/orders/999/ship")).status_code == 404
            assert sorted(row["event"] for row in port.rows("order_stats")) == [
                "order.placed",
                "order.shipped",
            ]
    events = [row["event"] for row in port.rows("audit")]
    assert sorted(map(str, events)) == sorted(
        map(
            str,
            [
                "service.started",
                signed_up,
                activated,
                "order.placed",
                "inventory.reserved",
                "order.shipped",
            ],
        )
    )


async def test_a_failing_handler_is_isolated_where_fastapi_events_let_it_escape(
    port: Port, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    watch(port, monkeypatch)
    crm_error = port.db_module.CRMUnavailableError
    port.crm.down = True
    async with lifespan(port.app), client(port.app) as http:
        if port.app_module.__name__.startswith("examples."):
            with caplog.at_level(logging.ERROR, logger="tidings"):
                response = await http.post("/users", json={"email": "bob@example.com"})
            assert response.status_code == 201
            failures = [r for r in caplog.records if "track_sign_up" in r.getMessage()]
            assert failures, caplog.text
            assert isinstance(failures[0].exc_info and failures[0].exc_info[1], crm_error)
        else:
            # fastapi-events: the handler's exception leaves the ASGI app after the 201 was sent
            with pytest.raises(crm_error):
                await http.post("/users", json={"email": "bob@example.com"})
        # the other handler of the same event, and the audit trail, ran all the same
        assert [row["to"] for row in port.rows("mail")] == ["bob@example.com"]
        assert any(row["event"] is port.events.UserEvents.SIGNED_UP for row in port.rows("audit"))
        assert port.rows("crm") == []


async def test_the_disable_switch_silences_the_port(port: Port, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTAPI_EVENTS_DISABLE_DISPATCH", "true")
    async with lifespan(port.app), client(port.app) as http:
        response = await http.post("/users", json={"email": "cy@example.com"})
        assert response.status_code == 201
        await http.post(f"/users/{response.json()['id']}/activate")
    assert port.rows("users")  # the endpoint ran
    assert port.rows("mail") == port.rows("audit") == port.rows("crm") == []


async def test_handler_dependencies_follow_the_apps_overrides(
    ports: dict[str, Port], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tidings only: fastapi-events solves handler dependencies without the app's overrides."""
    port = ports["tidings"]
    port.reset()
    watch(port, monkeypatch)

    async def test_settings() -> dict[str, str]:
        return {"mail_sender": "test@shop.example"}

    app = port.app
    monkeypatch.setitem(app.dependency_overrides, port.handlers.get_settings, test_settings)
    async with lifespan(app), client(app) as http:
        assert (await http.post("/users", json={"email": "di@example.com"})).status_code == 201
    assert [row["from"] for row in port.rows("mail")] == ["test@shop.example"]
