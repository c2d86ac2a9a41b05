"""Providers: the aioapns fixes, the FCM send path, and the error tables, against the fakes over real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import firebase_admin
import pytest
from firebase_admin import messaging

from relay.config import ApnsApp, FcmApp, load_config
from relay.outcome import Outcome
from relay.providers import Bounded, create_provider
from relay.providers import apns as apns_module
from relay.providers._apns_protocol import StreamSlots
from relay.providers.apns import APNS_REASONS, ApnsProvider, classify_apns
from relay.providers.fcm import ENCODER, FcmProvider, build_message, encode_request
from relay.providers.fcm_errors import FCM_ERROR_CODES, HTTP_STATUS, RPC_STATUS, classify_fcm, classify_transport
from relay.push import ApnsPush, FcmPush
from relay.testing.fake_fcm import FCM_ERRORS
from relay.testing.sandbox import Sandbox


def _apps(sandbox: Sandbox, **overrides: object) -> tuple[ApnsApp, FcmApp]:
    config = load_config(sandbox.write(**overrides))  # type: ignore[arg-type]
    ios, android = config.apps["ios"], config.apps["android"]
    assert isinstance(ios, ApnsApp) and isinstance(android, FcmApp)
    return ios, android


def _apns_push(token: str) -> ApnsPush:
    return ApnsPush("ios", token, str(uuid.uuid4()), "alert", 10, None, None,
                    {"aps": {"alert": {"title": "t", "body": "b"}}, "parley": "{}"})


def _fcm_push(token: str) -> FcmPush:
    return FcmPush("android", token, str(uuid.uuid4()), "t", "b", None, {"parley": "{}", "message": "b"}, "high",
                   None, None, None)


async def test_apns_3000_error_answers_on_one_connection_all_complete(sandbox: Sandbox) -> None:
    """aioapns never re-opens the receive window; our protocol does: 3,000 410s on one connection all finish."""
    ios, _ = _apps(sandbox, apps={"ios": {"max_connections": 1}})
    provider = ApnsProvider(ios)
    tokens = [f"{i:064x}" for i in range(3000)]
    for token in tokens:
        sandbox.apns.respond(token, status=410, reason="Unregistered")
    try:
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(provider.send(_apns_push(t)) for t in tokens))
    finally:
        await provider.close()
    assert len(results) == 3000
    assert {(r.outcome, r.reason) for r in results} == {(Outcome.TOKEN_DEAD, "410 Unregistered")}
    assert {r.reason for r in results} == {"410 Unregistered"}
    assert sandbox.apns.connections_opened == 1  # one connection carried all ~270 KB of error bodies


async def test_apns_opens_no_more_streams_than_the_server_allows_before_its_settings_arrive(sandbox: Sandbox) -> None:
    """A new connection opens no stream before the server's SETTINGS frame (here 0.3 s after the TLS handshake,
    as on a slow network), so five sends to a server allowing two streams (and enforcing it from the start, as
    Apple may) open two and wait. Before, the client opened all five at once, assuming aioapns' 1,000, and the
    server ended the connection with PROTOCOL_ERROR: every send was a retry."""
    ios, _ = _apps(sandbox, apps={"ios": {"max_connections": 1}})
    sandbox.apns.max_concurrent_streams = 2
    sandbox.apns.settings_delay = 0.3
    sandbox.apns.hang(True)  # the two streams stay open
    provider = ApnsProvider(ios)
    sends = [asyncio.ensure_future(provider.send(_apns_push(f"{i:064x}"))) for i in range(5)]
    try:
        await sandbox.apns.wait_for(2)
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in sends), [task.result().reason for task in sends if task.done()]
        assert len(sandbox.apns.requests) == 2 and sandbox.apns.connections_opened == 1
    finally:
        for task in sends:
            task.cancel()
        await asyncio.gather(*sends, return_exceptions=True)
        await provider.close()


async def test_apns_server_that_sends_no_settings_is_unreachable_and_its_connection_closed(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose SETTINGS do not come (held 2 s; the wait is shortened from its 10 s here) is reported as
    such in the push's reason, and the half-open connection is closed, not kept in the pool."""
    monkeypatch.setattr(apns_module, "SETTINGS_TIMEOUT", 0.2)
    ios, _ = _apps(sandbox)
    sandbox.apns.settings_delay = 2
    provider = ApnsProvider(ios)
    try:
        result = await provider.send(_apns_push("a" * 64))
        assert result.outcome is Outcome.RETRY and "sent no HTTP/2 SETTINGS within 0.2 s" in result.reason
        assert provider.connections == 0
    finally:
        await provider.close()


async def test_apns_stream_slots_hold_new_streams_while_a_lowered_limit_is_exceeded() -> None:
    """The server lowers its stream limit from 4 to 1 with 3 streams open: no new stream until 1 is left open
    and then one ends (asyncio's semaphore under aioapns let new streams through while its count was negative);
    raised again, every waiting send gets its stream, also one that queued while the one ahead was being woken."""
    slots = StreamSlots(4)
    opened = [await slots.acquire() for _ in range(3)]
    assert opened == [1, 3, 5]
    slots.bound = 1
    assert slots.is_busy
    waiting = [asyncio.ensure_future(slots.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    slots.release()
    slots.release()
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)  # one stream is still open: the limit is reached
    slots.release()
    await asyncio.sleep(0)
    assert [task.done() for task in waiting] == [True, False]
    slots.bound = 10
    await asyncio.sleep(0)
    assert [task.result() for task in waiting] == [7, 9]
    # A send that queues while the one ahead of it is being woken is not left behind when there is room.
    slots.bound = 2  # both taken
    ahead = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)  # waiting
    behind = asyncio.ensure_future(slots.acquire())  # its first step runs before the woken one resumes
    slots.bound = 10
    for _ in range(3):
        await asyncio.sleep(0)
    assert (ahead.result(), behind.result()) == (11, 13)
    slots.destroy(ConnectionError("gone"))
    with pytest.raises(ConnectionError):
        await slots.acquire()


async def test_apns_sends_waiting_for_a_stream_reconnect_when_the_busy_connection_is_lost(sandbox: Sandbox) -> None:
    """The only connection (max_connections 1; the server allows 2 streams) has both streams hung and three more
    sends wait for one. The connection drops: the two hung sends are retries, and the three waiting ones open a
    new connection and are sent. aioapns' own acquire kept polling a pool with no connection left, so they
    waited for their send timeout (and a test sending 3,000 on one connection hung now and then)."""
    ios, _ = _apps(sandbox, apps={"ios": {"max_connections": 1}})
    sandbox.apns.max_concurrent_streams = 2  # read when a connection opens: its SETTINGS frame
    provider = ApnsProvider(ios)
    sandbox.apns.hang(True)
    try:
        hung = [asyncio.ensure_future(provider.send(_apns_push(f"{i:064x}"))) for i in range(2)]
        await sandbox.apns.wait_for(2)  # both streams taken, the server's settings known
        waiting = [asyncio.ensure_future(provider.send(_apns_push(f"{i:064x}"))) for i in range(2, 5)]
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in hung + waiting)
        sandbox.apns.hang(False)
        sandbox.apns.drop_connections()
        async with asyncio.timeout(10):
            lost = await asyncio.gather(*hung)
            sent = await asyncio.gather(*waiting)
    finally:
        await provider.close()
    assert [r.outcome for r in lost] == [Outcome.RETRY] * 2 and all("lost" in r.reason for r in lost)
    assert [r.outcome for r in sent] == [Outcome.SENT] * 3
    assert sandbox.apns.connections_opened == 2


async def test_apns_one_provider_jwt_is_shared_by_all_connections(sandbox: Sandbox) -> None:
    """Several HTTP/2 connections of one key present the same JWT (Apple throttles refreshes)."""
    ios, _ = _apps(sandbox, apps={"ios": {"max_connections": 3}})
    provider = ApnsProvider(ios)
    sandbox.apns.set_delay(0.3)  # keep streams busy so that the pool opens more connections
    try:
        pushes = [_apns_push(f"{i:064x}") for i in range(3)]
        # each connection takes up to 1000 streams: shrink the first to one to force new ones, after a
        # first exchange (the server's SETTINGS would otherwise reset the bound)
        assert (await provider.send(_apns_push("00" * 32))).outcome is Outcome.SENT
        first = await provider._pools["production"].acquire()
        first.free_channels.bound = 1
        results = await asyncio.gather(*(provider.send(p) for p in pushes))
    finally:
        sandbox.apns.set_delay(0)
        await provider.close()
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert sandbox.apns.connections_opened >= 2
    assert len(sandbox.apns.jwts_seen) == 1
    assert provider.jwt is not None and provider.jwt.minted == 1


async def test_apns_retry_after_and_reason_reach_the_classifier(sandbox: Sandbox) -> None:
    """A 429 with Retry-After is classified retry with the provider's delay (aioapns drops the header)."""
    ios, _ = _apps(sandbox)
    provider = ApnsProvider(ios)
    token = "ef" * 32
    sandbox.apns.respond(token, status=429, reason="TooManyRequests", retry_after=7)
    try:
        result = await provider.send(_apns_push(token))
    finally:
        await provider.close()
    assert (result.outcome, result.status, result.retry_after) == (Outcome.RETRY, 429, 7.0)


async def test_apns_hanging_server_is_a_retry_after_the_send_timeout(sandbox: Sandbox) -> None:
    """aioapns has no timeout; the Bounded wrapper turns a hang into a retry."""
    ios, _ = _apps(sandbox)
    provider = Bounded(ApnsProvider(ios), concurrency=10, timeout=0.3)
    sandbox.apns.hang(True)
    try:
        started = time.monotonic()
        result = await provider.send(_apns_push("aa" * 32))
        assert time.monotonic() - started < 2
    finally:
        sandbox.apns.recover()
        await provider.close()
    assert result.outcome is Outcome.RETRY and "timeout" in result.reason


async def test_apns_dropped_connection_is_a_retry_and_the_next_send_reconnects(sandbox: Sandbox) -> None:
    """A connection dropped mid-request is classified retry; the pool reconnects for the next send."""
    ios, _ = _apps(sandbox)
    provider = ApnsProvider(ios)
    sandbox.apns.hang(True)
    try:
        pending = asyncio.ensure_future(provider.send(_apns_push("bb" * 32)))
        await sandbox.apns.wait_for(1)
        sandbox.apns.drop_connections()
        result = await asyncio.wait_for(pending, 5)
        sandbox.apns.recover()
        again = await provider.send(_apns_push("bb" * 32))
    finally:
        sandbox.apns.recover()
        await provider.close()
    assert result.outcome is Outcome.RETRY
    assert again.outcome is Outcome.SENT


@pytest.mark.parametrize(
    ("status", "reason", "outcome"),
    [(200, None, Outcome.SENT)] + [(s, r, o) for (s, r), o in APNS_REASONS.items()] + [
        (400, "BadCollapseId", Outcome.PERMANENT),
        (403, "SomethingNew", Outcome.CONFIG_ERROR),
        (502, None, Outcome.RETRY),
    ],
)
def test_apns_error_table_classifies_every_documented_answer(status: int, reason: str | None,
                                                             outcome: Outcome) -> None:
    """Apple's documented (status, reason) pairs map to the relay's outcome classes."""
    assert classify_apns(status, reason).outcome is outcome


async def test_fcm_token_refresh_never_blocks_the_event_loop(sandbox: Sandbox) -> None:
    """The OAuth token endpoint takes 0.8 s; meanwhile the loop keeps turning (worst lag printed)."""
    _, android = _apps(sandbox)
    sandbox.fcm.token_delay = 0.8
    provider = await FcmProvider.create(android, timeout=10)
    lags: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    probe_task = asyncio.ensure_future(probe())
    try:
        started = time.perf_counter()
        assert await provider.tokens.ensure() is None  # what send() does first when the token is stale
        refresh = time.perf_counter() - started
        refresh_lags = list(lags)
        results = await asyncio.gather(*(provider.send(_fcm_push(f"tok-{i}-" + "x" * 40)) for i in range(20)))
    finally:
        stop.set()
        await probe_task
        sandbox.fcm.token_delay = 0
        await provider.close()
    assert refresh >= 0.8
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert sandbox.fcm.token_requests == 1  # the sends reused the token fetched off the loop
    print(f"token fetch {refresh * 1000:.0f} ms; worst event-loop lag meanwhile {max(refresh_lags) * 1000:.1f} ms "
          f"over {len(refresh_lags)} probes")
    assert len(refresh_lags) > 40  # the loop kept turning every ~10 ms through the whole fetch
    assert max(refresh_lags) < 0.05, f"event loop blocked for {max(refresh_lags):.3f}s"


async def test_fcm_sends_reuse_the_providers_pooled_connections(sandbox: Sandbox) -> None:
    """One aiohttp pool per app, as large as its concurrency, and kept: a second round opens no connection."""
    _, android = _apps(sandbox, apps={"android": {"concurrency": 4}})
    provider = await FcmProvider.create(android, timeout=10)  # unbounded: the pool alone holds sends back
    sandbox.fcm.set_delay(0.02)  # keep requests in flight together, so that the pool fills up
    try:
        first = await asyncio.gather(*(provider.send(_fcm_push(f"pool-{i}-" + "y" * 40)) for i in range(40)))
        peers = {r.peer for r in sandbox.fcm.requests}
        sandbox.fcm.clear()
        second = await asyncio.gather(*(provider.send(_fcm_push(f"pool-{i}-" + "y" * 40)) for i in range(40)))
    finally:
        sandbox.fcm.recover()
        await provider.close()
    assert {r.outcome for r in first + second} == {Outcome.SENT}
    assert len(peers) == 4  # one HTTP/1.1 connection per send in flight, never more
    assert {r.peer for r in sandbox.fcm.requests} <= peers  # reused for the provider's lifetime
    assert len(sandbox.fcm.requests) == 40  # one POST per push


@pytest.mark.parametrize(
    ("error_code", "outcome"),
    [
        ("UNREGISTERED", Outcome.TOKEN_DEAD),
        ("SENDER_ID_MISMATCH", Outcome.MISMATCH),
        ("INVALID_ARGUMENT", Outcome.TOKEN_DEAD),  # the fake's INVALID_ARGUMENT names message.token
        ("QUOTA_EXCEEDED", Outcome.RETRY),
        ("UNAVAILABLE", Outcome.RETRY),
        ("INTERNAL", Outcome.RETRY),
        ("THIRD_PARTY_AUTH_ERROR", Outcome.CONFIG_ERROR),
    ],
)
async def test_fcm_error_codes_are_classified_from_real_error_bodies(sandbox: Sandbox, error_code: str,
                                                                    outcome: Outcome) -> None:
    """Each FCM error code, in the error body the fake sends like Google, gets its outcome class (no resend)."""
    _, android = _apps(sandbox)
    provider = await FcmProvider.create(android, timeout=10)
    token = f"err-{error_code}-" + "z" * 40
    sandbox.fcm.respond(token, error_code=error_code, retry_after=3)
    try:
        result = await provider.send(_fcm_push(token))
    finally:
        await provider.close()
    assert result.outcome is outcome
    assert error_code in result.reason and result.status == FCM_ERRORS[error_code][0]
    if outcome is Outcome.RETRY:
        assert result.retry_after == 3.0
    assert len(sandbox.fcm.requests) == 1 and sandbox.fcm.token_requests == 1  # a 401 with an FcmError: no refresh


def _rpc(status: int, name: str, message: str = "m", fcm: str | None = None, field: str | None = None) -> bytes:
    """A google.rpc.Status error body as FCM HTTP v1 sends it."""
    details: list[dict[str, object]] = []
    if fcm:
        details.append({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm})
    if field:
        details.append({"@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": field, "description": "Invalid"}]})
    return json.dumps({"error": {"code": status, "message": message, "status": name, "details": details}}).encode()


# (row, HTTP status, body, headers, outcome, retry_after). Each row names the firebase-admin exception the same
# answer used to raise (the relay's table before issue 14), so that the table visibly kept every row.
FCM_TABLE: list[tuple[str, int, bytes, dict[str, str], Outcome, float | None]] = [
    ("sent", 200, b'{"name": "projects/p/messages/0:1"}', {}, Outcome.SENT, None),
    ("UnregisteredError", 404, _rpc(404, "NOT_FOUND", fcm="UNREGISTERED"), {}, Outcome.TOKEN_DEAD, None),
    ("UnregisteredError (code wins)", 400, _rpc(400, "INVALID_ARGUMENT", fcm="UNREGISTERED"), {},
     Outcome.TOKEN_DEAD, None),
    ("SenderIdMismatchError (judged in context)", 403, _rpc(403, "PERMISSION_DENIED", fcm="SENDER_ID_MISMATCH"),
     {}, Outcome.MISMATCH, None),
    ("ThirdPartyAuthError", 401, _rpc(401, "UNAUTHENTICATED", fcm="THIRD_PARTY_AUTH_ERROR"), {},
     Outcome.CONFIG_ERROR, None),
    ("ThirdPartyAuthError (APNS_AUTH_ERROR)", 403, _rpc(403, "PERMISSION_DENIED", fcm="APNS_AUTH_ERROR"), {},
     Outcome.CONFIG_ERROR, None),
    ("QuotaExceededError", 429, _rpc(429, "RESOURCE_EXHAUSTED", fcm="QUOTA_EXCEEDED"), {"Retry-After": "30"},
     Outcome.RETRY, 30.0),
    ("UnauthenticatedError", 401, _rpc(401, "UNAUTHENTICATED"), {}, Outcome.CONFIG_ERROR, None),
    ("UnauthenticatedError (no body)", 401, b"", {}, Outcome.CONFIG_ERROR, None),
    ("PermissionDeniedError", 403, _rpc(403, "PERMISSION_DENIED"), {}, Outcome.CONFIG_ERROR, None),
    ("NotFoundError (wrong project)", 404, _rpc(404, "NOT_FOUND"), {}, Outcome.CONFIG_ERROR, None),
    ("NotFoundError (no body)", 404, b"<html>Not Found</html>", {}, Outcome.CONFIG_ERROR, None),
    ("ResourceExhaustedError", 429, _rpc(429, "RESOURCE_EXHAUSTED"), {"retry-after": "7"}, Outcome.RETRY, 7.0),
    ("UnavailableError", 503, _rpc(503, "UNAVAILABLE", fcm="UNAVAILABLE"), {"Retry-After": "5"}, Outcome.RETRY, 5.0),
    ("UnavailableError (no body)", 503, b"Service Unavailable", {}, Outcome.RETRY, None),
    ("InternalError", 500, _rpc(500, "INTERNAL", fcm="INTERNAL"), {}, Outcome.RETRY, None),
    ("InternalError (no body)", 500, b"", {}, Outcome.RETRY, None),
    ("DeadlineExceededError", 504, _rpc(504, "DEADLINE_EXCEEDED"), {}, Outcome.RETRY, None),
    ("UnknownError (unmapped status)", 502, b"Bad Gateway", {}, Outcome.RETRY, None),
    ("UnknownError (rpc UNKNOWN)", 500, _rpc(500, "UNKNOWN"), {}, Outcome.RETRY, None),
    ("UnknownError (unknown rpc name)", 418, _rpc(418, "SOMETHING_NEW"), {}, Outcome.RETRY, None),
    ("UnknownError (HTTP-date Retry-After in the past)", 502, b"", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
     Outcome.RETRY, 0.0),
    ("AbortedError", 409, _rpc(409, "ABORTED"), {}, Outcome.RETRY, None),
    ("CancelledError", 499, _rpc(499, "CANCELLED"), {}, Outcome.RETRY, None),
    ("InvalidArgumentError about the token (field)", 400,
     _rpc(400, "INVALID_ARGUMENT", "Invalid value", fcm="INVALID_ARGUMENT", field="message.token"), {},
     Outcome.TOKEN_DEAD, None),
    ("InvalidArgumentError about the token (text)", 400,
     _rpc(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token"), {},
     Outcome.TOKEN_DEAD, None),
    ("InvalidArgumentError", 400,
     _rpc(400, "INVALID_ARGUMENT", "Invalid value at 'message.android.ttl'", field="message.android.ttl"), {},
     Outcome.PERMANENT, None),
    ("InvalidArgumentError (no body)", 400, b"Bad Request", {}, Outcome.PERMANENT, None),
    ("PermissionDeniedError (no body)", 403, b"", {}, Outcome.CONFIG_ERROR, None),
    ("ResourceExhaustedError (no body)", 429, b"", {"Retry-After": "2"}, Outcome.RETRY, 2.0),
    ("FailedPreconditionError", 412, b"", {}, Outcome.PERMANENT, None),
    ("ConflictError", 409, b"", {}, Outcome.PERMANENT, None),
    ("OutOfRangeError", 400, _rpc(400, "OUT_OF_RANGE"), {}, Outcome.PERMANENT, None),
    ("AlreadyExistsError", 409, _rpc(409, "ALREADY_EXISTS"), {}, Outcome.PERMANENT, None),
    ("DataLossError", 500, _rpc(500, "DATA_LOSS"), {}, Outcome.PERMANENT, None),
    ("FailedPreconditionError (rpc)", 400, _rpc(400, "FAILED_PRECONDITION"), {}, Outcome.PERMANENT, None),
    ("ConflictError (rpc)", 409, _rpc(409, "CONFLICT"), {}, Outcome.PERMANENT, None),
]


@pytest.mark.parametrize(("row", "status", "body", "headers", "outcome", "retry_after"), FCM_TABLE,
                         ids=[row[0] for row in FCM_TABLE])
def test_fcm_error_table_classifies_every_answer(row: str, status: int, body: bytes, headers: dict[str, str],
                                                 outcome: Outcome, retry_after: float | None) -> None:
    """Every (status, google.rpc.Status body, headers) FCM can answer maps to the relay's outcome class."""
    result = classify_fcm(status, body, headers)
    assert (result.outcome, result.status) == (outcome, status)
    if outcome is Outcome.RETRY:
        assert result.retry_after == retry_after


def test_fcm_error_table_rows_cover_every_code_the_classifier_knows() -> None:
    """The table above has a row for each FcmError code, rpc status name and mapped HTTP status of fcm_errors."""
    errors = [json.loads(body)["error"] for _, _, body, _, _, _ in FCM_TABLE if body.startswith(b'{"error"')]
    codes = {d["errorCode"] for e in errors for d in e["details"] if "errorCode" in d}
    plain = {status for _, status, body, _, _, _ in FCM_TABLE if not body.startswith(b"{")}
    assert set(FCM_ERROR_CODES) <= codes
    assert set(RPC_STATUS) <= {e["status"] for e in errors}
    assert set(HTTP_STATUS) <= plain


@pytest.mark.parametrize("exc", [TimeoutError(), aiohttp.ServerTimeoutError("read"),
                                 aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("truncated"),
                                 aiohttp.ClientOSError(111, "Connection refused")])
def test_fcm_no_answer_is_a_retry(exc: BaseException) -> None:
    """Timeouts, refused or dropped connections and broken responses are transient."""
    assert classify_transport(exc).outcome is Outcome.RETRY


def test_fcm_encoder_seam_in_firebase_admin_is_where_the_relay_expects_it() -> None:
    """The relay encodes with firebase-admin's private MessageEncoder, the one its messaging service sends with."""
    moved = (f"firebase-admin {firebase_admin.__version__} changed its message encoder "
             "(firebase_admin._messaging_encoder.MessageEncoder, used as messaging._MessagingService.JSON_ENCODER); "
             "relay/providers/fcm.py encodes with it: adapt the seam there, or keep the firebase-admin pin in "
             "pyproject.toml")
    encoder_module = importlib.import_module("firebase_admin._messaging_encoder")
    assert isinstance(getattr(encoder_module, "MessageEncoder", None), type), moved
    service: Any = getattr(messaging, "_MessagingService", None)
    assert isinstance(getattr(service, "JSON_ENCODER", None), encoder_module.MessageEncoder), moved
    push = FcmPush("android", "tok-" + "s" * 40, "m1", "Agent", "Hi 📷", "https://example.com/a.png",
                   {"parley": "{}", "message": "Hi 📷"}, "high", 30, "parley-1", "chat")
    message = build_message(push)
    assert service.JSON_ENCODER.default(message) == ENCODER.default(message), moved
    assert json.loads(encode_request(push)) == {"message": {
        "token": push.token, "data": {"parley": "{}", "message": "Hi 📷"},
        "notification": {"title": "Agent", "body": "Hi 📷", "image": "https://example.com/a.png"},
        "android": {"priority": "high", "ttl": "30s", "collapse_key": "parley-1",
                    "notification": {"channel_id": "chat"}},
    }}, moved
    with pytest.raises(ValueError, match="priority"):  # firebase-admin's validation still runs
        ENCODER.default(build_message(dataclasses.replace(push, priority="urgent")))  # type: ignore[arg-type]


async def test_fcm_message_firebase_admin_rejects_is_permanent_and_never_sent(sandbox: Sandbox) -> None:
    """A push firebase-admin's validation refuses is dead-lettered (permanent), not retried, and not posted."""
    _, android = _apps(sandbox)
    provider = await FcmProvider.create(android, timeout=10)
    bad = dataclasses.replace(_fcm_push("bad-" + "v" * 40), priority="urgent")  # type: ignore[arg-type]
    try:
        result = await provider.send(bad)
    finally:
        await provider.close()
    assert result.outcome is Outcome.PERMANENT and "priority" in result.reason
    assert sandbox.fcm.requests == []


async def test_fcm_revoked_access_token_is_refreshed_once_and_the_sends_go_through(sandbox: Sandbox) -> None:
    """FCM answers 401 to every send in flight: one refresh (off the loop) for all of them, each resent once."""
    _, android = _apps(sandbox)
    provider = await create_provider(android, timeout=10)
    try:
        assert (await provider.send(_fcm_push("first-" + "u" * 40))).outcome is Outcome.SENT
        sandbox.fcm.revoke_tokens()
        results = await asyncio.gather(*(provider.send(_fcm_push(f"re-{i}-" + "u" * 40)) for i in range(20)))
    finally:
        await provider.close()
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert sandbox.fcm.token_requests == 2  # the first token, and one refresh shared by the 20 sends
    assert sorted(r.status for r in sandbox.fcm.requests[1:]) == [200] * 20 + [401] * 20


async def test_fcm_401_after_a_fresh_token_is_a_config_error(sandbox: Sandbox) -> None:
    """A 401 that a fresh access token does not cure is a config error, after exactly one refresh and resend."""
    _, android = _apps(sandbox)
    provider = await create_provider(android, timeout=10)
    try:
        await provider.send(_fcm_push("warm-" + "t" * 40))
        sandbox.fcm.fail_all(status=401, error_code=None)
        result = await provider.send(_fcm_push("auth-" + "t" * 40))
    finally:
        sandbox.fcm.recover()
        await provider.close()
    assert (result.outcome, result.status) == (Outcome.CONFIG_ERROR, 401)
    assert "UNAUTHENTICATED" in result.reason
    assert sandbox.fcm.token_requests == 2
    assert [r.status for r in sandbox.fcm.requests] == [200, 401, 401]


async def test_fcm_hanging_server_is_a_retry_after_the_send_timeout(sandbox: Sandbox) -> None:
    """A send FCM never answers ends as a retry when the send timeout expires."""
    _, android = _apps(sandbox)
    provider = await create_provider(android, timeout=0.3)
    try:
        await provider.send(_fcm_push("warm-" + "h" * 40))
        sandbox.fcm.hang(True)
        result = await provider.send(_fcm_push("hang-" + "h" * 40))
    finally:
        sandbox.fcm.recover()
        await provider.close()
    assert result.outcome is Outcome.RETRY and "time" in result.reason.lower()


async def test_fcm_over_tls_trusts_the_configured_ca_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``ca_file`` the provider verifies an HTTPS endpoint against that CA; without it the send is a retry."""
    from relay.testing.fake_fcm import FakeFcm
    from relay.testing.keys import make_ca

    ca = make_ca()
    with FakeFcm(tls=ca) as fake:
        account = fake.make_service_account("tls-project")
        path = account.write(tmp_path / "firebase.json")
        ca_file = ca.write_ca_pem(tmp_path / "ca.pem")
        # The token endpoint (the account's token_uri, here the same fake) is google-auth's business: requests
        # trusts the system store, or REQUESTS_CA_BUNDLE. ca_file is for the FCM endpoint.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
        trusted = await FcmProvider.create(FcmApp(name="android", service_account_file=path, endpoint=fake.url,
                                                         ca_file=ca_file), timeout=10)
        untrusted = await FcmProvider.create(FcmApp(name="android", service_account_file=path, endpoint=fake.url),
                                             timeout=10)
        try:
            ok = await trusted.send(_fcm_push("tls-" + "p" * 40))
            refused = await untrusted.send(_fcm_push("tls-" + "p" * 40))
        finally:
            await trusted.close()
            await untrusted.close()
        (request,) = fake.requests
    assert fake.url.startswith("https://")
    assert ok.outcome is Outcome.SENT and request.project == "tls-project"
    assert refused.outcome is Outcome.RETRY and "certificate" in refused.reason.lower()


async def test_fcm_honours_the_proxy_environment_like_firebase_admin_did(sandbox: Sandbox,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP(S)_PROXY routes FCM sends through the proxy (here a closed port: a retry), NO_PROXY exempts a host."""
    from relay.testing.process import free_port

    _, android = _apps(sandbox)
    # The token endpoint stays at 127.0.0.1 (google-auth's requests reads the same variables); FCM is "localhost".
    android = dataclasses.replace(android, endpoint=sandbox.fcm.url.replace("127.0.0.1", "localhost"))
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    proxied = await FcmProvider.create(android, timeout=5)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    direct = await FcmProvider.create(android, timeout=5)
    try:
        via_proxy = await proxied.send(_fcm_push("proxy-" + "x" * 40))
        fcm_seen = len(sandbox.fcm.requests)
        not_via_proxy = await direct.send(_fcm_push("proxy-" + "x" * 40))
    finally:
        await proxied.close()
        await direct.close()
    assert via_proxy.outcome is Outcome.RETRY and "UNAVAILABLE" in via_proxy.reason and fcm_seen == 0
    assert proxied.tokens.refreshes == 1  # the token came; the send went to the (closed) proxy
    assert not_via_proxy.outcome is Outcome.SENT


async def test_fcm_refused_credentials_are_a_config_error_without_blocking(sandbox: Sandbox) -> None:
    """A service account the token endpoint refuses is a config error (the push is kept), not a crash."""
    _, android = _apps(sandbox)
    sandbox.fcm.unregister_service_account(sandbox.account.client_email)
    provider = await create_provider(android, timeout=5)
    try:
        result = await provider.send(_fcm_push("cfg-" + "w" * 40))
    finally:
        await provider.close()
    assert result.outcome is Outcome.CONFIG_ERROR
    assert "refused" in result.reason


def test_unreadable_apns_key_is_a_config_error_naming_file_and_key(sandbox: Sandbox, tmp_path: Path) -> None:
    """A key file that is not an EC P-256 key fails at start with the file and the config key named."""
    bad = sandbox.root / "AuthKey.p8"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    ios, _ = _apps(sandbox)
    from relay.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        ApnsProvider(ios)
    assert "AuthKey.p8" in str(info.value) and "apps.ios.key_file" in str(info.value)


async def test_refused_connections_are_retries_for_both_providers(sandbox: Sandbox) -> None:
    """A provider host that refuses TCP connections is a transient failure (retry), not an error."""
    from relay.testing.process import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    ios, android = _apps(sandbox, apps={"ios": {"endpoint": closed.replace("http", "https")},
                                        "android": {"endpoint": closed}})
    apns = ApnsProvider(ios)
    fcm = await FcmProvider.create(android, timeout=5)
    try:
        apns_result = await apns.send(_apns_push("cc" * 32))
        fcm_result = await fcm.send(_fcm_push("refused-" + "r" * 40))
    finally:
        await apns.close()
        await fcm.close()
    assert apns_result.outcome is Outcome.RETRY and "connect" in apns_result.reason
    assert fcm_result.outcome is Outcome.RETRY


async def test_apns_certificate_auth_sends_without_a_jwt(tmp_path: Path) -> None:
    """An app configured with cert_file authenticates by TLS client certificate (no provider token)."""
    from relay.testing.fake_apns import FakeApns
    from relay.testing.keys import make_ca

    client_ca = make_ca()
    with FakeApns(client_ca=client_ca) as fake:
        cert = client_ca.write_client_cert(tmp_path / "apns-cert.pem")
        app = ApnsApp(name="ios", topic="com.example.parleyapp", cert_file=cert, endpoint=fake.url,
                      ca_file=Path(fake.ca_file), concurrency=10, max_connections=1)
        provider = ApnsProvider(app)
        try:
            result = await provider.send(_apns_push("dd" * 32))
        finally:
            await provider.close()
        (request,) = fake.requests
    assert result.outcome is Outcome.SENT
    assert "authorization" not in request.headers


# -- APNs environments: one pool per (app, environment), one JWT --------------------------------------------


async def test_apns_sandbox_fallback_sends_a_development_token_and_says_so(sandbox: Sandbox) -> None:
    """Production's 400 BadDeviceToken for a push of unknown environment: one try on the sandbox host, which
    accepts; the result is sent and names the environment learned. Both hosts saw the same (one) JWT."""
    apple_sandbox = sandbox.start_apns_sandbox()
    ios, _ = _apps(sandbox)
    token = "de" * 32
    sandbox.apns.accept_only([])
    apple_sandbox.accept_only([token])
    provider = ApnsProvider(ios)
    try:
        result = await provider.send(_apns_push(token))
    finally:
        await provider.close()
    assert (result.outcome, result.learned_environment) == (Outcome.SENT, "sandbox")
    assert [(r.status, r.reason) for r in sandbox.apns.requests] == [(400, "BadDeviceToken")]
    assert [r.status for r in apple_sandbox.requests] == [200]
    assert sandbox.apns.jwts_seen == apple_sandbox.jwts_seen and len(apple_sandbox.jwts_seen) == 1
    assert provider.jwt is not None and provider.jwt.minted == 1
    assert apple_sandbox.requests[0].headers["apns-id"] == sandbox.apns.requests[0].headers["apns-id"]


@pytest.mark.parametrize("environment", ["sandbox", "production"])
async def test_apns_push_of_a_known_environment_goes_to_that_host_only(sandbox: Sandbox, environment: str) -> None:
    """A push that carries its environment is sent to that host, on that environment's own connection."""
    apple_sandbox = sandbox.start_apns_sandbox()
    ios, _ = _apps(sandbox)
    provider = ApnsProvider(ios)
    push = _apns_push("ab" * 32).to_environment("sandbox" if environment == "sandbox" else "production")
    try:
        result = await provider.send(push)
    finally:
        await provider.close()
    hit, missed = (apple_sandbox, sandbox.apns) if environment == "sandbox" else (sandbox.apns, apple_sandbox)
    assert (result.outcome, result.learned_environment) == (Outcome.SENT, None)
    assert (len(hit.requests), hit.connections_opened, missed.requests, missed.connections_opened) == (1, 1, [], 0)


async def test_apns_no_fallback_when_one_endpoint_serves_both_environments(sandbox: Sandbox) -> None:
    """With ``endpoint`` alone (no ``sandbox_endpoint``) both environments are one host: BadDeviceToken is dead
    after one request, as asking the same host again would tell nothing."""
    ios, _ = _apps(sandbox)
    token = "df" * 32
    sandbox.apns.respond(token, 400, "BadDeviceToken")
    provider = ApnsProvider(ios)
    try:
        result = await provider.send(_apns_push(token))
    finally:
        await provider.close()
    assert (result.outcome, result.reason) == (Outcome.TOKEN_DEAD, "400 BadDeviceToken")
    assert len(sandbox.apns.requests) == 1


async def test_apns_unreachable_sandbox_leaves_production_verdict(sandbox: Sandbox) -> None:
    """A sandbox host that refuses connections spends the one try: the token is dead as production said, with
    the sandbox's failure in the reason (never a retry that would hold the app's deliveries back)."""
    from relay.testing.process import free_port

    port = free_port()
    ios, _ = _apps(sandbox, apps={"ios": {"sandbox_endpoint": f"https://127.0.0.1:{port}"}})
    token = "ee" * 32
    sandbox.apns.respond(token, 400, "BadDeviceToken")
    provider = ApnsProvider(ios)
    try:
        result = await provider.send(_apns_push(token))
    finally:
        await provider.close()
    assert result.outcome is Outcome.TOKEN_DEAD and result.status == 400
    assert result.reason == f"400 BadDeviceToken (sandbox: connection to 127.0.0.1:{port} refused)"
