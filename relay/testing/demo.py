"""``parley-relay demo``: the relay on its embedded defaults, with local fakes standing in for Apple and Google.

It starts the fakes, writes a config for them in a temporary directory, starts the relay (SQLite store),
posts Parley's two documented sample notifications to the webhook exactly as Parley would, and prints what
the relay answered and what each fake provider received.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

from relay.config import load_config
from relay.outcome import EndState
from relay.running import RELAY_KEY
from relay.runtime.relay import create_app
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE, SAMPLE_EVENT, SAMPLE_MESSAGE, Sandbox, pretty


async def run_demo(port: int = 0, keep_running: bool = False) -> int:
    """Run the demo; returns a process exit code (0 when both pushes arrived)."""
    with tempfile.TemporaryDirectory(prefix="parley-relay-demo-") as tmp:
        box = await asyncio.to_thread(Sandbox.start, Path(tmp))
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
            print("\nAPNs received:")
            for request in apns:
                headers = {k: v for k, v in request.headers.items() if k.startswith("apns-")}
                print(f"  POST /3/device/{request.device_token} -> {request.status}")
                print("  headers: " + json.dumps(headers))
                print("  payload: " + pretty(request.payload).replace("\n", "\n  "))
            print("\nFCM received:")
            for fcm_request in fcm:
                print(f"  POST /v1/projects/{fcm_request.project}/messages:send -> {fcm_request.status}")
                print("  message: " + pretty(fcm_request.message).replace("\n", "\n  "))
            store = app[RELAY_KEY].store
            for _ in range(200):  # the providers answered; wait for the outcomes to be recorded
                stats = await store.stats()
                if stats.pending == stats.inflight == 0:
                    break
                await asyncio.sleep(0.02)
            sent = stats.ended.get(EndState.SENT, 0)
            print(f"\nstore: accepted={stats.accepted} sent={sent} pending={stats.pending}")
            if keep_running:
                print(f"\nserving on {url} with header {AUTH_HEADER}: {AUTH_VALUE} (Ctrl-C to stop)")
                await asyncio.Event().wait()
            await runner.cleanup()
            return 0 if apns and fcm else 1
        finally:
            await asyncio.to_thread(box.stop)
