"""Egress through an HTTP CONNECT proxy: APNs (our tunnel) and FCM (aiohttp, requests), from the environment or
the app's ``proxy`` setting, against a local CONNECT proxy in front of the fakes."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from relay.config import ApnsApp, FcmApp, load_config
from relay.errors import ConfigError
from relay.outcome import Outcome
from relay.providers.apns import ApnsProvider
from relay.providers.fcm import FcmProvider
from relay.push import ApnsPush, FcmPush
from relay.testing.connect_proxy import ConnectProxy
from relay.testing.fake_fcm import FakeFcm
from relay.testing.keys import make_ca
from relay.testing.process import RelayProcess, free_port
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE, IOS_TOKEN, Sandbox, sample
from tests.test_durability import wait_ready

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy")


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConnectProxy]:
    """A local CONNECT proxy, with no proxy variable inherited from the machine running the tests."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with ConnectProxy() as running:
        yield running


def _ios(sandbox: Sandbox, **app: object) -> ApnsApp:
    ios = load_config(sandbox.write(apps={"ios": app} if app else None)).apps["ios"]
    assert isinstance(ios, ApnsApp)
    return ios


async def _send_apns(app: ApnsApp) -> tuple[Outcome, str]:
    provider = ApnsProvider(app)
    try:
        result = await provider.send(ApnsPush("ios", "ab" * 32, str(uuid.uuid4()), "alert", 10, None, None,
                                              {"aps": {"alert": "hi"}}))
    finally:
        await provider.close()
    return result.outcome, result.reason


def _fcm_push() -> FcmPush:
    return FcmPush("android", "proxy-" + "p" * 40, str(uuid.uuid4()), "t", "b", None, {"parley": "{}"}, "high",
                   None, None, None)


async def test_apns_push_reaches_apple_through_the_https_proxy_of_the_environment(
        sandbox: Sandbox, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTPS_PROXY set, the APNs connection is a CONNECT tunnel through the proxy, and the push arrives."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    assert await _send_apns(_ios(sandbox)) == (Outcome.SENT, "")
    assert proxy.tunnels == [f"127.0.0.1:{sandbox.apns.port}"]
    assert len(sandbox.apns.requests) == 1


async def test_apns_host_named_in_no_proxy_is_reached_directly(sandbox: Sandbox, proxy: ConnectProxy,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """NO_PROXY exempts the APNs host: the push arrives without a tunnel."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert await _send_apns(_ios(sandbox)) == (Outcome.SENT, "")
    assert proxy.tunnels == []


async def test_apns_app_proxy_with_credentials_is_used_without_any_environment(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's ``proxy`` (user:password in the URL, sent as Basic proxy authentication) carries the push; a wrong
    password is a retry whose reason names the proxy's refusal."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with ConnectProxy(credentials=("relay", "s3cret:/@")) as proxy:
        good = proxy.url.replace("s3cret:/@", "s3cret%3A%2F%40")
        assert await _send_apns(_ios(sandbox, proxy=good)) == (Outcome.SENT, "")
        refused = await _send_apns(_ios(sandbox, proxy=f"http://relay:wrong@127.0.0.1:{proxy.port}"))
    assert proxy.tunnels == [f"127.0.0.1:{sandbox.apns.port}"]
    assert refused == (Outcome.RETRY, f"proxy 127.0.0.1:{proxy.port} refused CONNECT to "
                                      f"127.0.0.1:{sandbox.apns.port}: 407 Proxy Authentication Required")
    assert "wrong" not in refused[1]


async def test_apns_unreachable_proxy_is_named_in_the_reason(sandbox: Sandbox, proxy: ConnectProxy) -> None:
    """A proxy that refuses connections: the reason names the proxy, not Apple's host."""
    port = free_port()
    assert await _send_apns(_ios(sandbox, proxy=f"http://127.0.0.1:{port}")) == \
        (Outcome.RETRY, f"proxy connection to 127.0.0.1:{port} refused")


async def test_fcm_token_and_push_go_through_the_proxy_from_the_environment_or_the_app(
        tmp_path: Path, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """FCM over HTTPS: with HTTPS_PROXY, and then with the app's ``proxy`` alone, both the token request
    (google-auth) and the send (aiohttp) are CONNECT tunnels through the proxy."""
    ca = make_ca()
    with FakeFcm(tls=ca) as fake:
        account = fake.make_service_account("proxy-project").write(tmp_path / "firebase.json")
        ca_file = ca.write_ca_pem(tmp_path / "ca.pem")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
        app = FcmApp(name="android", service_account_file=account, endpoint=fake.url, ca_file=ca_file)
        results = []
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        for configured in (app, dataclasses.replace(app, proxy=proxy.url)):
            provider = await FcmProvider.create(configured, timeout=10)
            try:
                results.append((await provider.send(_fcm_push())).outcome)
            finally:
                await provider.close()
            monkeypatch.delenv("HTTPS_PROXY", raising=False)
        sends = len(fake.requests)
    assert results == [Outcome.SENT, Outcome.SENT]
    assert proxy.tunnels == [f"127.0.0.1:{fake.port}"] * 4  # token + send, twice
    assert sends == 2


def test_app_proxy_must_be_an_http_url_and_the_error_hides_its_password(sandbox: Sandbox) -> None:
    """``proxy`` accepts http://[user:password@]host[:port]; anything else is a config error naming the key."""
    load_config(sandbox.write(apps={"ios": {"proxy": "http://u:p@proxy.internal:3128"},
                                    "android": {"proxy": "http://proxy.internal"}}))
    for bad in ("https://proxy.internal:3128", "socks5://proxy:1080", "http://proxy:3128/path", "proxy:3128",
                "http://u:hunter2@:3128"):
        with pytest.raises(ConfigError) as info:
            load_config(sandbox.write(apps={"ios": {"proxy": bad}}))
        assert "apps.ios.proxy" in str(info.value)
        assert "hunter2" not in str(info.value)


async def test_relay_service_delivers_apns_through_the_https_proxy_it_was_started_with(
        sandbox: Sandbox, proxy: ConnectProxy, tmp_path: Path) -> None:
    """``parley-relay serve`` (default process model) started with HTTPS_PROXY: a webhook's iOS push reaches the
    fake APNs through the proxy's tunnel."""
    port = free_port()
    config = sandbox.write(listen={"host": "127.0.0.1", "port": port})
    with RelayProcess(config, log=tmp_path / "relay.log", env={"HTTPS_PROXY": proxy.url}) as relay:
        await wait_ready(port, timeout=60)
        async with aiohttp.ClientSession(headers={AUTH_HEADER: AUTH_VALUE}) as session:
            doc = sample("message", to=[IOS_TOKEN])
            async with session.post(f"http://127.0.0.1:{port}/parley/webhook", json=doc) as response:
                assert response.status == 200
        (request,) = await sandbox.apns.wait_for(1, timeout=30)
        relay.stop()
    assert request.status == 200 and request.device_token == IOS_TOKEN
    assert proxy.tunnels and set(proxy.tunnels) == {f"127.0.0.1:{sandbox.apns.port}"}


async def test_fcm_app_proxy_with_credentials_authenticates_token_and_send(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An FCM app's ``proxy`` with user:password: the token request and the send both authenticate to it."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    ca = make_ca()
    with FakeFcm(tls=ca) as fake, ConnectProxy(credentials=("relay", "s3cret")) as proxy:
        account = fake.make_service_account("proxy-project").write(tmp_path / "firebase.json")
        ca_file = ca.write_ca_pem(tmp_path / "ca.pem")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
        app = FcmApp(name="android", service_account_file=account, endpoint=fake.url, ca_file=ca_file,
                     proxy=proxy.url)
        provider = await FcmProvider.create(app, timeout=10)
        try:
            result = await provider.send(_fcm_push())
        finally:
            await provider.close()
    assert result.outcome is Outcome.SENT
    assert (proxy.tunnels, proxy.refused) == ([f"127.0.0.1:{fake.port}"] * 2, [])
