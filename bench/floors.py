"""What the parts every notification passes through cost on their own, per item, at 500/s and saturated.

Issue 18 asks for a notification's CPU at 500/s to be at most 1.5 x its CPU at saturation. The relay receives
each webhook with aiohttp, stores it durably in SQLite, and sends each APNs push with aioapns; this measures
those three alone, with no relay code, at the rates of ``bench/run.py``'s CPU rows:

* ``http``: ``bench/bare_server.py`` (a handler that reads the body and answers 200), CPU of its process per
  request, under ``bench/loadgen.py`` at each rate (open loop) and as a closed loop of 64;
* ``apns``: ``bench/ceilings.py`` (a plain aioapns pool against the fake APNs), CPU of that process per push,
  pushes started at each rate (open loop) and all at once (100 in flight);
* ``durable``: one ~1 KB row inserted into a WAL-mode SQLite file with ``synchronous=FULL``, committed (an
  fsync) alone at each rate, or 64 rows to a commit back to back (a group commit under load); CPU of the
  thread that does it.

Each ratio (500/s ÷ saturated) is what one item per wake-up, with nothing to batch, costs that part on this
machine (``bench/wakeup_floor.py`` shows it for a few hundred µs of tight Python: about 1.1). Their sum at
500/s is what a relay made of them pays before any logic of its own: parsing, the registry, claims, outcomes,
the hand-off between processes.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import harness

RATES = (500.0, 0.0)  # 0: saturated


def http(tokens: Sequence[str], seconds: float, rates: Sequence[float] = RATES) -> dict[float, float]:
    """µs of CPU per request of the bare aiohttp handler at each rate (0: a closed loop of 64)."""
    out: dict[float, float] = {}
    with harness.bare_server() as (url, pid):
        for rate in rates:
            spec: dict[str, Any] = {"mode": "open", "rate": rate} if rate else {"mode": "closed"}
            before = harness.cpu_seconds(pid)
            result = harness.load(url, tokens, connections=64, warmup=0, duration=seconds, **spec)
            out[rate] = (harness.cpu_seconds(pid) - before) * 1e6 / max(1, int(result["ok"]))
    return out


def apns(spec: Mapping[str, Any], seconds: float, rates: Sequence[float] = RATES) -> dict[float, float]:
    """µs of CPU per push of a bare aioapns pool (``bench/ceilings.py``) at each rate (0: 100 in flight)."""
    out: dict[float, float] = {}
    for rate in rates:
        count = int(rate * seconds) if rate else 20_000
        result = harness.run_json("ceilings.py", {**spec, "count": count, "rate": rate})
        out[rate] = result["cpu"] * 1e6 / max(1, int(result["sent"]))
    return out


def durable(seconds: float, where: Path, rates: Sequence[float] = RATES, batch: int = 64) -> dict[float, float]:
    """µs of CPU per row: one row a transaction at each rate, ``batch`` rows a transaction back to back (0), in a
    file under ``where`` (the relays' store directory: the same file system)."""
    out: dict[float, float] = {}
    row = os.urandom(512).hex()
    with tempfile.TemporaryDirectory(prefix="floor-", dir=where) as tmp:
        conn = sqlite3.connect(os.path.join(tmp, "floor.db"), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, token TEXT, data TEXT)")
        conn.execute("CREATE INDEX items_token ON items (token)")
        for rate in rates:
            count = int(rate * seconds) if rate else 20_000
            per_commit = batch if not rate else 1
            started, cpu = time.monotonic(), time.thread_time()
            for n in range(0, count, per_commit):
                if rate:
                    delay = started + n / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO items (token, data) VALUES (?, ?)",
                                 ((f"token-{(n + i) % 1000}", row) for i in range(per_commit)))
                conn.execute("COMMIT")
            out[rate] = (time.thread_time() - cpu) * 1e6 / count
        conn.close()
    return out

