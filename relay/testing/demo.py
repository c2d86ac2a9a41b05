"""``parley-relay demo``: the relay on its embedded defaults, with local fakes standing in for Apple and Google.

It starts the fakes, writes a config for them in a temporary directory, starts the relay (SQLite store),
posts Parley's two documented sample notifications to the webhook exactly as Parley would, and prints what
the relay answered and what each fake provider received. It ends with what to try next: a curl line for a
relay kept running (``--keep-running``), and how to run a live relay with real credentials.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

from relay.config import load_config
from relay.outcome import EndState
from relay.running import RELAY_KEY
from relay.runtime.relay import create_app
from relay.store import Store
from relay.store.base import Stats
from relay.testing.sandbox import (
    AUTH_HEADER,
    AUTH_VALUE,
    IOS_TOKEN,
    SAMPLE_EVENT,
    SAMPLE_MESSAGE,
    Sandbox,
    pretty,
    sample,
)

LIVE_SETUP = """\
Run a live relay: copy config/relay.example.yaml to relay.yaml and config/devices.example.yaml to
devices.yaml; put the real credentials next to them (the APNs key AuthKey_XXXXXXXXXX.p8 with its key_id and
team_id; the Firebase service account JSON) or hand them over as systemd credentials (cred:NAME); set the
secret Parley will send (auth.headers), then:
  parley-relay check-config --config relay.yaml && parley-relay serve --config relay.yaml
(README "Running it for real"; docs/operations.md for systemd)."""


def curl_line(url: str) -> str:
    """A curl command that posts one more sample message (a new id, so not a duplicate) to ``url``."""
    body = json.dumps(sample("message", to=[IOS_TOKEN], id=4711, message="Hello from curl"), separators=(",", ":"))
    return (f"curl -s -H {shlex.quote(f'{AUTH_HEADER}: {AUTH_VALUE}')} -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)} {url}")


def next_steps(url: str, config: Path, keep_running: bool) -> str:
    """What to try after the samples: a curl line against this demo if it keeps running, else how to."""
    if keep_running:
        return (f"\nTry it (Ctrl-C stops the demo): from another shell, post a message and look at the counts:\n"
                f"  {curl_line(url)}\n  parley-relay stats --config {config}\n\n{LIVE_SETUP}")
    port_url = url.replace(url.split("/")[2], "127.0.0.1:8080")
    return (f"\nTry it yourself: `parley-relay demo --keep-running --port 8080` keeps the relay and the fakes "
            f"running; then, from another shell:\n  {curl_line(port_url)}\n\n{LIVE_SETUP}")


async def run_demo(port: int = 0, keep_running: bool = False) -> int:
    """Run the demo; returns a process exit code (0 when both pushes arrived).

    SIGTERM and SIGINT end it cleanly: the relay and the fakes stop and the temporary directory, which holds
    the test CA's and the fake providers' private keys, is removed.
    """
    loop, main = asyncio.get_running_loop(), asyncio.current_task()
    if main is None:
        raise RuntimeError("run_demo must run in a task")
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, main.cancel)
    try:
        return await _demo(port, keep_running)
    except asyncio.CancelledError:
        print("\ndemo stopped; its temporary files are removed", flush=True)
        return 0
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _demo(port: int, keep_running: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="parley-relay-demo-") as tmp:
        box = await asyncio.to_thread(Sandbox.start, Path(tmp))
        runner: web.AppRunner | None = None
        try:
            path = box.write(listen={"host": "127.0.0.1", "port": port})
            config = load_config(path)
            app = create_app(config)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", port)
            await site.start()
            bound = runner.addresses[0][1]
            url = f"http://127.0.0.1:{bound}{config.webhook.path}"
            print(f"relay listening on {url} (store: {config.store.path})")
            print(f"fake APNs at {box.apns.url}, fake FCM at {box.fcm.url}\n")
            async with aiohttp.ClientSession() as session:
                for name, doc in (("message -> iOS (APNs alert)", SAMPLE_MESSAGE),
                                  ("startTyping event -> Android (FCM silent push)", SAMPLE_EVENT)):
                    async with session.post(url, json=doc, headers={AUTH_HEADER: AUTH_VALUE}) as response:
                        answer = await response.json()
                    print(f"POST {name}: HTTP {response.status} {json.dumps(answer)}")
            apns = await box.apns.wait_for(1, timeout=10)
            fcm = await box.fcm.wait_for(1, timeout=10)
            _show(box, 0, 0)
            stats = await _settled(app[RELAY_KEY].store)
            sent = stats.ended.get(EndState.SENT, 0)
            print(f"\nstore: accepted={stats.accepted} sent={sent} pending={stats.pending}")
            if keep_running:
                print(f"\nserving on {url} with header {AUTH_HEADER}: {AUTH_VALUE}")
            print(next_steps(url, path, keep_running), flush=True)
            if keep_running:
                await _follow(box, len(box.apns.requests), len(box.fcm.requests))
            return 0 if apns and fcm else 1
        finally:
            if runner is not None:
                await runner.cleanup()
            await asyncio.to_thread(box.stop)


def _show(box: Sandbox, apns_from: int, fcm_from: int) -> tuple[int, int]:
    """Print what each fake received from the given positions on (with the answer and its reason)."""
    apns, fcm = box.apns.requests[apns_from:], box.fcm.requests[fcm_from:]
    if apns:
        print("\nAPNs received:")
    for request in apns:
        headers = {k: v for k, v in request.headers.items() if k.startswith("apns-")}
        refusal = f" {request.reason}" if request.reason and request.status != 200 else ""
        print(f"  POST /3/device/{request.device_token} -> {request.status}{refusal}")
        print("  headers: " + json.dumps(headers))
        print("  payload: " + pretty(request.payload).replace("\n", "\n  "))
    if fcm:
        print("\nFCM received:")
    for fcm_request in fcm:
        refusal = f" {fcm_request.error_code}" if fcm_request.error_code else ""
        print(f"  POST /v1/projects/{fcm_request.project}/messages:send -> {fcm_request.status}{refusal}")
        print("  message: " + pretty(fcm_request.message).replace("\n", "\n  "))
    return apns_from + len(apns), fcm_from + len(fcm)


async def _follow(box: Sandbox, apns_seen: int, fcm_seen: int) -> None:
    """Until stopped, print every push the fakes receive (what a curl line against the demo led to)."""
    while True:
        await asyncio.sleep(0.2)
        shown = _show(box, apns_seen, fcm_seen)
        if shown != (apns_seen, fcm_seen):
            print(flush=True)
        apns_seen, fcm_seen = shown


async def _settled(store: Store) -> Stats:
    """The store's counts once both outcomes are recorded (the providers answered; up to 10 s)."""
    for _ in range(500):
        stats = await store.stats()
        if sum(stats.ended.values()) >= stats.accepted:
            break
        await asyncio.sleep(0.02)
    return stats
