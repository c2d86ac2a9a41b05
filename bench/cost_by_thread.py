"""Where a notification's cost goes, process by process and thread by thread, at an everyday rate and saturated.

    python bench/cost_by_thread.py                      # APNs webhooks at 500/s, then a closed loop of 64
    python bench/cost_by_thread.py --rates 200,500,0 --seconds 8    # 0: the closed loop

For each load on a fresh relay at defaults (SQLite, the multi-process default), read from ``/proc`` before and
after: every thread's CPU time (the event loop's thread is the process's own id; the others are the store
thread and, briefly, helpers), the bytes and ``write`` calls the process made (``/proc/PID/io``: sockets and
files alike; SQLite writes each WAL frame as two calls, its header and its page) and its context switches, each
divided by the webhooks acknowledged. The CPU ratio ``bench/run.py`` reports (500/s ÷ saturated) is the sum of
these; this shows which thread, and how much of it is writing, makes the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import cpu_seconds
from run import Suite


def _threads(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (threads that ended are not counted)."""
    return {int(tid): cpu_seconds(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def _io(pid: int) -> tuple[int, int]:
    """(bytes written, write calls) of ``pid`` so far."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["wchar"]), int(fields["syscw"])


def _switches(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def _sample(pids: dict[str, int]) -> dict[str, tuple[dict[int, float], tuple[int, int], int]]:
    return {name: (_threads(pid), _io(pid), _switches(pid)) for name, pid in pids.items()}


def measure(suite: Suite, rate: float) -> list[str]:
    """One load at ``rate`` webhooks/s (0: a closed loop of 64) on a fresh relay; one line per thread."""
    relay = suite.relay(f"cost-{int(rate)}")
    try:
        pids = {name: pid for name, pid in relay.pids().items() if name != "main"}
        time.sleep(1.0)  # start-up work done
        before = _sample(pids)
        if rate:
            result = suite.load(relay.url, suite.ios, mode="open", rate=rate, connections=64, warmup=0)
        else:
            result = suite.load(relay.url, suite.ios, mode="closed", connections=64, warmup=0)
        after = _sample(pids)
    finally:
        relay.stop()
    count = max(1, int(result["ok"]))
    label = f"{rate:,.0f}/s" if rate else f"saturated ({result['rps']:,.0f}/s)"
    lines = [f"{label}: {count:,} webhooks acknowledged"]
    total = 0.0
    for name, pid in pids.items():
        (threads0, io0, switches0), (threads1, io1, switches1) = before[name], after[name]
        for tid, cpu in sorted(threads1.items()):
            used = (cpu - threads0.get(tid, 0.0)) * 1e6 / count
            total += used
            if used >= 1:
                role = "loop thread" if tid == pid else "other thread"
                lines.append(f"  {name:11s} {role:13s} {used:6.0f} µs CPU")
        lines.append(f"  {name:11s} writes        {(io1[0] - io0[0]) / count / 1024:6.1f} KiB in "
                     f"{(io1[1] - io0[1]) / count:.1f} calls, {(switches1 - switches0) / count:.1f} context switches")
    lines.append(f"  total CPU per notification: {total:,.0f} µs")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="500,0", help="webhooks/s per load, comma-separated; 0: closed loop")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with harness.scratch() as tmp:
        suite = Suite(Path(tmp), args.seconds)
        for rate in (float(r) for r in args.rates.split(",")):
            print("\n".join(measure(suite, rate)), flush=True)


if __name__ == "__main__":
    main()
