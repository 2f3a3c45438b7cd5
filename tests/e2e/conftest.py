"""e2e tests drive their servers from plain asyncio; the event loop inside the servers is uvicorn's."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
