"""Typing indicators through a real relay (``parley-relay serve``, the default ``processes: auto``), the real
aioapns/firebase-admin clients and the shipped fakes: what each phone receives (SPEC §2, resends and
coalescing)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from relay.config import load_config
from relay.store import create_store
from relay.testing.fake_apns import ApnsRequest
from relay.testing.fake_fcm import FcmRequest
from relay.testing.process import RelayProcess, free_port
from relay.testing.sandbox import ANDROID_TOKEN, AUTH_HEADER, AUTH_VALUE, IOS_TOKEN, Sandbox, sample
from tests.conftest import wait_until

SEQUENCE = ["startTyping", "stopTyping", "startTyping", "stopTyping"]


def typing(name: str) -> dict[str, Any]:
    """Agent 1's typing event to the iOS and the Android device."""
    return sample("event", to=[IOS_TOKEN, ANDROID_TOKEN], name=name)


def names(requests: list[ApnsRequest] | list[FcmRequest]) -> list[str]:
    """The event names the fake answered 200 to (``message`` for a message), in the order it received them."""
    out = []
    for request in requests:
        if request.status != 200:
            continue
        parley = request.payload["parley"] if isinstance(request, ApnsRequest) else request.message["data"]["parley"]
        out.append(json.loads(parley)["object"].get("name", "message"))
    return out


class Relay:
    """A real relay on ``config``, and a session that posts webhooks to it."""

    def __init__(self, config: Path, port: int, tmp_path: Path) -> None:
        self.process = RelayProcess(config, log=tmp_path / "relay.log")
        self.url = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(headers={AUTH_HEADER: AUTH_VALUE})

    async def post(self, doc: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(f"{self.url}/parley/webhook", json=doc) as response:
            assert response.status == 200, await response.text()
            return dict(await response.json())

    async def close(self) -> None:
        await self.session.close()
        self.process.stop()


async def start(sandbox: Sandbox, tmp_path: Path, **overrides: Any) -> Relay:
    port = free_port()
    config = sandbox.write(listen={"host": "127.0.0.1", "port": port}, **overrides)
    relay = Relay(config, port, tmp_path)
    await asyncio.to_thread(relay.process.wait_ready, f"{relay.url}/readyz")
    return relay


async def test_start_stop_start_stop_one_second_apart_reach_both_phones_in_order(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """An agent types, stops, types and stops again, 1 s apart: each phone (iOS, Android) gets 4 of 4, in order."""
    relay = await start(sandbox, tmp_path)
    try:
        for n, name in enumerate(SEQUENCE):
            if n:
                await asyncio.sleep(1.0)  # Parley's real pace; each event is new, whatever its body
            assert (await relay.post(typing(name)))["accepted"] == 2
        await sandbox.apns.wait_for(4, timeout=20)
        await sandbox.fcm.wait_for(4, timeout=20)
    finally:
        await relay.close()
    assert names(sandbox.apns.requests) == SEQUENCE
    assert names(sandbox.fcm.requests) == SEQUENCE


async def test_an_identical_event_resent_within_the_window_is_pushed_once_and_after_it_again(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """Parley resends a startTyping at once (a timeout on its side): a duplicate, pushed once. The same body
    after ``dedupe.event_window`` (1 s here) is the agent typing again: pushed again."""
    relay = await start(sandbox, tmp_path, dedupe={"event_window": 1})
    try:
        assert (await relay.post(typing("startTyping")))["status"] == "accepted"
        assert (await relay.post(typing("startTyping"))) == {"status": "duplicate", "accepted": 0, "duplicates": 2}
        await asyncio.sleep(1.5)  # past the 1 s window (the store compares arrival times)
        assert (await relay.post(typing("startTyping")))["accepted"] == 2
        assert (await relay.post(sample("message", to=[IOS_TOKEN])))["status"] == "accepted"  # after them, in order
        await sandbox.apns.wait_for(3, timeout=20)
        await sandbox.fcm.wait_for(2, timeout=20)
    finally:
        await relay.close()  # the message was the iOS device's last push: nothing else was queued for it
    assert names(sandbox.fcm.requests) == ["startTyping", "startTyping"]
    assert names(sandbox.apns.requests) == ["startTyping", "startTyping", "message"]


async def test_after_an_outage_only_the_last_of_twenty_typing_pairs_reaches_each_phone(
        sandbox: Sandbox, tmp_path: Path) -> None:
    """APNs and FCM answer 503 while 20 start/stop pairs arrive; after recovery each phone gets only the last
    stopTyping, and the 39 others per phone end ``superseded`` (counted, logged once each, never sent)."""
    sandbox.apns.fail_all(503, "ServiceUnavailable")
    sandbox.fcm.fail_all(503)
    relay = await start(sandbox, tmp_path, apps={"ios": {"event_ttl": 120}, "android": {"event_ttl": 120}},
                        logging={"trace_lines_per_second": 0})  # every routine line written, to count them
    config = load_config(relay.process.config, credentials=False)
    store = create_store(config.store)
    await store.open()
    try:
        for _ in range(20):
            for name in ("startTyping", "stopTyping"):
                assert (await relay.post(typing(name)))["accepted"] == 2

        async def all_but_the_last_superseded() -> bool:
            ended = (await store.stats()).ended
            return sum(n for end, n in ended.items() if end.value == "superseded") >= 78

        await wait_until(all_but_the_last_superseded, timeout=30)
        sandbox.apns.recover()
        sandbox.fcm.recover()

        async def drained() -> bool:
            stats = await store.stats()
            return stats.pending == 0 and stats.inflight == 0

        await wait_until(drained, timeout=30)
        stats = await store.stats()
    finally:
        await store.close()
        await relay.close()
    assert names(sandbox.apns.requests) == ["stopTyping"]
    assert names(sandbox.fcm.requests) == ["stopTyping"]
    assert stats.accepted == 80 and stats.duplicates == 0 and stats.balanced
    assert {end.value: n for end, n in stats.ended.items() if n} == {"superseded": 78, "sent": 2}
    logged = [line for line in relay.process.log().splitlines() if "state=superseded" in line]
    assert len(logged) == 78 and all('event="delivery ended"' in line for line in logged)

