"""Fault tests with the real clients against the fakes: outages, dropped connections, hangs, crashes.

Each test ends by checking the books: accepted == sum of end states + pending, and every acknowledged
notification was delivered (none lost; duplicates possible after a crash, and counted).
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from relay.outcome import EndState
from relay.runtime.relay import reload
from relay.testing.process import free_port
from relay.testing.sandbox import ANDROID_TOKEN, AUTH_HEADER, AUTH_VALUE, IOS_TOKEN, Sandbox, sample
from tests.conftest import MakeRelay
from tests.test_durability import start_relay, wait_ready

IOS = [f"{i:064x}" for i in range(1, 6)]
ANDROID = [f"android-token-{i}-" + "q" * 40 for i in range(1, 6)]


def _devices() -> dict[str, dict[str, str]]:
    return {**{t: {"app": "ios"} for t in IOS}, **{t: {"app": "android"} for t in ANDROID}}


def _body(text: str) -> int:
    return int(text.split("#")[1])


async def test_outage_of_both_providers_then_everything_arrives_in_order(make_relay: MakeRelay,
                                                                         sandbox: Sandbox) -> None:
    """APNs 503 and FCM UNAVAILABLE while 100 webhooks are acknowledged (both circuits open): once both answer
    again, every one arrives, exactly once, in order per device."""
    r = await make_relay(devices=_devices())
    sandbox.apns.fail_all(503, "ServiceUnavailable")
    sandbox.fcm.fail_all(error_code="UNAVAILABLE")
    n = 0
    for _round in range(10):
        for token in IOS + ANDROID:
            status, _ = await r.post(sample("message", to=[token], id=n, message=f"#{n}"))
            assert status == 200
            n += 1
    await _until(lambda: r.relay.dispatcher is not None and {"ios", "android"} <= {
        app for app, b in r.relay.dispatcher.breakers.items() if b.is_open})
    sandbox.apns.recover()
    sandbox.fcm.recover()
    await r.settle(timeout=30)
    apns_ok = [q for q in sandbox.apns.requests if q.status == 200]
    fcm_ok = [q for q in sandbox.fcm.requests if q.status == 200]
    assert len(apns_ok) + len(fcm_ok) == n  # exactly the right number of pushes
    assert any(q.status == 503 for q in sandbox.apns.requests)  # the outage really refused sends
    per_device: dict[str, list[int]] = defaultdict(list)
    for q in apns_ok:
        per_device[q.device_token].append(_body(q.payload["aps"]["alert"]["body"]))
    for f in fcm_ok:
        per_device[f.message["token"]].append(_body(f.message["data"]["message"]))
    assert all(order == sorted(order) and len(order) == 10 for order in per_device.values())
    stats = await r.relay.store.stats()
    assert stats.accepted == n and stats.ended[EndState.SENT] == n and stats.balanced
    print(f"outage: accepted={n} delivered={len(apns_ok) + len(fcm_ok)} duplicated=0 lost=0")


async def test_connection_dropped_mid_stream_is_retried_and_delivered(make_relay: MakeRelay,
                                                                      sandbox: Sandbox) -> None:
    """The fake APNs drops the TCP connection with requests in flight; those sends are retried and arrive."""
    r = await make_relay(devices=_devices())
    sandbox.apns.hang(True)
    for i, token in enumerate(IOS):
        await r.post(sample("message", to=[token], id=i, message=f"#{i}"))
    await sandbox.apns.wait_for(len(IOS))
    sandbox.apns.drop_connections()
    sandbox.apns.recover()
    await r.settle(timeout=20)
    delivered = {q.device_token for q in sandbox.apns.requests if q.status == 200}
    assert delivered == set(IOS)
    stats = await r.relay.store.stats()
    assert stats.ended[EndState.SENT] == len(IOS) and stats.balanced


async def test_hanging_provider_never_slows_the_acknowledgements(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """While APNs accepts but never answers, all 300 webhooks are acknowledged before APNs answered anything
    (the answer never waits on a send); p50/p99 are printed."""
    r = await make_relay(devices=_devices(), delivery={"send_timeout": 2})  # only to end the test sooner
    sandbox.apns.hang(True)
    times: list[float] = []
    for i in range(300):
        started = time.perf_counter()
        status, _ = await r.post(sample("message", to=[IOS[i % len(IOS)]], id=i, message=f"#{i}"))
        times.append(time.perf_counter() - started)
        assert status == 200
    assert sandbox.apns.requests and all(q.status == 0 for q in sandbox.apns.requests)  # sends were hanging
    p99 = statistics.quantiles(times, n=100)[98]
    print(f"ack during provider hang: p50={statistics.median(times) * 1000:.1f} ms p99={p99 * 1000:.1f} ms")
    sandbox.apns.recover()
    await r.settle(timeout=60)
    assert (await r.relay.store.stats()).ended[EndState.SENT] == 300


async def test_dead_token_is_not_sent_again_and_later_webhooks_get_410(make_relay: MakeRelay,
                                                                       sandbox: Sandbox) -> None:
    """410 Unregistered marks the token dead; with reject_dead_tokens Parley is answered 410 afterwards."""
    r = await make_relay(webhook={"reject_dead_tokens": True})
    sandbox.apns.respond(IOS_TOKEN, status=410, reason="Unregistered")
    await r.post(sample("message"))
    await r.settle()
    status, answer = await r.post(sample("message", id=2))
    assert status == 410 and "dead" in answer["error"]
    assert len(sandbox.apns.requests) == 1
    stats = await r.relay.store.stats()
    assert stats.ended[EndState.TOKEN_DEAD] == 1 and stats.dead_tokens == 1
    text = await (await r.ops.get("/metrics")).text()
    assert 'parley_relay_dead_tokens_total{app="ios",platform="apns"} 1.0' in text


async def test_bad_credentials_alarm_keeps_readyz_and_resume_after_fix_and_reload(make_relay: MakeRelay,
                                                                                   sandbox: Sandbox) -> None:
    """An APNs key the server refuses: alarm metric, deliveries kept, /readyz still 200 (webhooks are still
    accepted: SPEC §8); reload with a good key sends them."""
    from relay.testing.keys import make_apns_key

    good = sandbox.apns_key
    rogue = make_apns_key(key_id=good.key_id, team_id=good.team_id)  # same ids, key Apple doesn't know
    rogue.write_p8(sandbox.root / "AuthKey.p8")
    r = await make_relay(delivery={})  # the defaults: a probe only every config_error_retry (60 s)
    await r.post(sample("message"))
    await _until(lambda: r.relay.dispatcher is not None and bool(r.relay.dispatcher.alarms))
    assert (await r.client.get("/readyz")).status == 200  # one app's alarm never takes the relay out
    assert 'parley_relay_app_alarm{app="ios"} 1.0' in await (await r.ops.get("/metrics")).text()
    assert (await r.relay.store.stats()).pending == 1  # kept, not dropped
    good.write_p8(sandbox.root / "AuthKey.p8")  # the operator fixes the key ...
    assert await reload(r.relay)  # ... and reloads
    await r.settle(timeout=10)  # well before the next probe could have sent it
    assert (await r.client.get("/readyz")).status == 200
    assert [q.status for q in sandbox.apns.requests] == [403, 200]


async def test_sigkill_with_inflight_and_pending_retries_loses_nothing(sandbox: Sandbox, tmp_path: Path) -> None:
    """kill -9 while sends hang and retries are scheduled: after restart all arrive, retries reuse the apns-id."""
    port = free_port()
    config = sandbox.write(listen={"host": "127.0.0.1", "port": port}, devices=_devices(),
                           delivery={"backoff_initial": 0.2, "backoff_max": 0.5, "send_timeout": 30})
    for token in IOS[:2]:
        sandbox.apns.respond(token, status=503, reason="ServiceUnavailable", times=1)
    sandbox.fcm.hang(True)
    log = tmp_path / "relay.log"
    relay = start_relay(config, log)
    acked = 0
    try:
        await wait_ready(port)
        async with aiohttp.ClientSession(headers={AUTH_HEADER: AUTH_VALUE}) as session:
            for i, token in enumerate(IOS + ANDROID):
                doc = sample("message", to=[token], id=100 + i, message=f"#{i}")
                async with session.post(f"http://127.0.0.1:{port}/parley/webhook", json=doc) as response:
                    acked += response.status == 200
        await sandbox.fcm.wait_for(len(ANDROID))  # FCM sends are in flight (hung)
        await sandbox.apns.wait_for(len(IOS))
        relay.send_signal(signal.SIGKILL)
        relay.wait(10)
    finally:
        if relay.poll() is None:
            relay.kill()
    sandbox.fcm.recover()
    relay = start_relay(config, log)
    try:
        await wait_ready(port)
        await sandbox.fcm.wait_for(2 * len(ANDROID), timeout=20)
        await _until(lambda: len({q.device_token for q in sandbox.apns.requests if q.status == 200}) == len(IOS))
    finally:
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(15) == 0
    apns_ok = {q.device_token for q in sandbox.apns.requests if q.status == 200}
    fcm_ok = {f.message["token"] for f in sandbox.fcm.requests if f.status == 200}
    assert acked == len(IOS) + len(ANDROID)
    assert apns_ok == set(IOS) and fcm_ok == set(ANDROID)  # none lost
    for token in IOS[:2]:  # the 503 and its retry carry one apns-id
        ids = {q.headers["apns-id"] for q in sandbox.apns.requests if q.device_token == token}
        assert len(ids) == 1
    from relay.cli import main

    assert await asyncio.to_thread(main, ["stats", "--config", str(config)]) == 0  # the books balance
    duplicates = len(sandbox.fcm.requests) - len(ANDROID)
    print(f"crash: accepted={acked} delivered={len(apns_ok) + len(fcm_ok)} duplicated={duplicates} lost=0")


async def test_expired_event_is_never_sent_after_an_outage(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """A typing event whose provider is down longer than its TTL ends expired, not delivered late."""
    r = await make_relay(apps={"android": {"event_ttl": 1}})
    sandbox.fcm.fail_all(error_code="UNAVAILABLE")  # down until the event has ended
    await r.post(sample("event", to=[ANDROID_TOKEN]))
    await r.settle(timeout=10)
    sandbox.fcm.recover()
    assert sandbox.fcm.requests and all(q.status != 200 for q in sandbox.fcm.requests)
    stats = await r.relay.store.stats()
    assert stats.ended[EndState.EXPIRED] == 1 and stats.balanced


async def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a condition (checked every 10 ms), failing after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_shutdown_with_hung_providers_ends_within_one_shutdown_timeout(sandbox: Sandbox) -> None:
    """APNs and FCM hang with sends in flight, and a reload left the old providers retiring: the drain (sends,
    retiring providers, closing providers) ends within shutdown_timeout overall, not once per phase."""
    from relay.config import load_config
    from relay.runtime.service import serve

    port, ops = free_port(), free_port()
    config = load_config(sandbox.write(listen={"host": "127.0.0.1", "port": port}, devices=_devices(),
                                       metrics={"listen": {"host": "127.0.0.1", "port": ops}}, shutdown_timeout=3))
    sandbox.apns.hang(True)
    sandbox.fcm.hang(True)
    ready, stop = asyncio.Event(), asyncio.Event()
    service = asyncio.get_running_loop().create_task(serve(config, ready=ready, stop=stop))
    try:
        async with asyncio.timeout(30):
            await ready.wait()
        async with aiohttp.ClientSession(headers={AUTH_HEADER: AUTH_VALUE}) as session:
            for i, token in enumerate(IOS + ANDROID):
                doc = sample("message", to=[token], id=i, message=f"#{i}")
                async with session.post(f"http://127.0.0.1:{port}/parley/webhook", json=doc) as response:
                    assert response.status == 200
            await sandbox.apns.wait_for(len(IOS))
            await sandbox.fcm.wait_for(len(ANDROID))
            signal.raise_signal(signal.SIGHUP)  # the service's own handler reloads: old providers retire
            await _until_async(lambda: _reloads(session, ops), timeout=20)
        started = time.monotonic()
        stop.set()
        async with asyncio.timeout(60):
            await service
        elapsed = time.monotonic() - started
    finally:
        if not service.done():
            stop.set()
            service.cancel()
    print(f"drain with hung providers: {elapsed:.2f} s (shutdown_timeout 3 s)")
    assert elapsed <= config.shutdown_timeout + 1.0  # per phase it took 28 s (3 s sends, then FCM's 5 s closes)


async def _reloads(session: aiohttp.ClientSession, port: int) -> bool:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        return 'parley_relay_reloads_total{result="ok"} 1.0' in await response.text()


async def _until_async(condition: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Wait for an async condition (checked every 50 ms), failing after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.05)
