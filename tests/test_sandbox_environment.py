"""APNs environments: a development build's token (valid only on Apple's sandbox host) is delivered, not killed.

Two fake APNs play Apple's two hosts over real HTTP/2 + TLS, driven by the real aioapns client: production
answers ``400 BadDeviceToken`` for the development tokens, the sandbox knows only those. Everything runs at the
default settings an operator gets (``sandbox_fallback`` on).
"""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from relay.config import load_config
from relay.config.model import StoreSettings
from relay.http.app import create_ops_app
from relay.outcome import EndState
from relay.registry.device import Device
from relay.running import RELAY_KEY
from relay.runtime.relay import create_app, reload
from relay.store import create_store
from relay.testing.fake_apns import FakeApns
from relay.testing.sandbox import Sandbox, sample
from tests.conftest import REDIS_URL, MakeRelay, RelayUnderTest, delete_redis_keys, redis_unavailable


def _apns_hex() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


@pytest.fixture
def hosts(sandbox: Sandbox) -> tuple[FakeApns, FakeApns, str, str]:
    """(production fake, sandbox fake, a production build's token, a development build's token)."""
    production_token, development_token = _apns_hex(), _apns_hex()
    apple_sandbox = sandbox.start_apns_sandbox()
    sandbox.apns.accept_only([production_token])
    apple_sandbox.accept_only([development_token])
    return sandbox.apns, apple_sandbox, production_token, development_token


async def _ended(r: RelayUnderTest) -> dict[EndState, int]:
    await r.settle()
    return {end: n for end, n in (await r.relay.store.stats()).ended.items() if n}


async def test_a_development_token_is_delivered_through_the_sandbox_and_remembered(
        make_relay: MakeRelay, hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """Production says BadDeviceToken, the sandbox accepts: sent, not dead; the next push goes straight to the
    sandbox (production sees no second request), and the store keeps the device token's environment."""
    production, apple_sandbox, _, development = hosts
    r = await make_relay(devices={development: {"app": "ios"}})
    await r.post(sample("message", to=[development]))
    assert await _ended(r) == {EndState.SENT: 1}
    assert [(q.device_token, q.status, q.reason) for q in production.requests] == [
        (development, 400, "BadDeviceToken")]
    assert [(q.device_token, q.status) for q in apple_sandbox.requests] == [(development, 200)]
    assert not r.relay.registry.is_dead(development)
    assert await r.relay.store.learned_environments() == {development: "sandbox"}

    await r.post(sample("message", to=[development], id=7001, message="second"))
    assert await _ended(r) == {EndState.SENT: 2}
    assert len(production.requests) == 1  # no second question to production
    second = apple_sandbox.requests[1]
    assert (second.device_token, second.status, second.payload["aps"]["alert"]["body"]) == (
        development, 200, "second")


async def test_production_tokens_never_touch_the_sandbox(make_relay: MakeRelay,
                                                         hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """A token production accepts is sent there once; the sandbox host is never asked."""
    production, apple_sandbox, production_token, _ = hosts
    r = await make_relay(devices={production_token: {"app": "ios"}})
    await r.post(sample("message", to=[production_token]))
    assert await _ended(r) == {EndState.SENT: 1}
    assert [q.status for q in production.requests] == [200]
    assert apple_sandbox.requests == [] and apple_sandbox.connections_opened == 0
    assert await r.relay.store.learned_environments() == {}


async def test_a_token_neither_host_knows_is_dead_after_one_sandbox_try(
        make_relay: MakeRelay, hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """Both hosts refuse: the token is dead as before (production's verdict, the sandbox's named), asked once each."""
    production, apple_sandbox, _, _ = hosts
    bad = _apns_hex()
    r = await make_relay(devices={bad: {"app": "ios"}})
    await r.post(sample("message", to=[bad]))
    assert await _ended(r) == {EndState.TOKEN_DEAD: 1}
    assert (await r.relay.store.dead_tokens())[bad] == "400 BadDeviceToken (sandbox: 400 BadDeviceToken)"
    assert (len(production.requests), len(apple_sandbox.requests)) == (1, 1)
    assert await r.relay.store.learned_environments() == {}


async def test_a_device_declared_sandbox_in_the_registry_goes_to_the_sandbox_directly(
        make_relay: MakeRelay, hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """``environment: sandbox`` in the registry file: the sandbox host only, from the first push."""
    production, apple_sandbox, _, development = hosts
    r = await make_relay(devices={development: {"app": "ios", "environment": "sandbox"}})
    await r.post(sample("message", to=[development]))
    await r.post(sample("event", to=[development]))
    assert await _ended(r) == {EndState.SENT: 2}
    assert production.requests == []
    assert [(q.status, q.headers["apns-push-type"]) for q in apple_sandbox.requests] == [
        (200, "alert"), (200, "background")]


async def test_a_device_declared_production_is_not_tried_on_the_sandbox(
        make_relay: MakeRelay, hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """``environment: production`` is a statement, not a guess: BadDeviceToken there is dead at once."""
    production, apple_sandbox, _, development = hosts
    r = await make_relay(devices={development: {"app": "ios", "environment": "production"}})
    await r.post(sample("message", to=[development]))
    assert await _ended(r) == {EndState.TOKEN_DEAD: 1}
    assert (len(production.requests), apple_sandbox.requests) == (1, [])


async def test_sandbox_fallback_false_keeps_todays_behaviour(make_relay: MakeRelay,
                                                             hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """With ``sandbox_fallback: false`` production's BadDeviceToken marks the token dead; the sandbox is not asked."""
    production, apple_sandbox, _, development = hosts
    r = await make_relay(devices={development: {"app": "ios"}}, apps={"ios": {"sandbox_fallback": False}})
    await r.post(sample("message", to=[development]))
    assert await _ended(r) == {EndState.TOKEN_DEAD: 1}
    assert (len(production.requests), apple_sandbox.requests) == (1, [])


async def test_a_sandbox_app_sends_every_unknown_device_to_the_sandbox(
        make_relay: MakeRelay, hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """An app whose ``environment`` is sandbox sends there without asking production (as before this feature)."""
    production, apple_sandbox, _, development = hosts
    r = await make_relay(devices={development: {"app": "ios"}}, apps={"ios": {"environment": "sandbox"}})
    await r.post(sample("message", to=[development]))
    assert await _ended(r) == {EndState.SENT: 1}
    assert (production.requests, len(apple_sandbox.requests)) == ([], 1)


async def test_routing_rule_tokens_learn_their_environment_too(make_relay: MakeRelay,
                                                              hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """A token routed by an ``apns-hex`` rule (no entry at all) is found on the sandbox and remembered."""
    production, apple_sandbox, _, development = hosts
    r = await make_relay(devices={}, routing=[{"match": "apns-hex", "app": "ios"}])
    await r.post(sample("message", to=[development]))
    await r.post(sample("message", to=[development], id=7002))
    assert await _ended(r) == {EndState.SENT: 2}
    assert (len(production.requests), len(apple_sandbox.requests)) == (1, 2)


APP_KEY = "shipped-in-the-ios-app-0f9e8d7c6b5a"


async def test_a_device_registered_through_the_api_as_sandbox_goes_there_directly(
        make_relay: MakeRelay, hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """``PUT {"app": "ios", "environment": "sandbox"}`` (the app's own key, scope register) routes to the sandbox
    from the first push; a device the relay learned reads back with ``environment: sandbox`` too."""
    production, apple_sandbox, _, development = hosts
    learned = _apns_hex()
    apple_sandbox.accept_only([development, learned])
    key = {"key_sha256": hashlib.sha256(APP_KEY.encode()).hexdigest(), "apps": ["ios"]}
    r = await make_relay(devices={learned: {"app": "ios"}}, api={"keys": {"ios-app": key}})
    headers = {"Authorization": f"Bearer {APP_KEY}"}
    response = await r.client.put(f"/v1/devices/{development}", json={"app": "ios", "environment": "sandbox"},
                                  headers=headers)
    assert (response.status, (await response.json())["environment"]) == (201, "sandbox")
    await r.post(sample("message", to=[development, learned]))
    assert await _ended(r) == {EndState.SENT: 2}
    assert [q.device_token for q in production.requests] == [learned]
    assert sorted(q.device_token for q in apple_sandbox.requests) == sorted([development, learned])
    response = await r.client.get(f"/v1/devices/{learned}", headers=headers)
    assert (await response.json())["environment"] == "sandbox"


# -- persistence: restarts, reloads, other instances --------------------------------------------------------


def _backends() -> list[Any]:
    return ["sqlite", pytest.param("redis", marks=pytest.mark.skipif(
        redis_unavailable() is not None, reason=redis_unavailable() or ""))]


@pytest.fixture
async def instances(sandbox: Sandbox, aiohttp_client: Any) -> AsyncIterator[Callable[..., Any]]:
    """Start relay apps (a restart, or a second instance) on one config and store."""
    clients: list[TestClient[web.Request, web.Application]] = []
    prefix = f"test-env-{uuid.uuid4().hex[:12]}"

    async def start(backend: str, devices: dict[str, dict[str, str]], *, stop_others: bool = True) -> RelayUnderTest:
        if stop_others:
            for old in clients:
                await old.close()
        store = ({"backend": "redis", "url": REDIS_URL, "prefix": prefix} if backend == "redis"
                 else {"backend": "sqlite", "path": str(sandbox.root / "relay.db")})
        client = await aiohttp_client(create_app(load_config(sandbox.write(devices=devices, store=store))))
        clients.append(client)
        return RelayUnderTest(client, client.app, await aiohttp_client(create_ops_app(client.app[RELAY_KEY])))

    yield start
    if clients and clients[-1].app[RELAY_KEY].config.store.backend == "redis":
        delete_redis_keys(prefix)


@pytest.mark.parametrize("backend", _backends())
async def test_a_learned_environment_survives_a_restart(instances: Callable[..., Any], backend: str,
                                                        hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """After a restart on the same store the development token goes to the sandbox without asking production."""
    production, apple_sandbox, _, development = hosts
    devices = {development: {"app": "ios"}}
    first = await instances(backend, devices)
    await first.post(sample("message", to=[development]))
    await first.settle()
    second = await instances(backend, devices)
    assert second.app is not first.app
    await second.post(sample("message", to=[development], id=7003))
    await second.settle()
    assert (len(production.requests), [q.status for q in apple_sandbox.requests]) == (1, [200, 200])


@pytest.mark.parametrize("backend", _backends())
async def test_another_instance_uses_a_learned_environment_after_its_reload(
        instances: Callable[..., Any], backend: str, hosts: tuple[FakeApns, FakeApns, str, str]) -> None:
    """An environment learned by one instance reaches a running one with its next reload (like dead tokens)."""
    production, apple_sandbox, _, development = hosts
    devices = {development: {"app": "ios"}}
    learner = await instances(backend, devices)
    other = await instances(backend, devices, stop_others=False)
    await learner.post(sample("message", to=[development]))
    await learner.settle()
    assert other.relay.registry.lookup(development) is not None
    assert await reload(other.relay)
    route = other.relay.registry.lookup(development)
    assert route is not None and route.environment == "sandbox"
    assert (len(production.requests), len(apple_sandbox.requests)) == (1, 1)


@pytest.mark.parametrize("backend", _backends())
async def test_stores_keep_declared_and_learned_environments(sandbox: Sandbox, backend: str) -> None:
    """Both stores persist a run-time device's declared environment and the environments learned per device
    token, and read back devices stored without one (None: the app's environment)."""
    prefix = f"test-env-store-{uuid.uuid4().hex[:12]}"
    settings = (StoreSettings(backend="redis", url=REDIS_URL, prefix=prefix) if backend == "redis"
                else StoreSettings(path=sandbox.root / "env.db"))
    store = create_store(settings)
    await store.open()
    try:
        await store.put_device(Device("a", "ios", "a" * 64, "sandbox"), 1.0)
        await store.put_device(Device("b", "ios", "b" * 64), 1.0)
        await store.remember_environment("c" * 64, "sandbox", 2.0)
        assert await store.list_devices() == [Device("a", "ios", "a" * 64, "sandbox"), Device("b", "ios", "b" * 64)]
        assert await store.get_device("a") == Device("a", "ios", "a" * 64, "sandbox")
        await store.put_device(Device("a", "ios", "a" * 64, None), 3.0)  # a PUT without it clears it
        assert await store.get_device("a") == Device("a", "ios", "a" * 64)
        assert await store.learned_environments() == {"c" * 64: "sandbox"}
    finally:
        if backend == "redis":
            delete_redis_keys(prefix)
        await store.close()


async def test_an_sqlite_store_of_an_earlier_version_gains_the_environment_column(sandbox: Sandbox) -> None:
    """Opening a store whose devices table predates environments adds the column and keeps every device."""
    path = sandbox.root / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE devices (token TEXT PRIMARY KEY, app TEXT NOT NULL, device_token TEXT NOT NULL, "
                 "updated_at REAL NOT NULL) WITHOUT ROWID")
    conn.execute("INSERT INTO devices VALUES ('old', 'ios', ?, 1.0)", ("d" * 64,))
    conn.commit()
    conn.close()
    store = create_store(StoreSettings(path=path))
    await store.open()
    try:
        assert await store.list_devices() == [Device("old", "ios", "d" * 64)]
        await store.put_device(Device("new", "ios", "e" * 64, "sandbox"), 2.0)
        assert await store.get_device("new") == Device("new", "ios", "e" * 64, "sandbox")
    finally:
        await store.close()
