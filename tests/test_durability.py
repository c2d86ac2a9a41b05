"""Acknowledged means stored: kill -9 right after acknowledgements, restart, and every notification arrives."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp

from relay.cli import main as cli_main
from relay.config import load_config
from relay.outcome import EndState
from relay.store import create_store
from relay.testing.process import RelayProcess, free_port
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE, Sandbox, sample


def start_relay(config: Path, log: Path) -> RelayProcess:
    """`parley-relay serve` as a real process (the same entry point systemd runs), through the one launcher."""
    return RelayProcess(config, log=log, env={"PYTHONUNBUFFERED": "1"})


async def wait_ready(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("relay did not become ready")


async def test_sigkill_after_acknowledgements_loses_nothing(sandbox: Sandbox, tmp_path: Path) -> None:
    """Webhooks acknowledged just before kill -9 (providers hung, so none was sent) are all delivered after restart."""
    port = free_port()
    tokens = [f"{i:064x}" for i in range(40)]
    config = sandbox.write(listen={"host": "127.0.0.1", "port": port},
                           devices={t: {"app": "ios"} for t in tokens},
                           delivery={"backoff_initial": 0.05, "backoff_max": 0.2, "send_timeout": 30})
    log = tmp_path / "relay.log"
    sandbox.apns.hang(True)  # nothing can be delivered before the kill: everything rests on the store
    relay = start_relay(config, log)
    acknowledged: list[int] = []
    try:
        await wait_ready(port)
        url = f"http://127.0.0.1:{port}/parley/webhook"
        async with aiohttp.ClientSession(headers={AUTH_HEADER: AUTH_VALUE}) as session:

            async def post(i: int) -> None:
                doc = sample("message", to=[tokens[i % len(tokens)]], id=10_000 + i, message=f"m{i}")
                async with session.post(url, json=doc) as response:
                    if response.status == 200:
                        acknowledged.append(i)

            async def device(first: int) -> None:  # one device's webhooks in order: their arrival order is known
                for i in range(first, 200, len(tokens)):
                    await post(i)

            await asyncio.gather(*(device(n) for n in range(len(tokens))))
        relay.send_signal(signal.SIGKILL)
        relay.wait(10)
    finally:
        if relay.poll() is None:
            relay.kill()
    assert len(acknowledged) == 200
    sandbox.apns.recover()
    sandbox.apns.clear()
    relay = start_relay(config, log)
    try:
        await wait_ready(port)
        received = await sandbox.apns.wait_for(200, timeout=30)
        await asyncio.sleep(0.3)
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(15) == 0
    ids = [int(r.payload["aps"]["alert"]["body"][1:]) for r in sandbox.apns.requests if r.status == 200]
    assert set(ids) == set(acknowledged)  # every acknowledged notification arrived, none lost
    # Per device, pushes left in the order their webhooks arrived.
    for token in tokens[:5]:
        order = [int(r.payload["aps"]["alert"]["body"][1:]) for r in sandbox.apns.requests
                 if r.device_token == token and r.status == 200]
        assert order == sorted(order)
    assert len(received) >= 200


async def test_operator_commands_beside_a_live_relay_send_nothing_twice(sandbox: Sandbox, tmp_path: Path) -> None:
    """`stats`, `devices list` and `dead-letters list` open the store while a live relay has pushes in flight:
    nothing is reset or counted as redelivered, and each push reaches APNs exactly once."""
    port = free_port()
    tokens = [f"{i:064x}" for i in range(1, 7)]
    config = sandbox.write(listen={"host": "127.0.0.1", "port": port}, devices={t: {"app": "ios"} for t in tokens})
    sandbox.apns.set_delay(5.0)  # each push stays in flight while the operator works
    relay = start_relay(config, tmp_path / "relay.log")
    try:
        await wait_ready(port)
        async with aiohttp.ClientSession(headers={AUTH_HEADER: AUTH_VALUE}) as session:
            for i, token in enumerate(tokens):
                doc = sample("message", to=[token], id=20_000 + i, message=f"m{i}")
                async with session.post(f"http://127.0.0.1:{port}/parley/webhook", json=doc) as response:
                    assert response.status == 200
        await sandbox.apns.wait_for(6, timeout=30)  # all six are in flight now
        for command in (["stats"], ["devices", "list"], ["dead-letters", "list"]):
            await asyncio.to_thread(cli_main, [*command, "--config", str(config)])
        store = create_store(load_config(config).store)
        await store.open()
        try:
            stats = await store.stats()
            assert (stats.inflight, stats.pending, stats.redelivered) == (6, 0, 0)
            deadline = time.monotonic() + 30
            while (await store.stats()).ended[EndState.SENT] < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the relay records each answer when the fake gives it
            stats = await store.stats()
        finally:
            await store.close()
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(15) == 0
    assert (stats.ended[EndState.SENT], stats.redelivered) == (6, 0)
    assert sorted(r.device_token for r in sandbox.apns.requests) == tokens  # each sent once
