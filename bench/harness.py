"""Drive an ASGI app in-process: its lifespan, and requests through a minimal fake receive/send.

No server, no sockets, no HTTP client: each request is one ``await app(scope, receive, send)`` with a
fresh copy of a fixed GET scope. ``receive`` always returns the same empty request body and ``send``
only checks the status, so what is timed is the app (framework, middleware, event machinery) alone.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from types import TracebackType

    from ._types import ASGIApp, Message

__all__ = ["Lifespan", "RequestDriver"]

_HTTP_SCOPE: Final[dict[str, Any]] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
_REQUEST: Final[dict[str, Any]] = {"type": "http.request", "body": b"", "more_body": False}


class Lifespan:
    """Runs the app's ASGI lifespan around a block: ``async with Lifespan(app) as state: ...``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> dict[str, Any]:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self._task = asyncio.create_task(self._run(scope))
        await self._inbox.put({"type": "lifespan.startup"})
        await self._expect("lifespan.startup.complete")
        return self.state

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._expect("lifespan.shutdown.complete")
        assert self._task is not None
        await self._task

    async def _run(self, scope: dict[str, Any]) -> None:
        await self.app(scope, self._inbox.get, self._outbox.put)

    async def _expect(self, kind: str) -> None:
        message = await self._outbox.get()
        if message["type"] != kind:
            raise RuntimeError(f"lifespan: expected {kind}, got {message}")


class RequestDriver:
    """Sends ``GET /`` to an app, one request at a time, and checks every response is a 200."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state
        self.responses = 0
        self.bad: list[int] = []

    async def _receive(self) -> Message:
        return _REQUEST

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.responses += 1
            if message["status"] != 200:
                self.bad.append(message["status"])

    async def run(self, n: int) -> None:
        """Send ``n`` requests back to back."""
        app, receive, send, template, state = self.app, self._receive, self._send, _HTTP_SCOPE, self.state
        for _ in range(n):
            scope = dict(template)
            scope["state"] = state.copy()
            await app(scope, receive, send)
        if self.bad:
            raise RuntimeError(f"{len(self.bad)} request(s) failed, e.g. status {self.bad[0]}")
