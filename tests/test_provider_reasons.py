"""Why a provider is unreachable, as the relay says it: the cause and the host, short; one Retry-After parser."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import uuid
from pathlib import Path

import pytest

from relay.config import ApnsApp, FcmApp, load_config
from relay.outcome import Outcome
from relay.providers.apns import ApnsProvider
from relay.providers.fcm import FcmProvider
from relay.providers.retry_after import parse_retry_after
from relay.push import ApnsPush, FcmPush
from relay.testing.fake_fcm import FakeFcm
from relay.testing.keys import make_ca
from relay.testing.process import free_port
from relay.testing.sandbox import Sandbox


def _apps(sandbox: Sandbox) -> tuple[ApnsApp, FcmApp]:
    config = load_config(sandbox.write())
    ios, android = config.apps["ios"], config.apps["android"]
    assert isinstance(ios, ApnsApp) and isinstance(android, FcmApp)
    return ios, android


async def _apns_reason(app: ApnsApp) -> str:
    provider = ApnsProvider(app)
    try:
        result = await provider.send(ApnsPush("ios", "ab" * 32, str(uuid.uuid4()), "alert", 10, None, None,
                                              {"aps": {"alert": "hi"}}))
    finally:
        await provider.close()
    assert result.outcome is Outcome.RETRY
    return result.reason


async def _fcm_reason(app: FcmApp) -> str:
    provider = await FcmProvider.create(app, timeout=10)
    try:
        result = await provider.send(FcmPush("android", "reason-" + "r" * 40, str(uuid.uuid4()), "t", "b", None,
                                             {"parley": "{}"}, "high", None, None, None))
    finally:
        await provider.close()
    assert result.outcome is Outcome.RETRY
    return result.reason


async def test_apns_unknown_host_is_named_as_a_failed_dns_lookup(sandbox: Sandbox) -> None:
    """An APNs host whose name does not resolve: the reason says DNS and names the host."""
    ios, _ = _apps(sandbox)
    reason = await _apns_reason(dataclasses.replace(ios, endpoint="https://apns.relay-test.invalid"))
    assert reason.startswith("DNS lookup of apns.relay-test.invalid failed")


async def test_apns_refused_port_is_named_with_host_and_port(sandbox: Sandbox) -> None:
    """Nothing listens at the APNs endpoint: "connection to HOST:PORT refused"."""
    ios, _ = _apps(sandbox)
    port = free_port()
    assert await _apns_reason(dataclasses.replace(ios, endpoint=f"https://127.0.0.1:{port}")) == \
        f"connection to 127.0.0.1:{port} refused"


async def test_apns_untrusted_certificate_is_named_as_a_failed_tls_handshake(sandbox: Sandbox) -> None:
    """The APNs host's certificate is not signed by a trusted CA (no ``ca_file``): the reason says so."""
    ios, _ = _apps(sandbox)
    reason = await _apns_reason(dataclasses.replace(ios, ca_file=None))
    assert reason.startswith(f"TLS handshake with 127.0.0.1:{sandbox.apns.port} failed: certificate verify failed")


async def test_fcm_unknown_host_is_named_as_a_failed_dns_lookup(sandbox: Sandbox) -> None:
    """An FCM endpoint whose name does not resolve: the reason says DNS and names the host."""
    _, android = _apps(sandbox)
    reason = await _fcm_reason(dataclasses.replace(android, endpoint="http://fcm.relay-test.invalid"))
    assert reason.startswith("UNAVAILABLE: DNS lookup of fcm.relay-test.invalid failed")


async def test_fcm_refused_port_is_named_with_host_and_port(sandbox: Sandbox) -> None:
    """Nothing listens at the FCM endpoint: "connection to HOST:PORT refused"."""
    _, android = _apps(sandbox)
    port = free_port()
    assert await _fcm_reason(dataclasses.replace(android, endpoint=f"http://127.0.0.1:{port}")) == \
        f"UNAVAILABLE: connection to 127.0.0.1:{port} refused"


async def test_fcm_untrusted_certificate_is_named_as_a_failed_tls_handshake(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An HTTPS FCM endpoint whose CA is not trusted (no ``ca_file``): the reason says so, with the host."""
    ca = make_ca()
    with FakeFcm(tls=ca) as fake:
        path = fake.make_service_account("tls-project").write(tmp_path / "firebase.json")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.write_ca_pem(tmp_path / "ca.pem")))  # the token endpoint
        reason = await _fcm_reason(FcmApp(name="android", service_account_file=path, endpoint=fake.url))
    assert reason.startswith(f"UNAVAILABLE: TLS handshake with 127.0.0.1:{fake.port} failed: "
                             "certificate verify failed")


async def test_fcm_unreachable_token_endpoint_is_named_with_host_and_port(sandbox: Sandbox, tmp_path: Path) -> None:
    """google-auth's token request refused: the reason is short, names the token host, and is no Python repr."""
    _, android = _apps(sandbox)
    port = free_port()
    info = {**sandbox.account.info, "token_uri": f"http://127.0.0.1:{port}/token"}
    path = tmp_path / "firebase.json"
    path.write_text(json.dumps(info))
    reason = await _fcm_reason(dataclasses.replace(android, service_account_file=path))
    assert reason == f"OAuth token refresh failed: connection to 127.0.0.1:{port} refused"


async def test_fcm_refused_credentials_reason_is_google_auths_message_not_a_repr(sandbox: Sandbox) -> None:
    """A refused service account: the reason is Google's error text, not the repr of google-auth's tuple."""
    _, android = _apps(sandbox)
    sandbox.fcm.unregister_service_account(sandbox.account.client_email)
    provider = await FcmProvider.create(android, timeout=10)
    try:
        failure = await provider.tokens.ensure()
    finally:
        await provider.close()
    assert failure is not None and failure.outcome is Outcome.CONFIG_ERROR
    assert failure.reason.startswith("OAuth token refresh refused: invalid_grant")
    assert "{" not in failure.reason and "(" not in failure.reason


NOW = 1_700_000_000.0


@pytest.mark.parametrize(("value", "seconds"), [
    ("7", 7.0), (" 120 ", 120.0), ("1.5", 1.5), ("0", 0.0), ("-3", 0.0),
    (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
    (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),
    (None, None), ("", None), ("soon", None), ("nan", None), ("inf", None), ("1e999", None),
])
def test_retry_after_is_read_as_seconds_or_an_http_date(value: str | None, seconds: float | None) -> None:
    """RFC 9110 Retry-After: delay-seconds or an HTTP-date (from now); anything else, or not finite, is ignored."""
    assert parse_retry_after(value, now=lambda: NOW) == seconds
