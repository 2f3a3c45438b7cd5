"""Option objects for the bus."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from ..exceptions import ConfigurationError

__all__ = ["NO_RETRY", "Limits", "RequestErrorPolicy", "RequestHandlerMode", "RetryPolicy", "is_seconds"]


def is_seconds(value: object) -> bool:
    """Whether ``value`` is a number of seconds: an int or a float, not NaN, and not a bool
    (``True`` is an int to Python, but no one means one second by it)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


RequestErrorPolicy = Literal["deliver", "drop"]
"""What happens to a request's events when its app raises an unhandled exception.

``"deliver"`` (the default): they are handled as if the request had succeeded (in a task of the
bus, since the error response has yet to be sent and must not wait for them). Nothing the code
announced is lost, which is what users of fastapi-events get too. To make an event depend on a
database commit, emit it after the commit.
``"drop"``: if the exception reached the middleware before a response started, or after a response
with a status of 500 or more started (the failure's own error response: Starlette's
``ServerErrorMiddleware`` sends its 500, then re-raises, and it runs inside the middleware when that
wraps the app by hand), the request failed and whatever it announced most likely rolled back: the
events are discarded and a warning names each one. Once a response below 500 has started, the
request's work is done and its events are delivered even if something fails later (a background
task, a client that went away). Knowing the response's status costs about 0.4 µs per request
(bench/README.md), which is why this is not the default.

Exceptions turned into responses inside the middleware (``HTTPException``, an exception handler
registered for a specific exception class) never reach it, so their events are delivered under either
policy. A handler registered for ``Exception`` or for status 500 is different: Starlette runs it
in ``ServerErrorMiddleware``, outside the middleware added with ``app.add_middleware``, so the
exception reaches the middleware before that handler responds, and under ``"drop"`` the request's
events are dropped whatever its response (wrapped around the app by hand, the middleware sees that
response, and one below 500 keeps them). Register the handler for a specific exception class to keep
them.
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


_ExceptionTypes = tuple[type[BaseException], ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """When a failed handler call is tried again, and when it becomes a dead letter.

    A call fails when it raises, times out (:class:`~tidings.HandlerTimeoutError`) or cancels
    itself. Attempt ``n`` (``n >= 1``) that fails is retried after ``backoff * multiplier**(n-1)``
    seconds (capped at ``max_backoff``, then shortened at random by up to ``jitter`` of itself, so
    that many failing calls do not retry in lockstep) unless one of these holds, in which case the
    call becomes a dead letter (see :attr:`tidings.EventBus.dead_letters`):

    - ``n == max_attempts``;
    - the exception is an instance of a ``fail_on`` class, or of no ``retry_on`` class;
    - the retry would start more than ``deadline`` seconds after the event was emitted.

    Retries run in a job of their own; they never hold up the request or the other handlers.

    Attributes:
        max_attempts: attempts in all, the first included (``1``: never retry).
        backoff: seconds before the first retry.
        multiplier: growth of the delay from one retry to the next.
        max_backoff: the longest delay between two attempts.
        jitter: the fraction (0 to 1) of each delay that is random: ``0.5`` waits between half the
            delay and all of it; ``1`` is "full jitter".
        deadline: seconds from the event's emit time after which no retry starts
            (``None``: no limit beyond ``max_attempts``).
        attempt_timeout: seconds one attempt may take, for handlers registered without their own
            ``timeout=`` (``None``: the bus's ``handler_timeout``).
        retry_on: exception classes worth another attempt.
        fail_on: exception classes that make a dead letter at once (checked first).

    Example:
        >>> from tidings import RetryPolicy
        >>> policy = RetryPolicy(max_attempts=5, backoff=1.0, retry_on=(ConnectionError,))
        >>> policy.delay(3, rand=1.0)
        4.0
    """

    max_attempts: int = 3
    backoff: float = 0.5
    multiplier: float = 2.0
    max_backoff: float = 60.0
    jitter: float = 0.5
    deadline: float | None = None
    attempt_timeout: float | None = None
    retry_on: _ExceptionTypes = (Exception,)
    fail_on: _ExceptionTypes = ()

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ConfigurationError(f"RetryPolicy.max_attempts must be an int >= 1, got {attempts!r}")
        for field in ("backoff", "max_backoff"):
            value = getattr(self, field)
            if not (is_seconds(value) and math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"RetryPolicy.{field} must be a finite number >= 0, got {value!r}")
        multiplier = self.multiplier
        if not (is_seconds(multiplier) and math.isfinite(multiplier)) or multiplier < 1:
            raise ConfigurationError(f"RetryPolicy.multiplier must be >= 1, got {multiplier!r}")
        # (a fraction, not seconds: jitter=False reads as "none" and is taken as 0)
        if not (isinstance(self.jitter, int | float) and 0 <= self.jitter <= 1):
            raise ConfigurationError(f"RetryPolicy.jitter must be between 0 and 1, got {self.jitter!r}")
        for field in ("deadline", "attempt_timeout"):
            value = getattr(self, field)
            if value is not None and not (is_seconds(value) and value > 0):
                raise ConfigurationError(f"RetryPolicy.{field} must be > 0 or None, got {value!r}")
        for field in ("retry_on", "fail_on"):
            value = getattr(self, field)
            if not isinstance(value, tuple) or not all(
                isinstance(cls, type) and issubclass(cls, BaseException) for cls in value
            ):
                raise ConfigurationError(
                    f"RetryPolicy.{field} must be a tuple of exception classes, got {value!r}"
                )

    def delay(self, attempt: int, *, rand: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next.

        ``rand`` (0 to 1, drawn at random when omitted) picks the point within the jitter range:
        ``1.0`` gives the full delay.
        """
        try:
            base = min(self.max_backoff, self.backoff * self.multiplier ** (attempt - 1))
        except OverflowError:
            base = self.max_backoff
        if rand is None:
            rand = random.random()
        return base * (1.0 - self.jitter * (1.0 - rand))

    def retries(self, error: BaseException) -> bool:
        """Whether an attempt that failed with ``error`` is worth another one (attempts aside)."""
        return not isinstance(error, self.fail_on) and isinstance(error, self.retry_on)


NO_RETRY = RetryPolicy(max_attempts=1)
"""The bus default: a failed call is not retried; it becomes a dead letter at once."""
