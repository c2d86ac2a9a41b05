"""Scale-out on Redis (SPEC §7): several real relay processes share one queue, and nothing acknowledged is lost
when one of them is killed or when Redis itself restarts.

The instance test uses the Redis at ``REDIS_URL`` (a key prefix of its own); the restart test starts a
private ``redis-server`` (AOF ``appendfsync always``) in ``tmp_path``, never touching the shared one.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from relay.config import StoreSettings
from relay.store import create_store
from relay.testing.fleet import Fleet, RedisServer, device_tokens, send_load, wait_delivered
from relay.testing.process import relay_command
from relay.testing.sandbox import Sandbox
from tests.conftest import REDIS_URL, redis_unavailable

CLAIM_IDLE = 2.0


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    """The fakes, with 16 iOS and 16 Android devices in the registry."""
    sandbox = Sandbox.start(tmp_path / "sandbox")
    sandbox.devices = device_tokens(16, 16)
    try:
        yield sandbox
    finally:
        sandbox.stop()


def _pending_of(url: str, prefix: str, consumer_prefix: str | tuple[str, ...]) -> int:
    """Entries a consumer (one relay process) still holds in the pending lists of every app's stream."""
    client = redis.Redis.from_url(url)
    try:
        apps = {member.decode() for member in client.smembers(f"{prefix}:apps")} | {""}
        held = 0
        for app in apps:
            stream = f"{prefix}:stream:{app}" if app else f"{prefix}:stream"
            if not client.exists(stream):
                continue
            summary = client.xpending(stream, "relay")
            held += sum(c["pending"] for c in summary["consumers"] if c["name"].decode().startswith(consumer_prefix))
        return held
    finally:
        client.close()


async def test_three_instances_lose_nothing_when_one_is_killed(box: Sandbox) -> None:
    """Webhooks spread over 3 processes, one SIGKILLed mid-run: every acknowledged notification is delivered
    (duplicates counted), per-device order holds, and the survivors take over its work within claim_idle."""
    if reason := redis_unavailable():
        pytest.skip(reason)
    prefix = f"test-fleet-{uuid.uuid4().hex[:8]}"
    box.apns.set_delay(0.03)  # sends take a moment, so the victim dies with work in flight
    box.fcm.set_delay(0.03)
    fleet = await Fleet(box, REDIS_URL, prefix, claim_idle=CLAIM_IDLE).start(3)
    victim = fleet.relays[0]
    killed_at: list[float] = []
    held_at_kill: list[int] = []
    taken_over: list[float] = []

    async def watch_takeover() -> None:
        while _pending_of(REDIS_URL, prefix, victim.consumer_prefix):
            await asyncio.sleep(0.05)
        taken_over.append(time.monotonic() - killed_at[0])

    def on_ack(acked: int) -> None:
        # Mid-run, at a moment when the victim holds deliveries in flight.
        if acked >= 150 and not killed_at and _pending_of(REDIS_URL, prefix, victim.consumer_prefix):
            fleet.kill(0)
            killed_at.append(time.monotonic())
            held_at_kill.append(_pending_of(REDIS_URL, prefix, victim.consumer_prefix))
            watchers.append(asyncio.get_running_loop().create_task(watch_takeover()))

    watchers: list[asyncio.Task[None]] = []

    try:
        live = lambda: [r.url for r in fleet.relays if r.process.returncode is None]  # noqa: E731
        load = await send_load(live, sorted(box.devices), 15, on_ack=on_ack)
        figures = await wait_delivered(load, box, timeout=CLAIM_IDLE + 15)
        assert killed_at, "the victim never held work mid-run, so it was not killed"
        await asyncio.wait_for(watchers[0], timeout=CLAIM_IDLE + 5)
        print(f"\nmulti-instance: {figures}; victim held {held_at_kill[0]} in flight at the kill, all taken over "
              f"after {taken_over[0]:.1f}s (claim_idle {CLAIM_IDLE}s); answers {dict(load.statuses)}")
        assert figures.accepted == 32 * 15
        assert figures.lost == 0, figures
        assert figures.out_of_order == 0, figures
        assert held_at_kill[0] > 0, "the victim held no work when it was killed: the test proved nothing"
        assert taken_over[0] < CLAIM_IDLE + 2.0  # the idle time, plus a dispatcher poll and a send
        assert fleet.alive(1) and fleet.alive(2)
    finally:
        codes = fleet.stop()
        _delete_prefix(REDIS_URL, prefix)
    assert codes[1:] == [0, 0]


async def test_operator_commands_mid_run_take_nothing_from_the_live_instances(box: Sandbox) -> None:
    """Default settings: ``parley-relay stats`` and ``dead-letters list`` run (separate processes opening the
    same Redis, as an operator would) while two relays hold deliveries in flight, and a store opened the same
    way reads the deliveries: nothing is taken over, nothing is sent twice or lost, nothing counts as
    redelivered, and the books balance."""
    if reason := redis_unavailable():
        pytest.skip(reason)
    prefix = f"test-fleet-{uuid.uuid4().hex[:8]}"
    box.apns.set_delay(0.03)
    box.fcm.set_delay(0.03)
    fleet = await Fleet(box, REDIS_URL, prefix, claim_idle=StoreSettings.claim_idle).start(2)
    config = str(box.root / "relay-0.yaml")
    settings = StoreSettings(backend="redis", url=REDIS_URL, prefix=prefix)
    runs: list[tuple[int, int]] = []  # (entries in flight when it ran, exit code of stats)
    done = asyncio.Event()

    async def operator() -> None:
        reader = create_store(settings)
        await reader.open()
        try:
            while not done.is_set():
                held = _pending_of(REDIS_URL, prefix, "")
                if held:
                    stats = await asyncio.create_subprocess_exec(*relay_command(), "stats", "--json", "--config",
                                                                 config, stdout=asyncio.subprocess.PIPE)
                    out, _ = await stats.communicate()
                    letters = await asyncio.create_subprocess_exec(*relay_command(), "dead-letters", "list",
                                                                   "--config", config,
                                                                   stdout=asyncio.subprocess.DEVNULL)
                    await letters.wait()
                    assert json.loads(out)["balanced"] is True
                    await reader.deliveries(token=sorted(box.devices)[0])
                    await reader.deliveries()
                    runs.append((held, stats.returncode or 0))
                await asyncio.sleep(0.05)
        finally:
            await reader.close()

    watcher = asyncio.get_running_loop().create_task(operator())
    try:
        load = await send_load(lambda: fleet.urls, sorted(box.devices), 20)
        figures = await wait_delivered(load, box, timeout=30)
        done.set()
        await watcher
        print(f"\noperator commands mid-run: {figures}; {len(runs)} rounds while relays held "
              f"{[held for held, _ in runs]} in flight")
        assert runs and all(code == 0 for _, code in runs)
        assert figures.accepted == 32 * 20
        assert (figures.lost, figures.duplicated, figures.out_of_order) == (0, 0, 0), figures
        store = create_store(settings)
        await store.open()
        try:
            stats = await store.stats()
        finally:
            await store.close()
        assert (stats.redelivered, stats.accepted) == (0, 32 * 20) and stats.balanced
    finally:
        done.set()
        await asyncio.gather(watcher, return_exceptions=True)
        codes = fleet.stop()
        _delete_prefix(REDIS_URL, prefix)
    assert codes == [0, 0]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
async def test_redis_restart_answers_503_then_resumes_without_losing_anything(box: Sandbox, tmp_path: Path) -> None:
    """Redis (AOF appendfsync always) killed and restarted mid-run: relays stay up, webhooks get 503 while it
    is down (Parley retries), deliveries pause and resume, and no acknowledged notification is lost."""
    server = RedisServer(tmp_path / "redis").start()
    fleet = await Fleet(box, server.url, "relay", claim_idle=CLAIM_IDLE).start(2)

    acked = [0]

    async def outage() -> None:
        while acked[0] < 120:
            await asyncio.sleep(0.01)
        server.kill()
        await asyncio.sleep(1.5)
        server.start()

    def on_ack(count: int) -> None:
        acked[0] = count

    try:
        outage_task = asyncio.get_running_loop().create_task(outage())
        load = await send_load(lambda: fleet.urls, sorted(box.devices), 10, on_ack=on_ack)
        await outage_task
        figures = await wait_delivered(load, box, timeout=CLAIM_IDLE + 15)
        print(f"\nredis restart: {figures}; answers {dict(load.statuses)}")
        assert load.statuses[503] > 0, "no webhook arrived while Redis was down"
        assert figures.accepted == 32 * 10
        assert figures.lost == 0, figures
        assert figures.out_of_order == 0, figures
        assert fleet.alive(0) and fleet.alive(1), "a relay died with Redis"
    finally:
        codes = fleet.stop()
        server.kill()
    assert codes == [0, 0]


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
    finally:
        client.close()
