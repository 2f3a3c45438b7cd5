"""Option objects for the bus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..exceptions import ConfigurationError

__all__ = ["Limits", "RequestErrorPolicy"]

RequestErrorPolicy = Literal["drop", "deliver"]
"""What happens to a request's events when its endpoint raises an unhandled exception.

``"drop"`` (the default): the request failed, so whatever it announced probably did not happen (its
database transaction rolled back); the events are discarded and a warning names each one.
``"deliver"``: the events are handled anyway, as if the request had succeeded.
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
