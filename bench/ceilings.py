"""``ceiling_apns`` / ``ceiling_fcm``: the bare client libraries pushing as fast as they can to the fakes.

Run as its own process by ``bench/run.py`` (uvloop when installed, like the relay). No relay code is on this
path: a plain ``aioapns`` key-auth connection pool (only its host and port pointed at the fake); for FCM
either plain ``firebase-admin`` ``send_each_async`` batches (only its private FCM URL pointed at the fake),
or (``fcm_aiohttp``) the same ``messaging.Message`` objects encoded by firebase-admin's own encoder and POSTed
with one ``aiohttp`` session, the token from firebase-admin's credential (the relay's FCM path without the
relay). The harness reads the rate off the fake's arrival times, exactly as it does for the relay's drain.

    python bench/ceilings.py SPEC_JSON     # prints one JSON line: {"sent": N, "failed": N, "elapsed": s, "cpu": s}

``cpu`` is this process's CPU time (user + system) over the sends: the client's cost per push is cpu / sent.

SPEC: ``platform`` (``apns`` | ``fcm`` | ``fcm_aiohttp``), ``count``, ``tokens``; for APNs ``host``, ``port``,
``ca_file``, ``key_file``, ``key_id``, ``team_id``, ``topic``, ``concurrency``, ``rate`` (optional: pushes started
at this steady rate, open loop, instead of all at once); for FCM
``service_account_file``, ``url`` (the fake's base URL), ``batch``, ``parallel`` (batches in flight); for
``fcm_aiohttp`` ``service_account_file``, ``url``, ``connections``, ``concurrency`` (requests in flight).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
import uuid
from typing import Any


def _parley(object_id: int) -> str:
    return json.dumps({"type": "message", "object": {"id": object_id, "typeId": 2, "body": "Hello! 📷",
                                                      "title": "Webuildapps"}}, separators=(",", ":"))


async def apns(spec: dict[str, Any]) -> dict[str, Any]:
    """``count`` alerts through one aioapns pool with ``concurrency`` sends in flight."""
    from aioapns.common import NotificationRequest, PushType
    from aioapns.connection import APNsKeyConnectionPool, APNsProductionClientProtocol

    protocol = type("BenchProtocol", (APNsProductionClientProtocol,),
                    {"APNS_SERVER": spec["host"], "APNS_PORT": spec["port"]})
    context = ssl.create_default_context(cafile=spec["ca_file"])
    context.set_alpn_protocols(["h2"])
    with open(spec["key_file"]) as fh:
        key = fh.read()
    pool = APNsKeyConnectionPool(key=key, key_id=spec["key_id"], team_id=spec["team_id"], topic=spec["topic"],
                                 max_connections=4, ssl_context=context)
    pool.protocol_class = protocol
    tokens: list[str] = spec["tokens"]
    slots = asyncio.Semaphore(int(spec.get("concurrency", 100)))
    sent = failed = 0

    async def one(n: int) -> None:
        nonlocal sent, failed
        async with slots:
            request = NotificationRequest(
                device_token=tokens[n % len(tokens)],
                message={"aps": {"alert": {"title": "Webuildapps", "body": "Hello! 📷"}, "sound": "default",
                                 "content-available": 1}, "parley": _parley(n + 1)},
                notification_id=str(uuid.uuid4()), priority=10, push_type=PushType.ALERT)
            result = await pool.send_notification(request)
            if result.is_successful:
                sent += 1
            else:
                failed += 1

    started, cpu = time.perf_counter(), time.process_time()
    if spec.get("rate"):
        await _paced(one, int(spec["count"]), float(spec["rate"]))
    else:
        await asyncio.gather(*(one(n) for n in range(int(spec["count"]))))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    pool.close()
    await asyncio.sleep(0.05)
    return {"sent": sent, "failed": failed, "elapsed": elapsed, "cpu": cpu}


async def _paced(one: Any, count: int, rate: float) -> None:
    """Start ``one(n)`` for ``n`` in ``range(count)`` at ``rate`` per second (open loop), then wait for all."""
    loop = asyncio.get_running_loop()
    begun, tasks = loop.time(), []
    for n in range(count):
        delay = begun + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(n)))
    await asyncio.gather(*tasks)


async def fcm(spec: dict[str, Any]) -> dict[str, Any]:
    """``count`` data+notification messages in ``send_each_async`` batches of ``batch``."""
    import firebase_admin
    import google.auth.transport.requests
    from firebase_admin import credentials, messaging

    with open(spec["service_account_file"]) as fh:
        info = json.load(fh)
    app = firebase_admin.initialize_app(credentials.Certificate(info), name=f"bench-{uuid.uuid4().hex[:6]}")
    service = messaging._get_messaging_service(app)
    service._fcm_url = f"{spec['url']}/v1/projects/{info['project_id']}/messages:send"
    # The first OAuth token, off the loop (firebase-admin would otherwise fetch it blocking, mid-batch).
    await asyncio.to_thread(app.credential.get_credential().refresh, google.auth.transport.requests.Request())
    tokens: list[str] = spec["tokens"]
    count, size = int(spec["count"]), int(spec.get("batch", 500))
    slots = asyncio.Semaphore(int(spec.get("parallel", 1)))
    sent = failed = 0

    async def batch(start: int) -> None:
        nonlocal sent, failed
        async with slots:
            response = await messaging.send_each_async(
                [_message(n, tokens) for n in range(start, min(start + size, count))], app=app)
            sent += response.success_count
            failed += response.failure_count

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(batch(start) for start in range(0, count, size)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await service._async_client.aclose()
    return {"sent": sent, "failed": failed, "elapsed": elapsed, "cpu": cpu}


def _message(n: int, tokens: list[str]) -> Any:
    from firebase_admin import messaging

    msg = messaging.Message(data={"parley": _parley(n + 1), "message": "Hello! 📷"},
                            notification=messaging.Notification(title="Webuildapps", body="Hello! 📷"),
                            android=messaging.AndroidConfig(priority="high"))
    msg.token = tokens[n % len(tokens)]  # the constructor argument warns as deprecated in 7.7
    return msg


async def fcm_aiohttp(spec: dict[str, Any]) -> dict[str, Any]:
    """``count`` messages, each encoded by firebase-admin's encoder and POSTed on one aiohttp session."""
    import aiohttp
    import google.auth.transport.requests
    from firebase_admin import credentials
    from firebase_admin._messaging_encoder import MessageEncoder

    with open(spec["service_account_file"]) as fh:
        info = json.load(fh)
    credential = credentials.Certificate(info).get_credential()
    await asyncio.to_thread(credential.refresh, google.auth.transport.requests.Request())
    url = f"{spec['url']}/v1/projects/{info['project_id']}/messages:send"
    headers = {"Authorization": f"Bearer {credential.token}", "Content-Type": "application/json"}
    encoder = MessageEncoder()
    tokens: list[str] = spec["tokens"]
    slots = asyncio.Semaphore(int(spec.get("concurrency", 64)))
    sent = failed = 0
    connector = aiohttp.TCPConnector(limit=int(spec.get("connections", 16)))
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(n: int) -> None:
            nonlocal sent, failed
            async with slots:
                body = json.dumps({"message": encoder.default(_message(n, tokens))}, separators=(",", ":"))
                async with session.post(url, data=body.encode(), headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        sent += 1
                    else:
                        failed += 1

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(n) for n in range(int(spec["count"]))))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"sent": sent, "failed": failed, "elapsed": elapsed, "cpu": cpu}


def main() -> None:
    spec = json.loads(sys.argv[1])
    runner = {"apns": apns, "fcm": fcm, "fcm_aiohttp": fcm_aiohttp}[spec["platform"]]
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(runner(spec))
    else:
        result = uvloop.run(runner(spec))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
