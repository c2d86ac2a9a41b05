"""How long a claim holds SQLite's write lock while another thread of the process runs Python.

    python bench/claim_lock.py                        # 100-row claims; idle, then a CPU-bound second thread
    python bench/claim_lock.py '{"limit": 256, "switch_ms": [5, 0.5]}'

A delivery process claims on its store thread while its event loop's thread runs the sends. Python's sqlite3
module releases the interpreter lock around every SQLite step (each row a ``RETURNING`` or ``SELECT`` hands
back is one), and taking it back waits up to the switch interval (5 ms by default) when the other thread is
busy: inside the claim's transaction, so the webhooks' commits wait behind it. This prefills 20,000 deliveries
over 2,000 tokens through the relay's store, then times claims made with the relay's own code
(``claim_heads`` and ``claimed_jobs``: every statement one SQLite step, a JSON aggregate), the write lock held
from ``BEGIN IMMEDIATE`` to ``COMMIT``, against the claim as it was before (every row fetched on its own step:
the apps, each app's due heads, and the taken rows from ``UPDATE ... RETURNING``), kept here for comparison.
The second thread is idle or runs pure Python without a pause (the worst case: the relay's loop thread also
waits in ``epoll`` and system calls, which hand the interpreter lock over at once).
The last stdout line is JSON: ``{"<switch>, <thread>, <claim>": [{"claims": .., "held_p50_ms": ..,
"held_max_ms": .., "whole_p50_ms": ..}, ...one per round]}``.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import prefill, scratch

from relay.store._sqlite_claims import DATA, claimed_rows, jobs_of
from relay.store._sqlite_heads import _APPS, claim_heads

# The claim before: the same choice, each row its own step.
_APPS_ROWS = _APPS.replace("SELECT json_group_array(app) FROM apps", "SELECT app FROM apps")
_DUE_ROWS = """SELECT id, next_at FROM deliveries INDEXED BY deliveries_heads
    WHERE head = 1 AND state = 'pending' AND app {match} AND next_at <= :now ORDER BY next_at, id LIMIT :take"""
_TAKE_RETURNING = f"""UPDATE deliveries SET state = 'inflight', owner = :owner, lease_until = :lease, wait_reason = NULL
    WHERE id IN (SELECT value FROM json_each(:ids)) AND head = 1 AND state = 'pending'
    RETURNING id, delivery_id, token, kind, {DATA}, received_at, expires_at, attempts, app, request_id, message_id"""


def _claim_row_by_row(conn: sqlite3.Connection, limit: int, now: float, lease: float) -> list[Any]:
    """``claim_heads``'s choice (each app's earliest due heads, fair by rank), each row fetched on its own step."""
    ranked: list[tuple[int, float, int]] = []
    for app in [None, *(row[0] for row in conn.execute(_APPS_ROWS))]:
        query = _DUE_ROWS.format(match="IS NULL" if app is None else "= :app")
        rows = conn.execute(query, {"now": now, "take": limit, "app": app}).fetchall()
        ranked += [(rank, next_at, row_id) for rank, (row_id, next_at) in enumerate(rows)]
    ids = "[" + ",".join(str(row_id) for _, _, row_id in sorted(ranked)[:limit]) + "]"
    return conn.execute(_TAKE_RETURNING, {"owner": "bench", "lease": lease, "ids": ids}).fetchall()


def _claims(db: Path, limit: int, one_step: bool) -> tuple[list[float], list[float]]:
    """Claim until nothing is left; per claim the ms the write lock was held and the ms the claim took."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    now = time.time() + 10**6  # every delivery is due
    held: list[float] = []
    whole: list[float] = []
    try:
        while True:
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            if one_step:
                ids = claim_heads(conn, limit=limit, now=now, lease_until=now + 60, owner="bench", app_limits=None)
                rows = claimed_rows(conn, ids) if ids else "[]"
                conn.execute("COMMIT")
                released = time.perf_counter()
                jobs = jobs_of(rows)
            else:
                jobs = _claim_row_by_row(conn, limit, now, now + 60)
                conn.execute("COMMIT")
                released = time.perf_counter()
            if not jobs:
                return held, whole
            held.append((released - start) * 1000)
            whole.append((time.perf_counter() - start) * 1000)
    finally:
        conn.close()


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        total = 0
        for i in range(20_000):  # pure Python: the interpreter lock is only given up when asked for
            total += i


def measure(source: Path, work: Path, limit: int, busy: bool, one_step: bool) -> dict[str, float]:
    """One pass over a fresh copy of the prefilled file."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{work}{suffix}").unlink(missing_ok=True)
        if Path(f"{source}{suffix}").exists():
            shutil.copy(f"{source}{suffix}", f"{work}{suffix}")
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,)) if busy else None
    if spinner is not None:
        spinner.start()
        time.sleep(0.05)
    timings: list[tuple[list[float], list[float]]] = []
    claimer = threading.Thread(target=lambda: timings.append(_claims(work, limit, one_step)))  # the store thread
    claimer.start()
    claimer.join()
    stop.set()
    if spinner is not None:
        spinner.join()
    held, whole = timings[0]
    return {"claims": len(held), "held_p50_ms": round(statistics.median(held), 2),
            "held_max_ms": round(max(held), 2), "whole_p50_ms": round(statistics.median(whole), 2)}


def main() -> None:
    spec: dict[str, Any] = {"limit": 100, "switch_ms": [5, 0.5, 0.1], "rounds": 2,
                            **(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})}
    figures: dict[str, list[dict[str, float]]] = {}
    with scratch() as tmp:
        source, work = Path(tmp) / "prefilled.db", Path(tmp) / "work.db"
        prefill(source, [f"{i:064x}" for i in range(2000)], 20_000)
        for switch_ms in spec["switch_ms"]:
            sys.setswitchinterval(switch_ms / 1000)
            for busy in (False, True):
                for _ in range(spec["rounds"]):  # alternating, so a slower minute hits both alike
                    for one_step in (False, True):
                        key = (f"switch {switch_ms} ms, {'busy' if busy else 'idle'} thread, "
                               f"{'relay (one step per statement)' if one_step else 'before (row by row)'}")
                        got = measure(source, work, spec["limit"], busy, one_step)
                        figures.setdefault(key, []).append(got)
                        print(f"{key}: {got['claims']} claims of {spec['limit']}, lock held p50 "
                              f"{got['held_p50_ms']} ms (max {got['held_max_ms']}), whole claim p50 "
                              f"{got['whole_p50_ms']} ms", flush=True)
        sys.setswitchinterval(0.005)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
