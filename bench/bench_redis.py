"""Benchmark: the same webhook load on one relay process vs three, all on one Redis store.

    python bench/bench_redis.py [--tokens 64] [--per-token 40] [--redis redis://127.0.0.1:6379/15]

Each run starts real ``parley-relay serve`` processes (Redis backend, their own key prefix) against the
local fake APNs and FCM, posts ``tokens x per-token`` Parley messages (one at a time per device, all devices
at once, spread round-robin over the instances), and waits until the fakes received every one. It prints
webhook throughput and acknowledgement latency percentiles, end-to-end throughput, and the books
(accepted / delivered / duplicated / lost). On a 2-core machine the point is correctness and the absence
of a bottleneck in the Redis path, not linear scaling: three processes share the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import redis

from relay.testing.fleet import Fleet, device_tokens, environment_note, percentiles, send_load, wait_delivered
from relay.testing.sandbox import Sandbox


async def run(instances: int, tokens: int, per_token: int, redis_url: str, sqlite: bool = False) -> None:
    """One measured run on ``instances`` relay processes (Redis store, or SQLite as a baseline)."""
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        box = await asyncio.to_thread(Sandbox.start, Path(tmp))
        box.devices = device_tokens(tokens // 2, tokens - tokens // 2)
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        store = {"backend": "sqlite", "path": str(Path(tmp) / "relay.db")} if sqlite else None
        fleet = await Fleet(box, redis_url, prefix, store=store).start(instances)
        busy_before = _redis_busy(redis_url)
        try:
            started = time.monotonic()
            load = await send_load(lambda: fleet.urls, sorted(box.devices), per_token, give_up_after=600)
            figures = await wait_delivered(load, box, timeout=120)
            total = time.monotonic() - started
            busy = _redis_busy(redis_url) - busy_before
        finally:
            fleet.stop()
            _delete_prefix(redis_url, prefix)
            await asyncio.to_thread(box.stop)
    ack = percentiles(load.latencies)
    label = "sqlite, 1 instance" if sqlite else f"redis, {instances} instance(s)"
    print(f"{label}: {len(load.acked)} webhooks in {load.elapsed:.2f}s = "
          f"{len(load.acked) / load.elapsed:.0f}/s acknowledged; all delivered after {total:.2f}s = "
          f"{figures.delivered / total:.0f}/s end to end")
    print(f"    ack latency ms: p50 {ack[50] * 1000:.1f}  p90 {ack[90] * 1000:.1f}  p99 {ack[99] * 1000:.1f}")
    print(f"    books: {figures}; answers {dict(load.statuses)}")
    if not sqlite:
        print(f"    redis busy {busy:.2f}s of {total:.2f}s ({busy / total:.1%}): the Redis path is not the bottleneck"
              if busy / total < 0.5 else f"    redis busy {busy:.2f}s of {total:.2f}s ({busy / total:.1%})")


def _redis_busy(url: str) -> float:
    """Seconds Redis spent executing commands so far (all clients; INFO commandstats)."""
    client = redis.Redis.from_url(url)
    stats = client.info("commandstats")
    client.close()
    return sum(float(entry["usec"]) for entry in stats.values()) / 1e6


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="devices (half iOS, half Android)")
    parser.add_argument("--per-token", type=int, default=40, help="messages per device")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="Redis URL (keys get their own prefix)")
    parser.add_argument("--sqlite-baseline", action="store_true", help="first run one instance on SQLite")
    args = parser.parse_args()
    print(f"load: {args.tokens} devices x {args.per_token} messages; {environment_note()}")
    if args.sqlite_baseline:
        asyncio.run(run(1, args.tokens, args.per_token, args.redis, sqlite=True))
    for instances in (1, 3):
        asyncio.run(run(instances, args.tokens, args.per_token, args.redis))


if __name__ == "__main__":
    main()
