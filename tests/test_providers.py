"""Providers: the aioapns and firebase-admin fixes, and the error tables, against the fakes over real sockets."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from firebase_admin import exceptions, messaging

from relay.config import ApnsApp, FcmApp, Policy, load_config
from relay.outcome import Outcome
from relay.providers import Bounded, create_provider
from relay.providers.apns import APNS_REASONS, ApnsProvider, classify_apns
from relay.providers.fcm import FcmProvider, classify_fcm
from relay.push import ApnsPush, FcmPush
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
        (413, "PayloadTooLarge", Outcome.PERMANENT),
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


async def test_fcm_concurrent_sends_share_batches(sandbox: Sandbox) -> None:
    """Sends issued together go out in a few send_each_async batches (slices of 16), not one call each."""
    _, android = _apps(sandbox)
    provider = await FcmProvider.create(android, timeout=10)
    try:
        await provider.tokens.ensure()
        results = await asyncio.gather(*(provider.send(_fcm_push(f"batch-{i}-" + "y" * 40)) for i in range(50)))
    finally:
        await provider.close()
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert provider.batches == 4  # 16 + 16 + 16 + 2
    assert len(sandbox.fcm.requests) == 50


@pytest.mark.parametrize(
    ("error_code", "outcome"),
    [
        ("UNREGISTERED", Outcome.TOKEN_DEAD),
        ("SENDER_ID_MISMATCH", Outcome.TOKEN_DEAD),
        ("INVALID_ARGUMENT", Outcome.TOKEN_DEAD),  # the fake's INVALID_ARGUMENT names message.token
        ("QUOTA_EXCEEDED", Outcome.RETRY),
        ("UNAVAILABLE", Outcome.RETRY),
        ("INTERNAL", Outcome.RETRY),
        ("THIRD_PARTY_AUTH_ERROR", Outcome.CONFIG_ERROR),
    ],
)
async def test_fcm_error_codes_are_classified_from_real_error_bodies(sandbox: Sandbox, error_code: str,
                                                                    outcome: Outcome) -> None:
    """Each FCM error code, as firebase-admin raises it from Google's error body, gets its outcome class."""
    _, android = _apps(sandbox)
    provider = await FcmProvider.create(android, timeout=10)
    token = f"err-{error_code}-" + "z" * 40
    sandbox.fcm.respond(token, error_code=error_code)
    try:
        result = await provider.send(_fcm_push(token))
    finally:
        await provider.close()
    assert result.outcome is outcome
    assert error_code in result.reason or result.status is not None


def test_fcm_invalid_argument_not_about_the_token_is_permanent() -> None:
    """INVALID_ARGUMENT about something else than the token is a permanent refusal (dead letter)."""
    exc = exceptions.InvalidArgumentError("Invalid value at 'message.android.ttl'")
    assert classify_fcm(exc).outcome is Outcome.PERMANENT
    assert classify_fcm(messaging.UnregisteredError("gone")).outcome is Outcome.TOKEN_DEAD
    assert classify_fcm(None).outcome is Outcome.SENT


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
    from tests.test_durability import free_port

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
        app = ApnsApp("ios", "com.example.parleyapp", "production", None, None, None, cert, fake.url,
                      Path(fake.ca_file), 10, 1, Policy())
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
    from tests.test_durability import free_port

    ios, _ = _apps(sandbox, apps={"ios": {"sandbox_endpoint": f"https://127.0.0.1:{free_port()}"}})
    token = "ee" * 32
    sandbox.apns.respond(token, 400, "BadDeviceToken")
    provider = ApnsProvider(ios)
    try:
        result = await provider.send(_apns_push(token))
    finally:
        await provider.close()
    assert result.outcome is Outcome.TOKEN_DEAD and result.status == 400
    assert result.reason == "400 BadDeviceToken (sandbox: cannot connect to APNs)"
