"""The worker threads that run plain ``def`` handlers.

Why not ``concurrent.futures.ThreadPoolExecutor``: its workers are joined when the interpreter exits,
so one handler that never returns keeps the process alive after shutdown's drain bound has already
given up on it and reported it (Ctrl+C would hang). These workers are daemon threads: once the drain
bound has reported a hung call, exiting does not wait for it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

__all__ = ["DaemonThreadPool"]

P = ParamSpec("P")
T = TypeVar("T")

_WorkItem = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreadPool(Executor):
    """An executor of at most ``max_workers`` daemon threads, started as work arrives."""

    def __init__(self, max_workers: int, name: str) -> None:
        self._max_workers = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._shut_down = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot submit work to a thread pool that was shut down")
            self._queue.put((future, fn, args, kwargs))
            if self._idle:
                self._idle -= 1  # that idle worker takes it
            elif len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future = item[0]
            work: tuple[Any, ...] = item[1:]
            del item
            if future.set_running_or_notify_cancel():
                succeeded, outcome = _run(*work)
                # Let go of the work (a handler job among its arguments) before its waiter wakes:
                # a job is freed, with no garbage collection, as soon as it has ended.
                work = ()
                if succeeded:
                    future.set_result(outcome)
                else:
                    future.set_exception(outcome)
                del outcome
            del future, work  # nor keep them while waiting for the next
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut_down = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()


def _run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    try:
        return True, fn(*args, **kwargs)
    except BaseException as exc:  # the future's to report, whatever it is
        return False, exc
