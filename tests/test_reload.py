"""Reload (SIGHUP): build every part first, swap in one step; a failure anywhere changes nothing; a good reload
releases what waited on the old configuration at once (SPEC §6, §8)."""

from __future__ import annotations

import time
from typing import Any

import pytest

import relay.runtime.relay as runtime
from relay.errors import StoreUnavailable
from relay.providers import Bounded
from relay.runtime.relay import reload
from relay.testing.keys import make_apns_key
from relay.testing.sandbox import AUTH_HEADER, IOS_TOKEN, Sandbox, sample
from tests.conftest import MakeRelay, RelayUnderTest, wait_until

NEW_TOKEN = "cd" * 32


async def test_reload_whose_store_read_fails_changes_nothing_and_closes_what_it_built(
        make_relay: MakeRelay, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's device list failing mid-reload: providers, registry, config and auth stay the old objects,
    the providers built for the new configuration are closed, the reload counts as rejected."""
    r = await make_relay()
    relay = r.relay
    old = (relay.providers, relay.config, relay.auth, relay.registry.apps)
    built: list[dict[str, Bounded]] = []
    closed: list[Bounded] = []
    real_create = runtime.create_providers

    async def recording(apps: Any, timeout: float) -> dict[str, Bounded]:
        providers = await real_create(apps, timeout)
        for provider in providers.values():
            real_close = provider.close

            async def close(provider: Bounded = provider, real_close: Any = real_close) -> None:
                closed.append(provider)
                await real_close()

            monkeypatch.setattr(provider, "close", close)
        built.append(providers)
        return providers

    async def failing(since: int | None) -> Any:
        raise StoreUnavailable("store went away during the reload")

    monkeypatch.setattr(runtime, "create_providers", recording)
    monkeypatch.setattr(relay.store, "device_changes", failing)
    # The new configuration differs in every part a reload swaps: a device, the auth header, a setting.
    sandbox.write(devices={**sandbox.devices, NEW_TOKEN: {"app": "ios"}}, auth={"headers": {AUTH_HEADER: "rotated"}},
                  delivery={"backoff_initial": 2})
    assert not await reload(relay)
    (fresh,) = built
    assert relay.providers is old[0] and relay.config is old[1] and relay.auth is old[2]
    assert relay.registry.apps is old[3] and relay.registry.lookup(NEW_TOKEN) is None
    assert relay.config.delivery.backoff_initial != 2
    assert sorted(id(p) for p in closed) == sorted(id(p) for p in fresh.values())  # every new one closed
    assert not set(map(id, relay.providers.values())) & set(map(id, fresh.values()))
    assert 'parley_relay_reloads_total{result="rejected"} 1.0' in await (await r.ops.get("/metrics")).text()
    status, _ = await r.post(sample("message"))  # the old auth still admits Parley
    assert status == 200


async def test_fixed_credentials_and_a_reload_send_the_kept_push_at_once(make_relay: MakeRelay,
                                                                         sandbox: Sandbox) -> None:
    """Default settings: APNs refuses the key (InvalidProviderToken), the push is kept and alarmed; the operator
    installs the right key and reloads: the kept push reaches APNs within a second, not at the next probe
    (config_error_retry, 60 s)."""
    good = sandbox.apns_key
    make_apns_key(key_id=good.key_id, team_id=good.team_id).write_p8(sandbox.root / "AuthKey.p8")
    r = await make_relay(delivery={})
    assert r.relay.config.delivery.config_error_retry == 60
    await r.post(sample("message"))
    await wait_until(lambda: r.relay.dispatcher is not None and bool(r.relay.dispatcher.alarms))
    assert "InvalidProviderToken" in r.relay.dispatcher.alarms["ios"]  # type: ignore[union-attr]
    await wait_until(lambda: _pending(r))  # kept in the store, waiting
    good.write_p8(sandbox.root / "AuthKey.p8")
    started = time.time()
    assert await reload(r.relay)
    reloaded = time.time()  # the new credentials are in use from here
    await wait_until(lambda: any(q.status == 200 for q in sandbox.apns.requests), timeout=30)
    sent = next(q for q in sandbox.apns.requests if q.status == 200)
    print(f"kept push reached APNs {1000 * (sent.received_at - reloaded):.0f} ms after the reload returned "
          f"({1000 * (sent.received_at - started):.0f} ms after it began)")
    assert sent.device_token == IOS_TOKEN
    assert sent.received_at - reloaded < 1.0
    await r.settle()
    assert (await r.client.get("/readyz")).status == 200


async def test_a_refusal_of_replaced_credentials_after_a_reload_neither_alarms_nor_parks(
        make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """Default settings: a push with a refused key is still waiting for APNs' answer when the operator reloads a
    working key. The late InvalidProviderToken is about the replaced key: no alarm, and the push goes out with
    the new key at once instead of being parked for config_error_retry (60 s)."""
    good = sandbox.apns_key
    make_apns_key(key_id=good.key_id, team_id=good.team_id).write_p8(sandbox.root / "AuthKey.p8")
    sandbox.apns.set_delay(2.0)  # APNs answers late: the refusal arrives after the reload
    r = await make_relay(delivery={})
    await r.post(sample("message"))
    await sandbox.apns.wait_for(1)
    good.write_p8(sandbox.root / "AuthKey.p8")
    reloaded = time.time()
    assert await reload(r.relay)
    assert sandbox.apns.requests[0].status == 403  # the old key's answer, still on its way
    await wait_until(lambda: any(q.status == 200 for q in sandbox.apns.requests), timeout=30)
    sent = next(q for q in sandbox.apns.requests if q.status == 200)
    print(f"after a late refusal of the old key, the push reached APNs {sent.received_at - reloaded:.2f} s "
          "after the reload")
    assert sent.received_at - reloaded < 2.0 + 3.0  # one delayed answer, not the 60 s of a new alarm
    assert r.relay.dispatcher is not None and r.relay.dispatcher.alarms == {}
    await r.settle()
    assert (await r.client.get("/readyz")).status == 200



async def _pending(r: RelayUnderTest) -> bool:
    stats = await r.relay.store.stats()
    return stats.pending == 1 and stats.inflight == 0
