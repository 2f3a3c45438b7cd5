"""What the e2e apps share: a record file the tests read, and gate files the tests create.

Handlers write what they do to ``$E2E_DIR/record.log`` (one line per write, appended atomically, so
lines from the loop and from worker threads never interleave). A handler that must not finish before
the test says so waits for ``$E2E_DIR/gate-<name>`` to exist: a file still works while the server is
shutting down and no longer accepts requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

WORKDIR = Path(os.environ["E2E_DIR"])
RECORD = WORKDIR / "record.log"

# tidings logs to the "tidings" logger; show it (with levels) in the server log the tests read.
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def record(line: str) -> None:
    fd = os.open(RECORD, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


async def gate(name: str) -> None:
    """Return once the test has opened gate ``name``."""
    path = WORKDIR / f"gate-{name}"
    while not path.exists():  # noqa: ASYNC110 - the test's side is a file, not an asyncio.Event
        await asyncio.sleep(0.01)


def gate_sync(name: str) -> None:
    """:func:`gate` for plain ``def`` handlers (they run in a worker thread)."""
    path = WORKDIR / f"gate-{name}"
    while not path.exists():
        time.sleep(0.01)
