"""SQLite store file size at a steady delivery rate: does it stop growing once the retention window is full?

    python bench/store_growth.py                       # 300 deliveries/s, keep_finished 120 s (simulated)
    python bench/store_growth.py --rate 300 --keep 240 --windows 5

Drives the relay's own SqliteStore with a simulated clock (the store only knows the ``now`` it is given), so
hours of traffic take a minute: every simulated second ``rate`` webhooks are accepted (each its own enqueue, so
group commit batches them as under real load), claimed and recorded as sent; ``prune`` runs every 10 simulated
seconds, as the running relay's timer does. The retention window is shortened here only (``--keep``, default
120 s instead of the 3600 s default); the dedupe window keeps its default proportion (600/3600 of it).

Prints the file sizes (database, WAL) over time, then BYTES PER DELIVERY AT STEADY STATE: the database size once
the window is full divided by the deliveries it holds (rate x keep), and its growth over the last window. The WAL
is apart: its size follows the checkpoints (about 4 MiB of pages, cut back to 64 MiB at most), not the window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.config import StoreSettings
from relay.outcome import EndState
from relay.store.base import NewDelivery
from relay.store.sqlite import SqliteStore

DEVICES = 2000
START = 1_700_000_000.0
PRUNE_EVERY = 10.0  # simulated seconds between prunes


def payload(n: int) -> bytes:
    """Canonical JSON of a typical Parley message notification (about 330 bytes)."""
    return json.dumps({
        "type": "message", "id": 10_000_000 + n, "conversation": {"id": 4242, "title": "Release planning"},
        "sender": {"id": 17, "name": "Ada Lovelace"}, "message": f"Message number {n}: see you at the standup?",
        "sent_at": "2026-12-02T05:41:10Z", "badge": 3,
    }, separators=(",", ":"), sort_keys=True).encode()


def file_bytes(path: Path) -> tuple[int, int]:
    """Sizes of the database file and its WAL, as the filesystem has them."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0


async def run(rate: int, keep: float, windows: int, root: Path) -> None:
    path = root / "relay.db"
    dedupe = keep * 600 / 3600
    store = SqliteStore(StoreSettings(path=path, keep_finished=keep))
    await store.open()
    tokens = [f"{n:064x}" for n in range(1, DEVICES + 1)]
    total_seconds = int(keep * windows)
    report_every = max(1, int(keep / 4))
    samples: list[tuple[int, int, int, int]] = []  # (simulated second, deliveries so far, db bytes, wal bytes)
    print(f"rate {rate}/s, keep_finished {keep:.0f} s, dedupe window {dedupe:.0f} s, {windows} windows "
          f"({total_seconds} simulated s, {rate * total_seconds:,} deliveries)")
    print(f"{'sim s':>6} {'deliveries':>11} {'db MB':>8} {'wal MB':>7} {'pages':>8} {'free':>6} {'pruned':>8}")
    started, n, pruned = time.perf_counter(), 0, 0
    for second in range(1, total_seconds + 1):
        now = START + second

        async def accept(i: int, now: float = now) -> None:
            # The webhook's own dedupe key for a message (relay.inbound.parse.dedupe_key): id and push token.
            item = NewDelivery(tokens[i % DEVICES], "message", payload(i), f"m:{10_000_000 + i}:{tokens[i % DEVICES]}",
                               now + 86400,
                               app="ios", request_id=uuid.uuid4().hex, message_id=str(10_000_000 + i))
            await store.enqueue([item], now, dedupe)

        await asyncio.gather(*(accept(i) for i in range(n, n + rate)))
        n += rate
        while jobs := await store.claim(512, now, 300):
            await asyncio.gather(*(store.finish(job, EndState.SENT, "", now) for job in jobs))
        if second % PRUNE_EVERY == 0:
            while True:  # slice after slice, as the relay's upkeep does
                step = await store.prune(now)
                pruned += step.removed
                if not step.more:
                    break
        if second % report_every == 0:
            db, wal = file_bytes(path)
            with closing(sqlite3.connect(path)) as conn:
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            samples.append((second, n, db, wal))
            print(f"{second:>6} {n:>11,} {db / 1e6:>8.2f} {wal / 1e6:>7.2f} {pages:>8} {free:>6} {pruned:>8,}")
    stats = await store.stats()
    await store.close()
    full = [s for s in samples if s[0] >= keep + dedupe]  # the window (and the dedupe window) is full
    held = rate * keep
    last = [s for s in samples if s[0] >= total_seconds - keep]
    print(f"\nwall time {time.perf_counter() - started:.1f} s; sent {stats.ended[EndState.SENT]:,}; "
          f"balanced {stats.balanced}")
    if full and last:
        steady_db = max(db for _, _, db, _ in full)
        steady_wal = max(wal for _, _, _, wal in full)
        growth = (last[-1][2] - last[0][2]) / max(1, last[-1][1] - last[0][1])
        print(f"BYTES PER DELIVERY AT STEADY STATE: {steady_db / held:,.0f} B per retained delivery "
              f"(database file {steady_db / 1e6:.1f} MB holding {held:,.0f} finished deliveries and their dedupe "
              f"keys; WAL {steady_wal / 1e6:.1f} MB on top, whatever the window)")
        print(f"database growth over the last window: {growth:+.1f} B per new delivery")
        print(f"at the defaults (keep_finished 3600 s, dedupe 600 s) and {rate}/s: about "
              f"{steady_db / held * rate * 3600 / 1e6:,.0f} MB + WAL, flat")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=300, help="deliveries per simulated second")
    parser.add_argument("--keep", type=float, default=120.0, help="keep_finished, simulated seconds")
    parser.add_argument("--windows", type=int, default=4, help="how many retention windows to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        asyncio.run(run(args.rate, args.keep, args.windows, Path(root)))


if __name__ == "__main__":
    main()
