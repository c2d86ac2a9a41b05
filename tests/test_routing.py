"""Routing rules: small deployments list no devices; ``routing:`` rules pick the app for tokens without an entry."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import load_config
from relay.errors import ConfigError
from relay.registry.file import load_registry, parse_registry
from relay.registry.routing import Registry
from relay.runtime.relay import reload
from relay.testing.sandbox import IOS_TOKEN, Sandbox, sample
from tests.conftest import MakeRelay, RelayUnderTest

SMALL_DEPLOYMENT = [{"match": "apns-hex", "app": "ios"}, {"match": "any", "app": "android"}]


def _apns_hex() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def _fcm_token() -> str:
    return f"fcm-{uuid.uuid4().hex}:APA91b_{uuid.uuid4().hex}"


async def _sent(r: RelayUnderTest, sandbox: Sandbox, apns: int, fcm: int) -> tuple[list[str], list[str]]:
    """Wait for the relay to settle; the device tokens the fake APNs and FCM received."""
    await r.settle()
    return ([q.device_token for q in await sandbox.apns.wait_for(apns)] if apns else [],
            [q.message["token"] for q in await sandbox.fcm.wait_for(fcm)] if fcm else [])


async def test_rules_route_every_token_without_any_device_list(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """With no devices at all, 64 hex characters go to the APNs app and anything else to the FCM app."""
    r = await make_relay(devices={}, routing=SMALL_DEPLOYMENT)
    ios, android = _apns_hex(), _fcm_token()
    await r.post(sample("message", to=[ios, android]))
    assert await _sent(r, sandbox, 1, 1) == ([ios], [android])
    assert sandbox.apns.requests[0].status == 200 and sandbox.fcm.requests[0].status == 200


async def test_explicit_entries_win_over_rules(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """A listed token goes where its entry says (with its device token) even when a rule matches it."""
    listed = _apns_hex()
    device_token = _fcm_token()
    r = await make_relay(devices={listed: {"app": "android", "device_token": device_token}},
                         routing=SMALL_DEPLOYMENT)
    await r.post(sample("message", to=[listed]))
    assert await _sent(r, sandbox, 0, 1) == ([], [device_token])
    assert sandbox.apns.requests == []


async def test_devices_registered_through_the_api_win_over_rules(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """A run-time device (the API's overlay) takes precedence over a rule matching its token."""
    key = "routing-test-key-0123456789abcdef"
    r = await make_relay(devices={}, routing=SMALL_DEPLOYMENT, api={"keys": {"ops": {
        "key_sha256": hashlib.sha256(key.encode()).hexdigest(), "apps": ["ios", "android"], "scope": "manage"}}})
    token, device_token = _fcm_token(), _apns_hex()
    response = await r.client.put(f"/v1/devices/{token}", json={"app": "ios", "device_token": device_token},
                                  headers={"Authorization": f"Bearer {key}"})
    assert response.status == 201
    await r.post(sample("message", to=[token]))
    assert await _sent(r, sandbox, 1, 0) == ([device_token], [])


async def test_rules_are_tried_in_order_and_the_first_match_wins(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """A regular-expression rule listed before apns-hex takes the tokens both would match."""
    r = await make_relay(devices={}, routing=[{"match": "[0-9a-f]{62}00", "app": "android"}, *SMALL_DEPLOYMENT])
    by_regex, by_shorthand = uuid.uuid4().hex + uuid.uuid4().hex[:30] + "00", "ff" + _apns_hex()[2:]
    await r.post(sample("message", to=[by_regex, by_shorthand]))
    assert await _sent(r, sandbox, 1, 1) == ([by_shorthand], [by_regex])


async def test_a_regular_expression_must_match_the_whole_token(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """``match`` is anchored at both ends: a rule for ``ios-[0-9]+`` does not take ``ios-12x``."""
    r = await make_relay(devices={}, routing=[{"match": "ios-[0-9]+", "app": "android"}],
                         delivery={"unroutable_grace": 0})
    await r.post(sample("message", to=["ios-12x"]))
    await r.post(sample("message", to=["ios-12"], id=99))
    _apns, fcm = await _sent(r, sandbox, 0, 1)
    assert fcm == ["ios-12"]
    ended = (await r.relay.store.stats()).ended
    assert {k.value: v for k, v in ended.items() if v} == {"sent": 1, "unroutable": 1}


async def test_a_token_no_rule_matches_waits_and_a_reload_with_a_rule_sends_it(make_relay: MakeRelay,
                                                                                sandbox: Sandbox) -> None:
    """Unmatched tokens park for the grace period; adding a rule and reloading delivers them at once."""
    r = await make_relay(devices={}, routing=[{"match": "apns-hex", "app": "ios"}])
    token = _fcm_token()
    await r.post(sample("message", to=[token]))
    deadline = time.monotonic() + 5
    while not (await r.relay.store.next_due() or 0) > time.time() + 60:
        assert time.monotonic() < deadline, "the delivery was not parked"
        await asyncio.sleep(0.02)
    assert sandbox.fcm.requests == []
    sandbox.write(devices={}, routing=SMALL_DEPLOYMENT)
    assert await reload(r.relay)
    assert await _sent(r, sandbox, 0, 1) == ([], [token])


@pytest.mark.parametrize(("routing", "key", "message"), [
    ({"match": "any", "app": "android"}, "routing", "must be a list"),
    ([{"match": "any"}], "routing[0].app", "is required"),
    ([{"match": "any", "app": "android", "extra": 1}], "routing[0].extra", "unknown key"),
    ([{"match": "apns-hex", "app": "ios"}, {"match": "any", "app": "web"}], "routing[1].app", "unknown app 'web'"),
    ([{"match": "([a-z", "app": "ios"}], "routing[0].match", "invalid regular expression"),
])
def test_bad_rules_are_refused_naming_file_and_key(sandbox: Sandbox, routing: Any, key: str, message: str) -> None:
    """Each malformed rule is reported with the registry file and its position."""
    config = load_config(sandbox.write())
    path = sandbox.root / "devices.yaml"
    with pytest.raises(ConfigError) as caught:
        parse_registry({"devices": {}, "routing": routing}, path, config.apps)
    assert [(p.file, p.key) for p in caught.value.problems if message in p.message] == [(str(path), key)]


async def test_a_bad_rule_on_reload_keeps_the_old_rules(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """A reload whose registry has an invalid rule is rejected; the rules in force keep routing."""
    r = await make_relay(devices={}, routing=SMALL_DEPLOYMENT)
    (sandbox.root / "devices.yaml").write_text(yaml.safe_dump({"routing": [{"match": "(", "app": "ios"}]}))
    assert not await reload(r.relay)
    token = _apns_hex()
    await r.post(sample("message", to=[token]))
    assert await _sent(r, sandbox, 1, 0) == ([token], [])


def test_rules_route_with_the_token_as_device_token_and_entries_first(sandbox: Sandbox, tmp_path: Path) -> None:
    """Registry.lookup: entry (with its device token) before rules; a rule sends to the token itself; else None."""
    config = load_config(sandbox.write(routing=SMALL_DEPLOYMENT))
    registry = Registry(config.apps, load_registry(config.registry, config.apps))
    hex_token = _apns_hex().upper()
    route = registry.lookup(hex_token)
    assert route is not None and (route.app.name, route.device_token) == ("ios", hex_token)
    route = registry.lookup("anything-else")
    assert route is not None and route.app.name == "android"
    route = registry.lookup(IOS_TOKEN)  # 32 hex characters: listed as ios in the sandbox's devices
    assert route is not None and route.app.name == "ios"
    bare = Registry(config.apps, load_registry(Path(sandbox.write(devices={})).parent / "devices.yaml", config.apps))
    assert bare.lookup(hex_token) is None
