"""Runs every Python example of the README, and checks what the runnable ones do."""

from __future__ import annotations

import re
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tidings
from tidings import EventBus
from tidings._core.default import reset_default_bus

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- fragment -->\n[ \t]*)?```python\n(.*?)```", re.DOTALL)


def examples() -> list[tuple[int, str]]:
    text = README.read_text()
    found = []
    for match in BLOCK.finditer(text):
        if match.group(1):
            continue  # a fragment of code, not a program
        line = text.count("\n", 0, match.start(2)) + 1
        found.append((line, match.group(2)))
    return found


def run_example(line: int, source: str) -> dict[str, Any]:
    # a real module, as the example would be: Pydantic resolves annotations through sys.modules
    module = types.ModuleType(f"readme_line_{line}")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{README}:{line}", "exec"), module.__dict__)
    return module.__dict__


@pytest.fixture(autouse=True)
def temporary_files_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples' ``tempfile.mkdtemp()`` directories go where pytest cleans up."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(autouse=True)
def fresh_default_bus() -> Iterator[None]:
    reset_default_bus()
    yield
    reset_default_bus()


def test_the_readme_has_examples() -> None:
    assert len(examples()) >= 4


@pytest.mark.parametrize(("line", "source"), examples(), ids=[f"line {n}" for n, _ in examples()])
def test_every_example_runs(line: int, source: str) -> None:
    namespace = run_example(line, source)
    buses = [v for v in namespace.values() if isinstance(v, EventBus)]
    assert buses or "default_bus()" in source, "each example builds a bus or uses the default one"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_quick_start_handles_events_after_the_response(capsys: pytest.CaptureFixture[str]) -> None:
    line, source = next((n, s) for n, s in examples() if "app.add_middleware" in s)
    namespace = run_example(line, source)
    bus: EventBus = namespace["bus"]
    transport = httpx.ASGITransport(app=namespace["app"])
    async with bus, httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        response = await http.post("/users", params={"email": "ann@example.com"})
    assert response.json() == {"email": "ann@example.com"}
    out = capsys.readouterr().out
    assert "welcome, ann@example.com" in out
    assert re.search(r"audit: user\.created [0-9A-Z]{26}", out)


def test_the_script_example_prints(capsys: pytest.CaptureFixture[str]) -> None:
    line, source = next((n, s) for n, s in examples() if "job.finished" in s)
    run_example(line, source)
    assert capsys.readouterr().out == "job 42 finished\n"


def test_the_default_bus_example_prints(capsys: pytest.CaptureFixture[str]) -> None:
    line, source = next((n, s) for n, s in examples() if "default_bus()" in s)
    run_example(line, source)
    assert capsys.readouterr().out == "payment payment_123 has status success for amount 99.99\n"
    assert tidings.default_bus().registry.named(f"readme_line_{line}.handle_payment_result") is not None


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_typed_events_example(capsys: pytest.CaptureFixture[str]) -> None:
    line, source = next((n, s) for n, s in examples() if "class UserCreated(BaseModel)" in s)
    namespace = run_example(line, source)
    bus: EventBus = namespace["bus"]
    async with bus:
        namespace["create_user"]("ann@example.com")
        await bus.drain()
    out = capsys.readouterr().out
    assert "welcome, ann@example.com" in out
    assert "one more on free" in out
    typed = r"UserCreated\(id=1, email='ann@example\.com', plan='free'\)"
    assert re.search(r"user\.created [0-9A-Z]{26}: " + typed, out)


def test_the_handler_example_registers_what_it_says() -> None:
    line, source = next((n, s) for n, s in examples() if "AnalyticsForwarder" in s)
    bus: EventBus = run_example(line, source)["bus"]
    assert [s.pattern for s in bus.registry] == ["order.placed", "order.paid", "report.requested", "*"]
    timeouts = {s.handler.name.rsplit(".", 1)[-1]: s.handler.timeout for s in bus.registry}
    assert timeouts == {"update_dashboard": 30, "build_report": 120, "AnalyticsForwarder": 30}
    assert [s.handler.batch for s in bus.registry][-1] is True
