"""docs/migrating-from-fastapi-events.md: its imports, its command and its example do what it says."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "migrating-from-fastapi-events.md"
EXAMPLE = ROOT / "examples" / "fastapi_events_port"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.DOTALL)


def test_every_import_of_the_table_works_and_only_its_module_changed() -> None:
    rows = re.findall(
        r"^\| `(from fastapi_events[^`]*)` \| `(from tidings[^`]*)` \|$", GUIDE.read_text(), re.M
    )
    assert len(rows) >= 7
    for original, ours in rows:
        assert original.replace("fastapi_events", "tidings.compat.fastapi_events", 1) == ours
        exec(ours, {})


def test_the_command_turns_fastapi_events_code_into_the_example(tmp_path: Path) -> None:
    """Run the guide's sed command on the example with fastapi-events imports: it gives the example back."""
    if shutil.which("sed") is None or shutil.which("grep") is None:
        pytest.skip("needs grep and sed")
    [command] = blocks("sh")
    sources = sorted(
        path for path in EXAMPLE.rglob("*.py") if path.name != "__init__.py" or path.parent != EXAMPLE
    )
    for source in sources:
        target = tmp_path / source.relative_to(EXAMPLE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text().replace("tidings.compat.fastapi_events", "fastapi_events"))
    subprocess.run(command, shell=True, cwd=tmp_path, check=True)
    for source in sources:
        assert (tmp_path / source.relative_to(EXAMPLE)).read_text() == source.read_text(), source.name


def test_the_bus_example_builds_a_middleware(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tidings.compat.fastapi_events.handlers.local import LocalHandler
    from tidings.compat.fastapi_events.middleware import EventHandlerASGIMiddleware

    monkeypatch.chdir(tmp_path)
    [code] = blocks("python")
    app = FastAPI()
    namespace: dict[str, Any] = {
        "app": app,
        "local_handler": LocalHandler(),
        "EventHandlerASGIMiddleware": EventHandlerASGIMiddleware,
        "report_to_sentry": lambda error: None,
    }
    exec(code, namespace)
    bus = namespace["bus"]
    assert bus.handler_timeout == 30
    assert bus.retry.max_attempts == 5
    assert [m.kwargs["bus"] for m in app.user_middleware] == [bus]
