"""What one wake-up costs on this machine: the same Python work per message, at a steady rate and back to back.

    python bench/wakeup_floor.py                          # 300 µs of work, at 500/s and back to back
    python bench/wakeup_floor.py '{"work_us": 300, "rates": [200, 500]}'

A child process runs a uvloop event loop that reads one-byte messages from a socket pair and does a fixed
amount of pure-Python work for each (JSON encoding of small dicts, calibrated to ``work_us`` of CPU when run
hot); the parent sends the messages at each rate (open loop), then as fast as it can. The child's own CPU time
(``getrusage``) ÷ messages is the cost of one message at that rate. Nothing is stored, nothing batches: what
the rate changes is only how long the process slept before each message (cold caches, the wake-up itself).

This is the floor for one wake-up per message: the relay's "CPU per notification, 500/s ÷ saturated"
(``bench/run.py``) wakes several processes and threads per notification, and at saturation batches commits,
claims and TLS writes; what it shows above this ratio comes from those two.
The last stdout line is JSON: ``{"rates": {"500": µs, ...}, "saturated": µs, "ratio_500": x}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import sys
import time
from typing import Any

import uvloop

_ITEMS = [{"id": i, "text": str(i) * 5, "list": [1, 2, 3]} for i in range(10)]


def _work(rounds: int) -> int:
    total = 0
    for _ in range(rounds):
        for item in _ITEMS:
            total += len(json.dumps(item))
    return total


def _calibrate(work_us: float) -> int:
    """Rounds of ``_work`` that take ``work_us`` of CPU when hot."""
    _work(2000)
    started = time.process_time()
    _work(2000)
    per_round = (time.process_time() - started) / 2000
    return max(1, round(work_us / 1e6 / per_round))


def _serve(sock: socket.socket, rounds: int, out: socket.socket) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        count = 0
        sock.setblocking(False)

        def readable() -> None:
            nonlocal count
            try:
                while True:
                    for byte in sock.recv(4096):
                        if byte == ord("q"):
                            if not done.done():
                                done.set_result(None)
                            return
                        _work(rounds)
                        count += 1
            except BlockingIOError:
                pass

        loop.add_reader(sock.fileno(), readable)
        await done
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out.sendall(json.dumps({"count": count, "cpu": usage.ru_utime + usage.ru_stime}).encode())

    uvloop.run(main())


def _spawn(rounds: int) -> tuple[socket.socket, socket.socket, int]:
    """A child serving messages: (the socket to send them on, the socket its report comes back on, its pid)."""
    ours, theirs = socket.socketpair()
    report_r, report_w = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        report_r.close()
        _serve(theirs, rounds, report_w)
        os._exit(0)
    theirs.close()
    report_w.close()
    return ours, report_r, pid


def _finish(ours: socket.socket, report_r: socket.socket, pid: int) -> dict[str, Any]:
    ours.send(b"q")
    report = dict(json.loads(report_r.recv(4096)))
    os.waitpid(pid, 0)
    return report


def _one(rate: float, count: int, rounds: int) -> float:
    """µs of CPU per message in a fresh child, messages sent at ``rate``/s (0: back to back)."""
    ours, report_r, pid = _spawn(rounds)
    time.sleep(0.2)  # the child's loop is up; its start-up is not counted below (subtracted)
    started = time.monotonic()
    for n in range(count):
        if rate:
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        ours.send(b"x")
    report = _finish(ours, report_r, pid)
    # A child's start-up and exit alone (no messages) is subtracted.
    idle = _finish(*_spawn(rounds))["cpu"]
    return float(report["cpu"] - idle) * 1e6 / report["count"]


def measure(work_us: float = 300.0, rates: tuple[float, ...] = (200.0, 500.0), seconds: float = 4.0) -> dict[str, Any]:
    """The figures, as printed by :func:`main`."""
    rounds = _calibrate(work_us)
    result: dict[str, Any] = {"work_us": work_us, "rates": {}}
    for rate in rates:
        result["rates"][f"{rate:g}"] = _one(rate, int(rate * seconds), rounds)
    result["saturated"] = _one(0, int(2 * seconds * 1e6 / work_us), rounds)
    if "500" in result["rates"]:
        result["ratio_500"] = result["rates"]["500"] / result["saturated"]
    return result


def main() -> None:
    spec = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    result = measure(float(spec.get("work_us", 300.0)), tuple(float(r) for r in spec.get("rates", (200, 500))))
    for rate, cost in result["rates"].items():
        print(f"{result['work_us']:g} µs of Python work at {rate}/s: {cost:.0f} µs of CPU per message", file=sys.stderr)
    print(f"back to back: {result['saturated']:.0f} µs per message", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
