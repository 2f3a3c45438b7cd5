"""What a request costs a uvicorn server, in CPU instructions: ``python -m bench.served``.

The wrk scenario's req/s move by ±10 % between runs on a shared 2-core VM, more than the gap its
target is about (0.95 of bare Starlette's req/s), and the server's CPU time per request moves as
much between rounds a minute apart. This counts instead the instructions the server process executes per
request, under valgrind's callgrind (Debian package ``valgrind``), a figure other work on the
machine does not move: each system is served by the wrk scenario's own command (``uvicorn
bench.apps:serve_app --factory``, h11, 1 event per request to an async no-op handler), and one
keep-alive connection sends ``GET /`` requests one after another, each once the previous response
is in. After 300 requests of warm-up, the count per request is the difference between a process
that then serves 3,000 requests and one that serves 1,000 (start-up, imports and shutdown cancel
out). Two servers are counted at a time.

The ratio to bare Starlette is what wrk's req/s ratio would be if the server's instructions were
its time: it leaves out what instructions do not show (cache misses, wrk sharing the two cores) and
what one connection does not do (16 connections' requests interleaved in the server's loop). It is
for comparing commits and systems, not a replacement for the wrk figures.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from .apps import LOOPBACK_SYSTEMS, SystemName
from .loopback import HOST, serve

_WARM_UP: Final = 300
_COUNTED: Final = (1000, 3000)  # the two runs whose difference is counted
_REQUEST: Final = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
_STATUS: Final = re.compile(rb"^HTTP/1\.1 (\d{3}) ")
_LENGTH: Final = re.compile(rb"^content-length:\s*(\d+)\s*$", re.IGNORECASE | re.MULTILINE)
_TOTAL: Final = re.compile(r"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def send_requests(url: str, count: int, *, timeout: float = 120.0) -> None:
    """Send ``count`` requests over one keep-alive connection, each once the last response is in.

    Raises:
        RuntimeError: a response other than 200, or one without a Content-Length.
    """
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with socket.create_connection((HOST, port), timeout=timeout) as connection:
        pending = b""
        for _ in range(count):
            connection.sendall(_REQUEST)
            while True:
                end = pending.find(b"\r\n\r\n")
                if end >= 0:
                    head = pending[:end]
                    status, length = _STATUS.match(head), _LENGTH.search(head)
                    if status is None or status.group(1) != b"200" or length is None:
                        raise RuntimeError(f"unexpected response from {url}: {head!r}")
                    size = end + 4 + int(length.group(1))
                    if len(pending) >= size:
                        pending = pending[size:]
                        break
                chunk = connection.recv(65536)
                if not chunk:
                    raise RuntimeError(f"{url} closed the connection")
                pending += chunk


def _instructions(valgrind: str, system: SystemName, requests: int, loop: str) -> int:
    """The instructions a server of ``system`` executes from start to exit, serving ``requests``."""
    with tempfile.TemporaryDirectory(prefix="tidings-served-") as folder:
        out = Path(folder) / "callgrind.out"
        prefix = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}"]
        log = Path(folder) / "uvicorn.log"
        try:
            # (a fixed hash seed: dict and set layouts, and so the instructions, are the same every run)
            with serve(
                system,
                events=1,
                loop=loop,
                log=log,
                ready_timeout=300,
                stop_timeout=300,
                prefix=prefix,
                env={"PYTHONHASHSEED": "0"},
            ) as url:
                send_requests(url, _WARM_UP)
                send_requests(url, requests)
        except Exception as exc:
            raise RuntimeError(f"{system} under callgrind failed: {exc}\n{log.read_text()[-2000:]}") from exc
        found = _TOTAL.search(out.read_text()) if out.exists() else None
        if found is None:
            raise RuntimeError(f"callgrind wrote no total for {system}:\n{log.read_text()[-2000:]}")
        return int(found.group(1))


def count(systems: tuple[SystemName, ...], loop: str) -> dict[SystemName, float]:
    """Instructions per request of each system: the difference of two runs, two servers at a time."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("bench.served needs valgrind (Debian package valgrind) on the PATH")
    jobs = [(system, requests) for system in systems for requests in _COUNTED]
    with ThreadPoolExecutor(max_workers=2) as pool:
        counted = pool.map(lambda job: _instructions(valgrind, job[0], job[1], loop), jobs)
        totals = dict(zip(jobs, counted, strict=True))
    fewer, more = _COUNTED
    return {system: (totals[system, more] - totals[system, fewer]) / (more - fewer) for system in systems}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.served", description=__doc__)
    parser.add_argument(
        "--system",
        action="append",
        choices=LOOPBACK_SYSTEMS,
        help="a system to count (repeatable; default: every system of the wrk scenario)",
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args(argv)
    systems: tuple[SystemName, ...] = tuple(args.system or LOOPBACK_SYSTEMS)
    if "starlette" not in systems:
        systems = ("starlette", *systems)  # what the ratios are to
    counts = count(systems, args.loop)
    bare = counts["starlette"]
    print("| system | instructions/request under uvicorn | ratio to bare Starlette |")
    print("|---|---|---|")
    for system, instructions in counts.items():
        print(f"| {system} | {instructions:,.0f} | {bare / instructions:.3f} |")


if __name__ == "__main__":
    main()
