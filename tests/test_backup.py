"""``parley-relay backup`` and ``restore`` (issue 20 item 4): a consistent copy of a live SQLite store, and a
restore that brings back what exists nowhere else (run-time devices, dead marks, waiting deliveries)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import pytest

from relay.cli import main as cli_main
from relay.config import load_config
from relay.store import create_store
from relay.testing.process import RelayProcess, free_port
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE, Sandbox, sample
from tests.test_durability import wait_ready

API_DEVICE = "eJ9x-registered-at-run-time:APA91b_backup"
DEAD = "dead" * 16


async def _post(port: int, doc: dict[str, object]) -> int:
    async with aiohttp.ClientSession(headers={AUTH_HEADER: AUTH_VALUE}) as session, \
            session.post(f"http://127.0.0.1:{port}/parley/webhook", json=doc) as response:
        return response.status


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(cli_main, list(argv))


async def _store_facts(config: Path) -> tuple[list[str], dict[str, str], int]:
    store = create_store(load_config(config, credentials=False).store)
    await store.open()
    try:
        stats = await store.stats()
        # Waiting work: pending, or claimed by a process that has since stopped (recovered at the next start).
        return [d.token for d in await store.list_devices()], await store.dead_tokens(), stats.pending + stats.inflight
    finally:
        await store.close()


async def test_backup_of_a_live_store_restores_devices_dead_marks_and_waiting_deliveries(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """While the relay runs (default process model) and FCM is down, ``backup`` copies the store; after the
    store is lost (overwritten by later changes), ``restore`` brings back the run-time device, the dead mark and
    the deliveries still waiting, and a restarted relay sends those once FCM is back."""
    port = free_port()
    config = sandbox.write(listen={"host": "127.0.0.1", "port": port}, routing=[{"match": "apns-hex", "app": "ios"}])
    sandbox.apns.respond(DEAD, 410, "Unregistered")
    sandbox.fcm.fail_all(503)
    backup = tmp_path / "backups" / "relay-backup.db"
    backup.parent.mkdir()
    assert await _cli("devices", "add", API_DEVICE, "--app", "android", "--config", str(config)) == 0
    with RelayProcess(config, log=tmp_path / "relay.log") as relay:
        await wait_ready(port)
        assert await _post(port, sample("message", to=[DEAD], id=1)) == 200
        for i in range(5):
            assert await _post(port, sample("message", to=[API_DEVICE], id=100 + i)) == 200
        for _ in range(300):  # the dead mark recorded, the Android pushes waiting on FCM
            if DEAD in (await _store_facts(config))[1]:
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(cli_main, ["backup", str(backup), "--config", str(config)]) == 0
        # The relay must be stopped before a restore.
        assert await asyncio.to_thread(cli_main, ["restore", str(backup), "--config", str(config)]) == 1
        relay.signal(signal.SIGTERM)
        assert relay.wait(30) == 0
    before = await _store_facts(config)
    assert API_DEVICE in before[0] and DEAD in before[1] and before[2] >= 5
    # Disaster: the device is removed and the store's waiting work lost (here: the file replaced by an empty one).
    store_path = Path(load_config(config, credentials=False).store.path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    assert await _cli("devices", "add", "eJ9x-added-after-the-backup:APA91b_lost", "--app", "android",
                      "--config", str(config)) == 0
    assert await asyncio.to_thread(cli_main, ["restore", str(backup), "--config", str(config)]) == 0
    assert await _store_facts(config) == before
    sandbox.fcm.recover()
    with RelayProcess(config, log=tmp_path / "relay2.log") as relay:
        await wait_ready(port)
        for _ in range(600):
            sent = [r for r in sandbox.fcm.requests if r.status == 200]
            if len(sent) >= 5:
                break
            await asyncio.sleep(0.05)
        relay.signal(signal.SIGTERM)
        assert relay.wait(30) == 0
    ids = sorted(json.loads(r.message["data"]["parley"])["object"]["id"] for r in sent)
    assert ids == list(range(100, 105))  # each waiting push sent, once


def test_backup_without_a_store_or_to_a_broken_file_says_why(sandbox: Sandbox, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """No store at the configured path: exit 1 naming it (nothing is created); a file that is not a backup is
    refused by ``restore`` before anything is touched."""
    config = sandbox.write(store={"backend": "sqlite", "path": str(tmp_path / "nowhere" / "relay.db")})
    assert cli_main(["backup", str(tmp_path / "b.db"), "--config", str(config)]) == 1
    assert "no store at" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "b.db").exists()
    junk = tmp_path / "junk.db"
    junk.write_text("not a database")
    assert cli_main(["restore", str(junk), "--config", str(config)]) == 1
    assert "not a usable backup" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_a_redis_store_is_pointed_at_redis_persistence(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    """``backup`` with the Redis backend exits 2 and names Redis's own persistence (RDB/AOF) instead."""
    config = sandbox.write(store={"backend": "redis", "url": "redis://127.0.0.1:6379/15"})
    assert cli_main(["backup", "x.db", "--config", str(config)]) == 2
    assert "RDB snapshots or AOF" in capsys.readouterr().err
