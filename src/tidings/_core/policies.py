"""Option objects for the bus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..exceptions import ConfigurationError

__all__ = ["Limits", "RequestErrorPolicy", "RequestHandlerMode"]

RequestErrorPolicy = Literal["deliver", "drop"]
"""What happens to a request's events when its app raises an unhandled exception.

``"deliver"`` (the default): they are handled as if the request had succeeded (in a task of the
bus, since the error response has yet to be sent and must not wait for them). Nothing the code
announced is lost, which is what users of fastapi-events get too. To make an event depend on a
database commit, emit it after the commit.
``"drop"``: if the app raised before the response started (the request failed, and whatever it
announced most likely rolled back), the events are discarded and a warning names each one. Once the
response has started, the request's work is done and its events are delivered even if something
fails later (a background task, a client that went away). Knowing when the response started costs
about 0.4 µs per request (bench/README.md), which is why this is not the default.
"""

RequestHandlerMode = Literal["inline", "task"]
"""Where a request's handlers run once its response has been sent.

``"inline"`` (the default): in the request's own task. No task and no thread hop per request, which is
what makes events nearly free; but servers wait for in-flight request tasks before they run the
lifespan shutdown (uvicorn with no limit unless ``--timeout-graceful-shutdown``), so at shutdown these
handlers are bounded by ``handler_timeout`` and the server's graceful timeout, not by
``drain_timeout``.
``"task"``: in a task the bus owns, started when the request returns. About 2 µs more per request
that has events (bench/README.md); the request's task ends as soon as the response is sent, and
shutdown's ``drain_timeout`` bounds these handlers like every other.
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Bounds on the work the bus does at once.

    Attributes:
        max_concurrency: how many handler jobs may run at once. A job is one request's events (run
            after its response is sent) or one batch of events emitted outside requests. When the
            limit is reached, further jobs wait their turn in arrival order; nothing is dropped.
            A request whose job waits has already sent its response: the wait holds the server's
            request task, which is how backpressure reaches a server that is producing too much.
        max_threads: worker threads for plain ``def`` handlers. One job's sync calls share one hop.
    """

    max_concurrency: int = 256
    max_threads: int = 8

    def __post_init__(self) -> None:
        for field in ("max_concurrency", "max_threads"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"Limits.{field} must be an int >= 1, got {value!r}")
