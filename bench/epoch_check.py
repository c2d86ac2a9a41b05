"""Claim rounds with and without the device-epoch check (OverlaySync.refresh after each claim), same run.

Store level, no providers: enqueue, then claim ``LIMIT`` at a time and finish each, alternating trials with
and without the check, on SQLite and on the Redis at ``REDIS_URL``. Prints deliveries/s (median of the
trials) and the cost of one ``device_epoch()`` read. ``python bench/epoch_check.py``
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import redis

from relay.config import StoreSettings, load_config
from relay.outcome import EndState
from relay.registry.file import load_registry
from relay.registry.routing import Registry
from relay.registry.sync import OverlaySync
from relay.store import create_store
from relay.store.base import NewDelivery
from relay.testing.sandbox import Sandbox

LIMIT = 32
ROUNDS = 300  # claim rounds per trial
TRIALS = 10  # alternating: even trials check the epoch, odd ones do not


async def _trials(settings: StoreSettings, registry: Registry) -> tuple[dict[bool, list[float]], float]:
    store = create_store(settings)
    await store.open()
    await store.recover(time.time())
    sync = OverlaySync(store, registry)
    await sync.load()
    rates: dict[bool, list[float]] = {True: [], False: []}
    try:
        for trial in range(TRIALS):
            check, n, now = trial % 2 == 0, ROUNDS * LIMIT, time.time()
            items = [NewDelivery(f"tok{uuid.uuid4().hex}", "message", b"{}", uuid.uuid4().hex, now + 3600)
                     for _ in range(n)]
            for i in range(0, n, 500):
                await store.enqueue(items[i:i + 500], now, 0)
            started, done = time.perf_counter(), 0
            while done < n:
                jobs = await store.claim(LIMIT, time.time(), 300)
                if check and jobs:
                    await sync.refresh()
                await asyncio.gather(*(store.finish(job, EndState.SENT, "", time.time()) for job in jobs))
                done += len(jobs)
            rates[check].append(n / (time.perf_counter() - started))
        started = time.perf_counter()
        for _ in range(2000):
            await store.device_epoch()
        return rates, (time.perf_counter() - started) / 2000
    finally:
        await store.close()
        if settings.backend == "redis":  # leave nothing behind in the shared Redis
            client = redis.Redis.from_url(settings.url)
            for key in client.scan_iter(match=f"{settings.prefix}:*", count=1000):
                client.delete(key)
            client.close()


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="epoch-bench-"))
    box = Sandbox.start(root / "sandbox")
    try:
        config = load_config(box.write())
        registry = Registry(config.apps, load_registry(config.registry, config.apps))
        url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
        for name, settings in (
            ("sqlite", StoreSettings(backend="sqlite", path=root / "bench.db")),
            ("redis", StoreSettings(backend="redis", url=url, prefix=f"bench-epoch-{uuid.uuid4().hex[:8]}")),
        ):
            rates, read = await _trials(settings, registry)
            with_check, without = statistics.median(rates[True]), statistics.median(rates[False])
            print(f"{name}: {with_check:,.0f}/s with the epoch check, {without:,.0f}/s without "
                  f"(ratio {with_check / without:.3f}); device_epoch() {read * 1e6:.0f} us")
    finally:
        box.stop()


if __name__ == "__main__":
    asyncio.run(main())
