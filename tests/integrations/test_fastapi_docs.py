"""Runs the Python examples of docs/fastapi.md, and checks that they do what the text says."""

from __future__ import annotations

import logging
import re
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tidings import EventBus

DOC = Path(__file__).resolve().parents[2] / "docs" / "fastapi.md"
BLOCK = re.compile(r"(<!-- fragment -->\n)?```python\n(.*?)```", re.DOTALL)


def examples() -> list[tuple[int, str]]:
    text = DOC.read_text()
    return [
        (text.count("\n", 0, match.start(2)) + 1, match.group(2))
        for match in BLOCK.finditer(text)
        if not match.group(1)  # fragments are parts of programs, not programs
    ]


def run_example(line: int, source: str) -> dict[str, Any]:
    # a real module, as the example would be: FastAPI and Pydantic resolve annotations through it
    module = types.ModuleType(f"fastapi_doc_line_{line}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{DOC}:{line}", "exec"), module.__dict__)
    return module.__dict__


def example_with(text: str) -> tuple[int, str]:
    return next((line, source) for line, source in examples() if text in source)


def test_the_doc_has_examples() -> None:
    assert len(examples()) >= 2


@pytest.mark.parametrize(("line", "source"), examples(), ids=[f"line {n}" for n, _ in examples()])
def test_every_example_runs(line: int, source: str) -> None:
    namespace = run_example(line, source)
    assert any(isinstance(value, EventBus) for value in namespace.values())


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_dependencies_example_does_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = run_example(*example_with("SessionDep"))
    bus: EventBus = namespace["bus"]
    transport = httpx.ASGITransport(app=namespace["app"])
    async with bus, httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        response = await http.post("/users", params={"email": "ann@example.com"})
    assert response.json() == {"email": "ann@example.com"}
    assert capsys.readouterr().out == (
        "committed ['mail to ann@example.com: Welcome!', 'welcomed ann@example.com']\nsession closed\n"
    )


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_emitter_example_does_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = run_example(*example_with("emitter: Emitter"))
    bus: EventBus = namespace["bus"]
    transport = httpx.ASGITransport(app=namespace["app"])
    async with bus, httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        response = await http.get("/")
    assert response.json() == {"message": "Email sent!"}
    assert capsys.readouterr().out == "Sending email to: email@example.com\n"


def test_the_emitter_for_example_starts_its_bus(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    namespace = run_example(*example_with("emitter_for(audit_bus)"))
    with caplog.at_level(logging.WARNING, logger="tidings"), TestClient(namespace["app"]) as client:
        assert client.post("/login").json() == {"id": 1}
    # the lifespan started the audit bus, and drained it at shutdown: its handler ran, nothing waited
    assert capsys.readouterr().out == "audit: {'id': 1}\n"
    assert not [r for r in caplog.records if r.name == "tidings"]
