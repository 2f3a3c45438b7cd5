"""Helpers for the e2e tests: run an app's ASGI lifespan, run a real uvicorn, wait on conditions.

Nothing here sleeps to wait for something to happen: every wait polls a condition under a deadline
and fails with what it was waiting for and what it saw.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import pytest

from tidings.types import ASGIApp, Message

ROOT = Path(__file__).resolve().parents[2]
POLL = 0.01  # seconds between two looks at a condition


async def wait_for(
    condition: Callable[[], bool], what: str, *, timeout: float = 10.0, seen: Callable[[], str] | None = None
) -> None:
    """Wait until ``condition()`` holds; fail the test naming ``what`` (and ``seen()``) if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            details = f"\n--- seen ---\n{seen()}" if seen is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{details}", pytrace=False)
        await anyio.sleep(POLL)


def _wait_for_sync(condition: Callable[[], bool], what: str, timeout: float, seen: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout}s waiting for {what}\n--- seen ---\n{seen()}", pytrace=False
            )
        time.sleep(POLL)


# -- in-process: the ASGI lifespan ----------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run ``app``'s ASGI lifespan around the block, as a server does (startup, then shutdown).

    ``httpx.ASGITransport`` sends no lifespan events, so without this neither the app's lifespan
    code nor TidingsMiddleware's bus start/drain would run.
    """
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

    async def expect(kind: str) -> None:
        with anyio.fail_after(10):
            message = await from_app.get()
        assert message["type"] == kind, message

    async def run() -> None:
        await app(scope, to_app.get, from_app.put)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        await to_app.put({"type": "lifespan.startup"})
        await expect("lifespan.startup.complete")
        try:
            yield
        finally:
            await to_app.put({"type": "lifespan.shutdown"})
            await expect("lifespan.shutdown.complete")


# -- a real server in a subprocess ----------------------------------------------------------------


class Server:
    """A uvicorn process serving one app module on 127.0.0.1 at a port the OS picked."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, workdir: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.workdir = workdir
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    @property
    def record(self) -> list[str]:
        """The lines the app's handlers and lifespan wrote to ``$E2E_DIR/record.log`` so far."""
        path = self.workdir / "record.log"
        return path.read_text().splitlines() if path.exists() else []

    def describe(self) -> str:
        """The record and the server log, for failure messages."""
        record = "\n".join(self.record)
        return f"record.log:\n{record}\n--- server log ---\n{self.log}"

    def open_gate(self, name: str) -> None:
        """Create the file a handler of the app waits for (see ``apps/common.py``)."""
        (self.workdir / f"gate-{name}").touch()

    async def wait_for_record(self, line: str, *, timeout: float = 10.0) -> None:
        await wait_for(
            lambda: line in self.record, f"{line!r} in record.log", timeout=timeout, seen=self.describe
        )

    async def wait_for_log(self, text: str, *, timeout: float = 10.0) -> None:
        await wait_for(
            lambda: text in self.log, f"{text!r} in the server log", timeout=timeout, seen=self.describe
        )

    def send_signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    async def wait_exit(self, *, timeout: float = 10.0) -> int:
        """Wait for the process to exit and return its exit code.

        uvicorn re-raises the signal it handled once it is done, so ``-SIGTERM`` is the usual code.
        """
        await wait_for(
            lambda: self.process.poll() is not None,
            "the server process to exit",
            timeout=timeout,
            seen=self.describe,
        )
        return self.process.wait()


@contextmanager
def serve(app: str, workdir: Path, *options: str, **env: str) -> Iterator[Server]:
    """Run ``uvicorn <app> <options>`` on 127.0.0.1:<free port>; kill it on exit if it still runs.

    The app gets ``E2E_DIR=workdir`` (where it writes ``record.log`` and finds gate files) plus
    ``env``. Returns once uvicorn says it is serving (lifespan startup has completed by then).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    child_env = {k: v for k, v in os.environ.items() if k != "TIDINGS_DISABLE_EMIT"}
    child_env.update(env, E2E_DIR=str(workdir), PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--lifespan",
        "on",
        *options,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, log_path, workdir)
    try:
        pattern = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")

        def started() -> bool:
            if process.poll() is not None:
                pytest.fail(
                    f"the server exited with {process.returncode}\n{server.describe()}", pytrace=False
                )
            return pattern.search(server.log) is not None

        _wait_for_sync(started, f"uvicorn to serve {app}", 20.0, server.describe)
        match = pattern.search(server.log)
        assert match is not None
        server.port = int(match.group(1))
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def index_of(lines: list[str], line: str) -> int:
    assert line in lines, f"{line!r} is missing from:\n" + "\n".join(lines)
    return lines.index(line)
