from __future__ import annotations

import subprocess
import sys
import threading
import time
import weakref

import pytest

from tidings._core.threads import DaemonThreadPool


def test_results_exceptions_and_reuse_of_idle_workers() -> None:
    pool = DaemonThreadPool(2, "t")
    assert pool.submit(pow, 2, 10).result(5) == 1024
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(5)
    names = {pool.submit(lambda: threading.current_thread().name).result(5) for _ in range(20)}
    assert names <= {"t-0", "t-1"}
    assert all(t.daemon for t in pool._threads)
    pool.shutdown()
    assert not any(t.is_alive() for t in pool._threads)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(pow, 1, 1)


def test_a_worker_lets_go_of_the_work_before_its_future_is_done() -> None:
    # A runner's thread hop gets its job as an argument; whoever the future wakes may expect the job
    # freed (with no garbage collection) once the call returned. Done callbacks run in the worker
    # thread as the future completes: by then the worker must hold neither the call nor its arguments.
    class Argument:
        pass

    def call(argument: Argument) -> int:
        return 1

    pool = DaemonThreadPool(1, "t")
    argument = Argument()
    ref = weakref.ref(argument)
    freed: list[bool] = []
    release = threading.Event()
    busy = pool.submit(release.wait, 5)  # the worker waits until the call below is queued
    queued = pool.submit(call, argument)
    queued.add_done_callback(lambda done: freed.append(ref() is None))
    del argument
    release.set()
    assert busy.result(5) is True
    assert queued.result(5) == 1
    assert freed == [True]
    pool.shutdown()


def test_never_more_than_max_workers() -> None:
    pool = DaemonThreadPool(2, "t")
    release = threading.Event()
    futures = [pool.submit(release.wait, 5) for _ in range(5)]
    assert len(pool._threads) == 2
    release.set()
    assert all(f.result(5) for f in futures)
    pool.shutdown()


def test_shutdown_can_cancel_queued_work() -> None:
    pool = DaemonThreadPool(1, "t")
    release = threading.Event()
    running = pool.submit(release.wait, 5)
    queued = pool.submit(time.monotonic)
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    release.set()
    assert running.result(5) is True


def test_a_hung_worker_does_not_keep_the_process_alive() -> None:
    code = (
        "import threading, sys; from tidings._core.threads import DaemonThreadPool;"
        "pool = DaemonThreadPool(1, 't'); started = threading.Event();"
        "pool.submit(lambda: (started.set(), threading.Event().wait()));"
        "started.wait(5); pool.shutdown(wait=False); print('exiting')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0
    assert done.stdout.strip() == "exiting"
