"""Calling an ASGI app directly, as a server would: the scope and the receive channel of one request."""

from __future__ import annotations

import asyncio

from tidings.types import Message, Receive, Scope


def http_scope(path: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    """The scope of one HTTP/1.1 request to ``testserver``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }


def request_body(body: bytes = b"") -> Receive:
    """A receive channel that gives the body once, then waits as a client that stays connected."""
    received = False

    async def receive() -> Message:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive
