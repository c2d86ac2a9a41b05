"""Pruning must not stop the pushes (issue 18.3): a steady load across several prunes, SQLite, the defaults.

    python bench/prune_gap.py                      # 300/s for 200 s: four prunes (at start, then every 60 s)
    python bench/prune_gap.py --rate 300 --seconds 320 --keep-finished 3600

1. The store is put in the steady state that ``--rate`` and the default retention leave behind: ``rate ×
   keep_finished`` finished deliveries, finished evenly over the last ``keep_finished`` seconds, and ``rate ×
   dedupe_window`` dedupe keys expiring evenly over the next ``dedupe_window`` seconds (written straight
   into a file the relay's own code created, in one transaction: a real hour at 300/s would take an hour).
   So every prune of the run finds what it finds in production: the rows that crossed the cutoff since the
   last one, about ``rate × 60`` of each.
2. The relay starts on that file in its default process model (config at defaults but for the fakes and
   the registry: 1,000 iOS and 1,000 Android devices) and takes ``--rate`` webhooks/s, open loop, for
   ``--seconds``.
3. Every push's arrival at the fakes: the largest gap between two consecutive arrivals (the load alone
   leaves ~1/rate between them), how many gaps exceed 100 ms, webhook -> provider p50/p99/max over the run
   and the worst p99 of any 10-second window; the relay's CPU per notification (all its processes, from the
   load's start until the last push arrived: an everyday rate on a store as full as the retention keeps it);
   and, read from the file afterwards, how many of the prefilled rows and keys the prunes removed.

Target (issue 18): no gap between consecutive pushes above 100 ms across the prunes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import Fakes, Relay

GAP_LIMIT = 0.100  # seconds: the bound on the gap between two consecutive pushes
PRUNE_PERIOD = 60.0  # relay.delivery.upkeep.PRUNE_EVERY


def steady_state(path: Path, tokens: list[str], rate: float, keep_finished: float,
                 dedupe_window: float) -> tuple[int, int]:
    """Write the finished rows and dedupe keys a relay at ``rate`` keeps; returns (rows, keys)."""
    from relay.config import StoreSettings
    from relay.store.sqlite import SqliteStore

    async def create() -> None:  # the relay's own code creates and migrates the file
        store = SqliteStore(StoreSettings(backend="sqlite", path=path))
        await store.open()
        await store.close()

    asyncio.run(create())
    now = time.time()
    rows, keys = int(rate * keep_finished), int(rate * dedupe_window)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    batch: list[tuple[Any, ...]] = []
    for n in range(rows):
        finished = now - keep_finished + n / rate
        token = tokens[n % len(tokens)]
        batch.append((str(uuid.uuid4()), token, "message", b"", finished - 0.005, finished + 86400, "sent", 1,
                      finished, "200", finished, "android" if token in tokens[len(tokens) // 2:] else "ios",
                      uuid.uuid4().hex, f"m{n}"))
        if len(batch) == 20_000:
            _insert(conn, batch)
    _insert(conn, batch)
    conn.executemany("INSERT INTO dedupe (key, expires_at) VALUES (?, ?)",
                     ((os.urandom(16), now + n / rate) for n in range(keys)))
    conn.execute("COMMIT")
    conn.close()
    return rows, keys


def _insert(conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO deliveries (delivery_id, token, kind, data, received_at, expires_at, state, attempts, "
        "next_at, reason, finished_at, app, request_id, message_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch)
    batch.clear()


def left_over(path: Path, before: float) -> tuple[int, int]:
    """Prefilled rows (finished before ``before``) and keys (expiring before it) still in the file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT COUNT(*) FROM deliveries WHERE finished_at < ?", (before,)).fetchone()[0]
        keys = conn.execute("SELECT COUNT(*) FROM dedupe WHERE expires_at < ?", (before + 600,)).fetchone()[0]
    finally:
        conn.close()
    return int(rows), int(keys)


def pct(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300.0, help="webhooks per second, open loop")
    parser.add_argument("--seconds", type=float, default=200.0, help="seconds of load (a prune every 60 s)")
    parser.add_argument("--keep-finished", type=float, default=3600.0, help="the store's keep_finished (default)")
    parser.add_argument("--dedupe-window", type=float, default=600.0, help="webhook.dedupe_window (default)")
    args = parser.parse_args()
    ios, android = harness.ios_tokens(1000), harness.android_tokens(1000)
    with harness.scratch() as tmp:
        root = Path(tmp)
        path = root / "prune.db"
        started = time.monotonic()
        rows, keys = steady_state(path, ios + android, args.rate, args.keep_finished, args.dedupe_window)
        filled_at = time.time()
        print(f"steady state written: {rows:,} finished rows, {keys:,} dedupe keys, "
              f"{path.stat().st_size / 1e6:.0f} MB, in {time.monotonic() - started:.0f} s", flush=True)
        fakes = Fakes(root)
        try:
            base: dict[str, Any] = fakes.ask("config")
            registry = root / "devices.yaml"
            harness.write_registry(registry, ios, android)
            relay = Relay(root, base, "prune", None, registry=registry,
                          store={"backend": "sqlite", "path": str(path), "keep_finished": args.keep_finished},
                          webhook={"dedupe_window": args.dedupe_window}).wait_ready()
            mark = fakes.mark()
            try:
                cpu_before = relay.cpu()[0]
                load = harness.load(relay.url, ios + android, mode="open", rate=args.rate, connections=16,
                                    record_sends=True, duration=args.seconds, warmup=0)
                arrived = _arrivals(fakes, mark, len(load["sends"]))
                cpu = relay.cpu()[0] - cpu_before
                pauses = [(start, took) for start, took, _ in fakes.ask("pauses")]
            finally:
                relay.stop()
                # What the relay said about its prunes (a slow slice, or a large or long prune, is logged).
                for line in relay.log.read_text(errors="replace").splitlines():
                    if "prune" in line or "level=warning" in line.lower() or "level=error" in line.lower():
                        print("relay log:", line[:300])
        finally:
            fakes.close()
        rows_left, keys_left = left_over(path, filled_at)
    return report(args, load, arrived, (rows, keys), (rows_left, keys_left), pauses, cpu)


def _arrivals(fakes: Fakes, mark: dict[str, int], expected: int) -> dict[int, float]:
    deadline = time.monotonic() + 60
    while True:
        got = fakes.since(mark, ids=True)
        arrived = {int(i): t for p in ("apns", "fcm") for i, t in got[p]["ids"]}
        if len(arrived) >= expected or time.monotonic() > deadline:
            return arrived
        time.sleep(0.5)


def report(args: argparse.Namespace, load: dict[str, Any], arrived: dict[int, float],
           filled: tuple[int, int], left: tuple[int, int], pauses: list[tuple[float, float]], cpu: float) -> int:
    sent = {int(i): t for i, t in load["sends"]}
    times = sorted(arrived.values())
    gaps = sorted(((b - a, a - times[0]) for a, b in itertools.pairwise(times)), reverse=True)
    over = [g for g in gaps if g[0] > GAP_LIMIT]
    # A gap that holds a garbage collection of the fakes (every thread of theirs stopped) was not the relay's.
    fakes_stopped = [g for g in over if any(times[0] + g[1] <= start + took and start <= times[0] + g[1] + g[0]
                                            for start, took in pauses)]
    latencies = [(arrived[i] - t, t) for i, t in sent.items() if i in arrived]
    ordered = sorted(x for x, _ in latencies)
    start = min(sent.values())
    windows: dict[int, list[float]] = {}
    for lat, t in latencies:
        windows.setdefault(int((t - start) // 10), []).append(lat)
    worst = max(((pct(sorted(v), 99), k) for k, v in windows.items()), default=(0.0, 0))
    pruned_rows, pruned_keys = filled[0] - left[0], filled[1] - left[1]
    expected = args.rate * args.seconds
    print(f"load: {load['ok']:,} webhooks acknowledged at {args.rate:g}/s for {args.seconds:g} s "
          f"({len(arrived):,} pushes arrived, {len(sent) - len(latencies)} missing); "
          f"ack p99 {load['p99'] * 1000:.1f} ms; relay CPU (every process) {cpu * 1000 / max(1, load['ok']):.2f} ms "
          "per notification")
    print(f"prunes removed {pruned_rows:,} prefilled finished rows and {pruned_keys:,} dedupe keys "
          f"(steady state at this rate: about {expected:,.0f} each over the run)")
    print("largest gaps between consecutive pushes: "
          + ", ".join(f"{g * 1000:.1f} ms at {at:.0f} s" for g, at in gaps[:5]))
    print(f"gaps above {GAP_LIMIT * 1000:.0f} ms: {len(over)}, {len(fakes_stopped)} of them while the fakes' "
          f"garbage collector ran (their collections of 10 ms or more: {len(pauses)}, longest "
          f"{max((took for _, took in pauses), default=0) * 1000:.0f} ms)")
    print(f"webhook -> provider: p50 {pct(ordered, 50) * 1000:.1f} ms, p99 {pct(ordered, 99) * 1000:.1f} ms, "
          f"max {ordered[-1] * 1000 if ordered else 0:.1f} ms; worst 10-s window p99 {worst[0] * 1000:.1f} ms "
          f"(at {worst[1] * 10} s)")
    ok = not over and len(latencies) == len(sent) and pruned_rows > 0
    print(f"target: no gap above {GAP_LIMIT * 1000:.0f} ms across the prunes: {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
