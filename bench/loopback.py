"""Serve one system with uvicorn on 127.0.0.1 and load it with wrk.

The server is a subprocess (``python -m uvicorn --factory bench.apps:serve_app``, single worker, no
access log); the port is free when chosen and the server is ready when it accepts a TCP connection.
It is stopped with SIGTERM (uvicorn's graceful shutdown runs the lifespan, so tidings drains).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .apps import SERVE_EVENTS_ENV, SERVE_SYSTEM_ENV

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from pathlib import Path

    from .apps import SystemName

__all__ = ["WrkResult", "parse_wrk", "run_wrk", "serve"]

HOST: Final = "127.0.0.1"
WRK: Final = "/usr/bin/wrk"
HTTP_IMPL: Final = "h11"  # httptools is not installed in the bench environment; h11 for every system

_UNITS: Final = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_LATENCY_RE: Final = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RPS_RE: Final = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_ERRORS_RE: Final = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)|^\s*Socket errors:.*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float


def parse_wrk(output: str) -> WrkResult:
    """Pull req/s, p50 and p99 out of ``wrk --latency`` output.

    Raises:
        RuntimeError: wrk reported errors or the output lacks a figure.
    """
    errors = _ERRORS_RE.search(output)
    if errors:
        raise RuntimeError(f"wrk reported errors: {errors.group(0).strip()}\n{output}")
    rps = _RPS_RE.search(output)
    latencies = {m.group(1): float(m.group(2)) * _UNITS[m.group(3)] for m in _LATENCY_RE.finditer(output)}
    if rps is None or set(latencies) != {"50", "99"}:
        raise RuntimeError(f"could not parse wrk output:\n{output}")
    return WrkResult(requests_per_s=float(rps.group(1)), p50_ms=latencies["50"], p99_ms=latencies["99"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_accepting(proc: subprocess.Popen[bytes], port: int, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with status {proc.returncode} before accepting connections")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"uvicorn did not accept connections on port {port} in {deadline_s}s"
                ) from None
            time.sleep(0.02)  # poll interval, not a readiness guess


@contextlib.contextmanager
def serve(
    system: SystemName,
    *,
    events: int,
    loop: str,
    log: Path,
    ready_timeout: float = 30.0,
    stop_timeout: float = 15.0,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Run ``system`` under uvicorn for the ``with`` block; yields the base URL.

    ``prefix`` runs the server under another program (``valgrind --tool=callgrind``, say), and
    ``env`` adds to its environment.
    """
    port = _free_port()
    server_env = {**os.environ, **(env or {}), SERVE_SYSTEM_ENV: system, SERVE_EVENTS_ENV: str(events)}
    command = [
        *prefix,
        sys.executable,
        "-m",
        "uvicorn",
        "bench.apps:serve_app",
        "--factory",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
        "--loop",
        loop,
        "--http",
        HTTP_IMPL,
        "--lifespan",
        "on",
    ]
    with log.open("wb") as log_file:
        proc = subprocess.Popen(command, env=server_env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_until_accepting(proc, port, ready_timeout)
            yield f"http://{HOST}:{port}/"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run_wrk(url: str, *, duration_s: int, connections: int = 16, threads: int = 1) -> WrkResult:
    """One ``wrk -t1 -c16 -dNs --latency`` run against ``url``."""
    command = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 30, check=True)
    return parse_wrk(done.stdout)
