"""End to end: Parley webhooks in, real aioapns/firebase-admin clients out to the fakes over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from relay.testing.sandbox import ANDROID_TOKEN, AUTH_HEADER, AUTH_VALUE, IOS_TOKEN, Sandbox, sample
from tests.conftest import MakeRelay

APNS_HEX = "ab" * 32


def _uuid(value: str) -> bool:
    return str(uuid.UUID(value)) == value.lower()


async def test_sample_message_becomes_apns_alert_with_every_spec_field(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """The documented message sample reaches the fake APNs as an alert with SPEC §5's headers and payload."""
    r = await make_relay()
    status, answer = await r.post(sample("message", image="https://example.com/p.jpg"))
    assert (status, answer["status"], answer["accepted"]) == (200, "accepted", 1)
    (request,) = await sandbox.apns.wait_for(1)
    assert request.status == 200
    assert request.device_token == IOS_TOKEN
    h = request.headers
    assert h["apns-push-type"] == "alert"
    assert h["apns-priority"] == "10"
    assert h["apns-topic"] == "com.example.parleyapp"
    assert _uuid(h["apns-id"])
    assert "apns-expiration" not in h and "apns-collapse-id" not in h
    aps = request.payload["aps"]
    assert aps["alert"] == {"title": "Webuildapps", "body": "Hello! We received your photo 📷"}
    assert aps["sound"] == "default"
    assert aps["content-available"] == 1
    assert aps["mutable-content"] == 1
    parley = json.loads(request.payload["parley"])  # a JSON *string*, as the SDKs read it
    assert parley["type"] == "message"
    assert parley["object"]["id"] == 3224 and parley["object"]["typeId"] == 2
    assert parley["object"]["body"] == "Hello! We received your photo 📷"
    assert parley["object"]["title"] == "Webuildapps"
    assert parley["object"]["image"] == "https://example.com/p.jpg"


async def test_sample_event_becomes_fcm_data_only_push(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """The documented startTyping sample reaches the fake FCM as a data-only, normal-priority, 30 s push."""
    r = await make_relay()
    status, answer = await r.post(sample("event"))
    assert (status, answer["status"]) == (200, "accepted")
    (request,) = await sandbox.fcm.wait_for(1)
    message = request.message
    assert message["token"] == ANDROID_TOKEN
    assert "notification" not in message
    assert message["android"]["priority"] == "normal"
    assert message["android"]["collapse_key"] == "parley-typing-1"
    assert 28 <= float(message["android"]["ttl"].rstrip("s")) <= 30
    assert set(message["data"]) == {"parley"}
    parley = json.loads(message["data"]["parley"])
    assert parley == {"type": "event", "object": {"name": "startTyping", "body": {"agent": {
        "id": 1, "name": "Webuildapps", "avatar": "https://example.com/avatar.png"}}}}


async def test_message_to_android_is_fcm_alert_and_event_to_ios_is_silent_apns(make_relay: MakeRelay,
                                                                              sandbox: Sandbox) -> None:
    """The reverse pairing: FCM notification + data `message`; APNs background push with collapse id and expiry."""
    r = await make_relay(apps={"android": {"channel_id": "chat"}})
    await r.post(sample("message", to=[ANDROID_TOKEN]))
    await r.post(sample("event", to=[IOS_TOKEN]))
    (fcm,) = await sandbox.fcm.wait_for(1)
    m = fcm.message
    assert m["notification"] == {"title": "Webuildapps", "body": "Hello! We received your photo 📷"}
    assert m["android"]["priority"] == "high"
    assert m["android"]["notification"]["channel_id"] == "chat"
    assert m["data"]["message"] == "Hello! We received your photo 📷"
    assert json.loads(m["data"]["parley"])["object"]["id"] == 3224
    (apns,) = await sandbox.apns.wait_for(1)
    h = apns.headers
    assert h["apns-push-type"] == "background"
    assert h["apns-priority"] == "5"
    assert h["apns-collapse-id"] == "parley-typing-1"
    assert 0 < int(h["apns-expiration"]) - time.time() <= 31
    assert apns.payload["aps"] == {"content-available": 1}
    assert json.loads(apns.payload["parley"])["object"]["name"] == "startTyping"


async def test_one_webhook_fans_out_to_every_token(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """Several tokens in `to` become one delivery each, across platforms."""
    other = "cd" * 32
    r = await make_relay(devices={IOS_TOKEN: {"app": "ios"}, other: {"app": "ios"}, ANDROID_TOKEN: {"app": "android"}})
    status, answer = await r.post(sample("message", to=[IOS_TOKEN, other, ANDROID_TOKEN, IOS_TOKEN]))
    assert (status, answer["accepted"]) == (200, 3)
    apns = await sandbox.apns.wait_for(2)
    assert {a.device_token for a in apns} == {IOS_TOKEN, other}
    assert len(await sandbox.fcm.wait_for(1)) == 1


async def test_unknown_data_type_is_ignored_with_200_and_sends_nothing(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """A future Parley type is valid input: 200 `ignored`, counted, nothing stored or sent."""
    r = await make_relay()
    doc = {"data": {"type": "readReceipt", "object": {"id": 1}}, "to": [IOS_TOKEN]}
    status, answer = await r.post(doc)
    assert (status, answer["status"]) == (200, "ignored")
    stats = await r.relay.store.stats()
    assert stats.accepted == 0
    assert r.relay.metrics.webhooks.labels("ignored")._value.get() == 1
    time.sleep(0.2)
    assert sandbox.apns.requests == [] and sandbox.fcm.requests == []


async def test_unknown_event_name_is_delivered_as_silent_push(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """Any event name (not only startTyping/stopTyping) becomes a silent push."""
    r = await make_relay()
    doc = sample("event", to=[IOS_TOKEN])
    doc["data"]["object"]["name"] = "agentJoined"
    status, _ = await r.post(doc)
    assert status == 200
    (apns,) = await sandbox.apns.wait_for(1)
    assert apns.headers["apns-push-type"] == "background"


async def test_unknown_event_names_can_be_ignored_instead(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """With webhook.unknown_events: ignore, a future event name is answered 200 `ignored` and not sent."""
    r = await make_relay(webhook={"unknown_events": "ignore"})
    doc = sample("event", to=[IOS_TOKEN])
    doc["data"]["object"]["name"] = "agentJoined"
    status, answer = await r.post(doc)
    assert (status, answer["status"], answer["event"]) == (200, "ignored", "agentJoined")
    assert (await r.relay.store.stats()).accepted == 0
    status, answer = await r.post(sample("event", to=[IOS_TOKEN]))  # startTyping is still delivered
    assert (status, answer["status"]) == (200, "accepted")
    assert r.relay.metrics.webhooks.labels("ignored")._value.get() == 1


@pytest.mark.parametrize(
    ("raw", "status", "field", "words"),
    [
        (b"not json", 400, None, "not valid JSON"),
        (b"\xff\xfe{}", 400, None, "UTF-8"),
        (b"[]", 400, None, "JSON object"),
        (b'{"to": ["x"]}', 400, "data", "required"),
        (b'{"data": {"type": "message", "object": {"id": 1}}}', 400, "to", "non-empty array"),
        (b'{"data": {"type": "message", "object": {"id": 1}}, "to": []}', 400, "to", "non-empty array"),
        (b'{"data": {"type": "message", "object": {"id": 1}}, "to": [5]}', 400, "to[0]", "string"),
        (b'{"data": {"type": 3, "object": {}}, "to": ["x"]}', 400, "data.type", "string"),
        (b'{"data": {"type": "message", "object": "hi"}, "to": ["x"]}', 400, "data.object", "object"),
        (b'{"data": {"type": "message", "object": {"id": "7"}}, "to": ["x"]}', 400, "data.object.id", "integer"),
        (b'{"data": {"type": "message", "object": {"message": "x"}}, "to": ["x"]}', 400, "data.object.id", "required"),
        (b'{"data": {"type": "message", "object": {"id": 1, "agent": 5}}, "to": ["x"]}', 400, "data.object.agent",
         "object"),
        (b'{"data": {"type": "event", "object": {"body": {}}}, "to": ["x"]}', 400, "data.object.name", "string"),
        (b'{"data": {"type": "message", "object": {"id": NaN}}, "to": ["x"]}', 400, None, "not valid JSON"),
        (b'{"data": {}, "data": {}, "to": ["x"]}', 400, None, "duplicate key"),
    ],
)
async def test_bad_body_gets_400_json_error_naming_the_field(make_relay: MakeRelay, raw: bytes, status: int,
                                                             field: str | None, words: str) -> None:
    """Every malformed body class of SPEC §2 gets its status and a JSON error that names the problem."""
    r = await make_relay()
    got, answer = await r.post(raw=raw)
    assert got == status
    assert answer["status"] == "error"
    assert words in answer["error"]
    assert answer.get("field") == field
    assert (await r.relay.store.stats()).accepted == 0


async def test_tolerates_nulls_extra_fields_and_any_content_type(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """null image/agent/message, unknown fields anywhere and a text/plain Content-Type are accepted."""
    r = await make_relay()
    doc = {"data": {"type": "message", "object": {"id": 9, "image": None, "agent": None, "message": None,
                                                   "typeId": 2, "newField": {"x": [1]}}, "extra": True},
           "to": [IOS_TOKEN], "pushType": 4}
    status, answer = await r.post(raw=json.dumps(doc).encode(), headers={"Content-Type": "text/plain"})
    assert (status, answer["status"]) == (200, "accepted")
    (apns,) = await sandbox.apns.wait_for(1)
    assert apns.payload["aps"]["alert"] == {"title": "New message", "body": ""}


async def test_missing_or_wrong_static_header_gets_401(make_relay: MakeRelay) -> None:
    """The static header is required and compared exactly."""
    r = await make_relay()
    status, answer = await r.post(sample("message"), auth=False)
    assert (status, answer["error"]) == (401, "authentication failed")
    status, _ = await r.post(sample("message"), auth=False, headers={"X-Parley-Relay-Key": "wrong"})
    assert status == 401
    assert (await r.relay.store.stats()).accepted == 0


async def test_body_over_the_limit_gets_413(make_relay: MakeRelay) -> None:
    """A body over webhook.max_body_bytes is refused with 413 and a JSON error, nothing stored."""
    r = await make_relay(webhook={"max_body_bytes": 1024})
    doc = sample("message", message="x" * 2000)
    status, answer = await r.post(doc)
    assert status == 413
    assert "larger than 1024" in answer["error"]
    assert (await r.relay.store.stats()).accepted == 0


async def test_store_unavailable_gets_503_so_parley_retries(make_relay: MakeRelay) -> None:
    """When the store cannot commit, the webhook answers 503 with Retry-After (never 200)."""
    r = await make_relay()
    await r.relay.store.close()  # the store is gone: every operation now fails
    response = await r.client.post(r.relay.config.webhook.path, json=sample("message"),
                                   headers={"X-Parley-Relay-Key": "demo-shared-secret-3f9a"})
    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert "store unavailable" in (await response.json())["error"]


async def test_health_ready_and_metrics_endpoints_answer(make_relay: MakeRelay) -> None:
    """/healthz, /readyz and /metrics answer; metrics are in Prometheus text format."""
    r = await make_relay()
    assert (await r.client.get("/healthz")).status == 200
    ready = await r.client.get("/readyz")
    assert ready.status == 200, await ready.text()
    await r.post(sample("message"))
    text = await (await r.ops.get("/metrics")).text()
    assert 'parley_relay_webhooks_total{result="accepted"} 1.0' in text
    assert "parley_relay_ack_seconds_bucket" in text


async def test_demo_prints_what_each_provider_received(capsys: pytest.CaptureFixture[str]) -> None:
    """`parley-relay demo` delivers both samples through the real path and prints both providers' requests."""
    from relay.testing.demo import run_demo

    assert await run_demo() == 0
    out = capsys.readouterr().out
    assert "HTTP 200" in out
    assert '"apns-push-type": "alert"' in out
    assert '"collapse_key": "parley-typing-1"' in out
    assert "sent=2" in out


def test_apns_hex_constant_is_a_device_token() -> None:
    """Sanity for the fixtures: APNs tokens in tests are 64 hex characters."""
    assert len(APNS_HEX) == 64


async def test_device_added_by_the_cli_is_sent_by_the_running_relay_within_its_poll(make_relay: MakeRelay,
                                                                                   sandbox: Sandbox) -> None:
    """Default settings: a webhook for an unknown token waits (grace 10 min); ``parley-relay devices add``, which
    only talks to the store, releases it and the running relay sends it within its poll (about a second)."""
    import asyncio

    from relay.cli import main
    from relay.delivery.dispatcher import IDLE_POLL
    from relay.outcome import WaitReason

    r = await make_relay(delivery={})
    token = "ef" * 32
    assert (await r.post(sample("message", to=[token])))[0] == 200

    async def waiting() -> bool:
        return [d.wait_reason for d in await r.relay.store.deliveries(token=token)] == [WaitReason.UNROUTABLE]

    async with asyncio.timeout(10):
        while not await waiting():
            await asyncio.sleep(0.01)
    added = time.time()
    command = ["devices", "add", token, "--app", "ios", "--config", str(r.relay.config.source)]
    assert await asyncio.to_thread(main, command) == 0
    (push,) = await sandbox.apns.wait_for(1, timeout=10)
    print(f"CLI-added device: push reached APNs {1000 * (push.received_at - added):.0f} ms after the command")
    assert push.device_token == token and push.status == 200
    assert push.received_at - added < IDLE_POLL + 2  # the dispatcher's poll, not the 10 min grace period


async def test_trace_lines_follow_one_request_id_from_webhook_to_delivery_end(
        make_relay: MakeRelay, sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    """At INFO, a webhook's request id appears on its ``webhook accepted`` line, on each ``delivery waits`` line
    (a 503 retried) and on its ``delivery ended`` line, with app, shortened token, attempt, status, latency."""
    import logging

    from relay.observability import LOGGER_NAME, short_token

    r = await make_relay()
    sandbox.apns.respond(IOS_TOKEN, 503, "ServiceUnavailable", times=1)
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        response = await r.client.post(r.relay.config.webhook.path, json=sample("message"),
                                       headers={"X-Parley-Relay-Key": "demo-shared-secret-3f9a"})
        assert response.status == 200
        rid = response.headers["X-Request-Id"]
        assert len(rid) == 16 and int(rid, 16) >= 0  # made here: Parley sent none
        await sandbox.apns.wait_for(2)
        await r.settle()
    lines = [(rec.getMessage(), dict(getattr(rec, "fields", {}))) for rec in caplog.records]
    mine = [(name, fields) for name, fields in lines if fields.get("request_id") == rid]
    assert [name for name, _ in mine] == ["webhook accepted", "delivery waits", "delivery ended"]
    accepted, waits, ended = (fields for _, fields in mine)
    assert accepted["tokens"] == short_token(IOS_TOKEN) and accepted["accepted"] == 1
    assert accepted["message_id"] == "3224"
    assert (waits["app"], waits["attempt"], waits["status"], waits["wait"]) == ("ios", 1, 503, "retry")
    assert waits["token"] == short_token(IOS_TOKEN) and "ServiceUnavailable" in waits["reason"]
    assert (ended["state"], ended["attempt"], ended["status"]) == ("sent", 2, 200)
    assert ended["latency"] >= waits["latency"] >= 0


async def test_a_request_id_with_bytes_above_ascii_keeps_its_printable_part_and_the_push_goes_out(
        make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """HTTP lets a header carry bytes above 0x7f, which aiohttp hands over as lone surrogates. Such an
    X-Request-Id was answered 503 (the store could not keep it as text, and Parley's retries carry the same
    header: three of them and it removes the token). The relay keeps its printable ASCII part, answers 200,
    sends the push and records it under that id."""
    r = await make_relay()
    body = json.dumps(sample("message", to=[IOS_TOKEN])).encode()
    head = (f"POST {r.relay.config.webhook.path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            f"{AUTH_HEADER}: {AUTH_VALUE}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n").encode()
    reader, writer = await asyncio.open_connection(r.client.host, r.client.port)
    writer.write(head + b"X-Request-Id: ab\xff\xfe\xc3cd\r\n\r\n" + body)
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and b"\r\nX-Request-Id: abcd\r\n" in answer, answer
    await sandbox.apns.wait_for(1)
    await r.settle()
    records = await r.relay.store.deliveries(request_id="abcd")
    assert [record.state for record in records] == ["sent"]

