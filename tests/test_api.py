"""The /v1/ device API: apps register push tokens at run time; keys are limited to their apps; changes persist."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from relay.cli import main
from relay.config import load_config
from relay.errors import ConfigError
from relay.http.app import create_ops_app
from relay.running import RELAY_KEY
from relay.runtime.relay import create_app, reload
from relay.testing.sandbox import ANDROID_TOKEN, IOS_TOKEN, Sandbox, sample
from tests.conftest import REDIS_URL, MakeRelay, RelayUnderTest, delete_redis_keys, redis_unavailable

IOS_KEY = "ios-backend-key-5b1e0c7d9a2f4e61"
APP_KEY = "shipped-in-the-ios-app-3c8e1f0a9b7d"
ANDROID_KEY = "android-backend-key-77c3a9e0d1b2f4"
BOTH_KEY = "ops-key-both-apps-0a9b8c7d6e5f4a3b"


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _apns_hex() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def _fcm_token() -> str:
    return f"fcm-{uuid.uuid4().hex}:APA91b_{uuid.uuid4().hex}"


def api_section(sandbox: Sandbox) -> dict[str, Any]:
    """Four clients: an iOS backend (hashed key), an Android backend (key file), an operator key for both (all
    three scope manage), and the key shipped inside the iOS app (scope register, the default)."""
    (sandbox.root / "android.key").write_text(ANDROID_KEY + "\n")
    return {"keys": {
        "ios-backend": {"key_sha256": _sha(IOS_KEY), "apps": ["ios"], "scope": "manage"},
        "android-backend": {"key_file": "android.key", "apps": ["android"], "scope": "manage"},
        "ops": {"key_sha256": _sha(BOTH_KEY).upper(), "apps": ["ios", "android"], "scope": "manage"},
        "ios-app": {"key_sha256": _sha(APP_KEY), "apps": ["ios"]},
    }}


class Api:
    """A test client for the device API with one key."""

    def __init__(self, relay: RelayUnderTest, key: str | None) -> None:
        self.relay, self.key = relay, key

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    async def call(self, method: str, path: str, body: Any = None, **params: Any) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"headers": self.headers(), "params": params or None}
        if isinstance(body, bytes):
            kwargs["data"] = body
        elif body is not None:
            kwargs["json"] = body
        response = await self.relay.client.request(method, path, **kwargs)
        return response.status, await response.json()

    async def put(self, token: str, body: Any) -> tuple[int, Any]:
        return await self.call("PUT", f"/v1/devices/{token}", body)

    async def get(self, token: str) -> tuple[int, Any]:
        return await self.call("GET", f"/v1/devices/{token}")

    async def delete(self, token: str) -> tuple[int, Any]:
        return await self.call("DELETE", f"/v1/devices/{token}")

    async def list(self, **params: Any) -> tuple[int, Any]:
        return await self.call("GET", "/v1/devices", **params)


@pytest.fixture
async def relay(make_relay: MakeRelay, sandbox: Sandbox) -> RelayUnderTest:
    return await make_relay(api=api_section(sandbox))


@pytest.fixture
def api(relay: RelayUnderTest) -> Callable[[str | None], Api]:
    return lambda key: Api(relay, key)


async def _parked(r: RelayUnderTest, count: int = 1, timeout: float = 5.0) -> None:
    """Wait until ``count`` deliveries were tried, found unroutable, and parked for the grace period."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = await r.relay.store.stats()
        due = await r.relay.store.next_due()
        if stats.pending == count and stats.inflight == 0 and due is not None and due > time.time() + 60:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the delivery was not parked as unroutable")


# -- each endpoint ---------------------------------------------------------------------------------


async def test_put_creates_a_device_that_get_reads_back(api: Callable[[str | None], Api]) -> None:
    """PUT answers 201 with the device; GET returns it as a run-time, live entry."""
    token, device_token = _apns_hex(), _apns_hex()
    status, body = await api(IOS_KEY).put(token, {"app": "ios", "device_token": device_token})
    assert status == 201
    assert body == {"parley_token": token, "app": "ios", "platform": "apns", "device_token": device_token,
                    "environment": None, "source": "runtime", "dead": False}
    assert await api(IOS_KEY).get(token) == (200, body)


async def test_put_again_replaces_the_device_with_200(api: Callable[[str | None], Api]) -> None:
    """A second PUT of the same token replaces the entry and answers 200; the device token defaults to the key."""
    token = _apns_hex()
    assert (await api(IOS_KEY).put(token, {"app": "ios", "device_token": _apns_hex()}))[0] == 201
    status, body = await api(IOS_KEY).put(token, {"app": "ios"})
    assert (status, body["device_token"]) == (200, token)


async def test_delete_removes_a_run_time_device(api: Callable[[str | None], Api], relay: RelayUnderTest) -> None:
    """DELETE removes the device from the registry and the store; a second DELETE is 404."""
    token = _fcm_token()
    await api(ANDROID_KEY).put(token, {"app": "android"})
    assert await api(ANDROID_KEY).delete(token) == (200, {"status": "deleted", "parley_token": token})
    assert (await api(ANDROID_KEY).get(token))[0] == 404
    assert relay.relay.registry.lookup(token) is None
    assert token not in {d.token for d in await relay.relay.store.list_devices()}
    status, body = await api(ANDROID_KEY).delete(token)
    assert (status, body["field"]) == (404, "parley_token")


async def test_yaml_devices_are_readable_but_only_removable_in_the_file(api: Callable[[str | None], Api]) -> None:
    """A device of the registry file reads as source yaml; DELETE answers 409 and it stays."""
    status, body = await api(IOS_KEY).get(IOS_TOKEN)
    assert (status, body["source"], body["app"]) == (200, "yaml", "ios")
    status, body = await api(IOS_KEY).delete(IOS_TOKEN)
    assert (status, body["field"]) == (409, "parley_token")
    assert (await api(IOS_KEY).get(IOS_TOKEN))[0] == 200


async def test_put_overlays_a_yaml_entry_and_delete_restores_it(api: Callable[[str | None], Api],
                                                               relay: RelayUnderTest, sandbox: Sandbox) -> None:
    """A PUT for a YAML token wins over the file (pushes go to the new device token); DELETE brings the file back."""
    new_device = _apns_hex()
    status, body = await api(IOS_KEY).put(IOS_TOKEN, {"app": "ios", "device_token": new_device})
    assert (status, body["source"]) == (200, "runtime")
    await relay.post(sample("message", to=[IOS_TOKEN]))
    (push,) = await sandbox.apns.wait_for(1)
    assert push.device_token == new_device
    assert (await api(IOS_KEY).delete(IOS_TOKEN))[0] == 200
    status, body = await api(IOS_KEY).get(IOS_TOKEN)
    assert (status, body["source"], body["device_token"]) == (200, "yaml", IOS_TOKEN)


async def test_list_pages_through_yaml_and_run_time_devices_sorted_by_token(
        api: Callable[[str | None], Api]) -> None:
    """Listing merges the file and the API's devices of the key's apps, in token order, ``limit`` at a time."""
    ios_tokens = sorted(_apns_hex() for _ in range(5))
    for token in ios_tokens:
        assert (await api(BOTH_KEY).put(token, {"app": "ios"}))[0] == 201
    await api(BOTH_KEY).put(_fcm_token(), {"app": "android"})
    expected = sorted([*ios_tokens, IOS_TOKEN])
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        status, page = await api(IOS_KEY).list(**params)
        assert status == 200 and len(page["devices"]) <= 2
        seen += [d["parley_token"] for d in page["devices"]]
        assert all(d["app"] == "ios" for d in page["devices"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected and pages == 3
    status, page = await api(BOTH_KEY).list(app="android")
    assert status == 200 and len(page["devices"]) == 2 and {d["app"] for d in page["devices"]} == {"android"}
    status, page = await api(BOTH_KEY).list()
    assert len(page["devices"]) == 8 and page["next_cursor"] is None


async def test_openapi_document_is_served_without_a_key(relay: RelayUnderTest) -> None:
    """GET /v1/openapi.json returns the OpenAPI 3.1 document kept in the package."""
    response = await relay.client.get("/v1/openapi.json")
    doc = await response.json()
    assert response.status == 200 and doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/v1/devices/{parley_token}", "/v1/devices", "/v1/openapi.json"}


async def test_api_without_configured_keys_is_not_enabled(make_relay: MakeRelay) -> None:
    """With no api.keys the device endpoints answer 404 saying the API is not enabled."""
    r = await make_relay()
    status, body = await Api(r, IOS_KEY).put(_apns_hex(), {"app": "ios"})
    assert status == 404 and "api.keys" in body["error"]


# -- authentication and authorisation ------------------------------------------------------------

ENDPOINTS = [("PUT", "/v1/devices/{t}", {"app": "ios"}), ("GET", "/v1/devices/{t}", None),
             ("DELETE", "/v1/devices/{t}", None), ("GET", "/v1/devices", None)]


AUTHORIZATIONS = [None, "Bearer not-a-key-of-this-relay", f"Basic {IOS_KEY}", "Bearer "]


async def test_missing_or_wrong_key_gets_401(relay: RelayUnderTest) -> None:
    """Every device endpoint needs a configured key as a Bearer token: 401 with a challenge otherwise."""
    for method, path, body in ENDPOINTS:
        for authorization in AUTHORIZATIONS:
            headers = {"Authorization": authorization} if authorization else {}
            response = await relay.client.request(method, path.format(t=_apns_hex()), json=body, headers=headers)
            answer = await response.json()
            case = (method, path, authorization)
            assert (response.status, answer["field"]) == (401, "Authorization"), case
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), case


async def test_a_key_cannot_touch_another_apps_devices(api: Callable[[str | None], Api]) -> None:
    """The iOS key gets 403 (listing its own apps) for Android devices: register, read, remove, take over, list."""
    android_device = _fcm_token()
    assert (await api(ANDROID_KEY).put(android_device, {"app": "android"}))[0] == 201
    ios = api(IOS_KEY)
    for status, body in [
        await ios.put(_fcm_token(), {"app": "android"}),
        await ios.get(android_device),
        await ios.delete(android_device),
        await ios.get(ANDROID_TOKEN),
        await ios.put(android_device, {"app": "ios", "device_token": _apns_hex()}),
        await ios.list(app="android"),
    ]:
        assert status == 403 and body["apps"] == ["ios"]
    assert (await api(ANDROID_KEY).get(android_device))[1]["app"] == "android"


async def test_unknown_app_gets_404_listing_the_apps_of_the_key(api: Callable[[str | None], Api]) -> None:
    """An app the relay does not know: 404 with field app and the names this key may use."""
    status, body = await api(BOTH_KEY).put(_apns_hex(), {"app": "ios-prod"})
    assert (status, body["field"], body["apps"]) == (404, "app", ["ios", "android"])
    status, body = await api(IOS_KEY).list(app="nope")
    assert (status, body["field"], body["apps"]) == (404, "app", ["ios"])


# -- validation --------------------------------------------------------------------------------------

HEX63 = "a" * 63


MALFORMED_PUTS = [
    (_apns_hex(), {"app": "ios", "device_token": HEX63}, "device_token"),
    (_apns_hex(), {"app": "ios", "device_token": "g" * 64}, "device_token"),
    (_apns_hex(), {"app": "ios", "device_token": 12345}, "device_token"),
    ("0801fc577294c34e", {"app": "ios"}, "device_token"),  # not an APNs token itself, and none given
    (_fcm_token(), {"app": "android", "device_token": "short:token"}, "device_token"),
    (_fcm_token(), {"app": "android", "device_token": "x" * 40 + " spaces " + "y" * 40}, "device_token"),
    (_fcm_token(), {"app": "android", "device_token": "z" * 4097}, "device_token"),
    (_apns_hex(), {"device_token": _apns_hex()}, "app"),
    (_apns_hex(), {"app": 7}, "app"),
    (_apns_hex(), {"app": "ios", "devicetoken": _apns_hex()}, "devicetoken"),
    (_apns_hex(), b"{not json", "body"),
    (_apns_hex(), b'{"app": "ios", "device_token": NaN}', "body"),
    (_apns_hex(), [{"app": "ios"}], "body"),
    ("bad%20token", {"app": "ios"}, "parley_token"),
    ("b" * 2049, {"app": "ios"}, "parley_token"),
]
MALFORMED_QUERIES = [({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "ten"}, "limit"),
                     ({"cursor": "c" * 2049}, "cursor"), ({"cursor": "a b"}, "cursor"), ({"page": "2"}, "page")]


async def test_malformed_put_gets_400_naming_the_field(api: Callable[[str | None], Api], relay: RelayUnderTest) -> None:
    """Bad tokens (APNs: 64 hex; FCM: 32-4096 of [A-Za-z0-9_:.-]) and bad bodies: 400 naming the field."""
    for token, body, field in MALFORMED_PUTS:
        status, answer = await api(BOTH_KEY).put(token, body)
        assert (status, answer["status"], answer["field"]) == (400, "error", field), (token[:20], body)
    assert await relay.relay.store.list_devices() == []


async def test_malformed_list_query_gets_400_naming_the_parameter(api: Callable[[str | None], Api]) -> None:
    """Listing refuses a limit outside 1..1000, a cursor that is no token and unknown parameters, naming them."""
    for params, field in MALFORMED_QUERIES:
        status, answer = await api(IOS_KEY).list(**params)
        assert (status, answer["field"]) == (400, field), params


@pytest.mark.parametrize(("keys", "key", "message"), [
    ({"k": {"key_sha256": "abc", "apps": ["ios"]}}, "api.keys.k.key_sha256", "64 hex"),
    ({"k": {"key_sha256": "a" * 64, "apps": ["ios-prod"]}}, "api.keys.k.apps", "unknown app 'ios-prod'"),
    ({"k": {"key_sha256": "a" * 64}}, "api.keys.k.apps", "non-empty list"),
    ({"k": {"apps": ["ios"]}}, "api.keys.k.key_sha256", "exactly one"),
    ({"k": {"key_file": "weak.key", "apps": ["ios"]}}, "api.keys.k.key_file", "at least 16"),
    ({"k": {"key_file": "missing.key", "apps": ["ios"]}}, "api.keys.k.key_file", "file not found"),
    ({"k": {"key": "plain", "key_sha256": "a" * 64, "apps": ["ios"]}}, "api.keys.k.key", "unknown key"),
    ({"a": {"key_sha256": "b" * 64, "apps": ["ios"]}, "b": {"key_sha256": "B" * 64, "apps": ["ios"]}},
     "api.keys.b", "same key as api.keys.a"),
    ({"k": {"key_sha256": "a" * 64, "apps": ["ios"], "scope": "admin"}}, "api.keys.k.scope",
     "must be one of register, manage"),
])
def test_bad_api_keys_config_names_file_and_key(sandbox: Sandbox, keys: dict[str, Any], key: str,
                                                message: str) -> None:
    """Each API key needs one hashed key or key file and a list of existing apps; problems name the key."""
    (sandbox.root / "weak.key").write_text("short\n")
    path = sandbox.write(api={"keys": keys})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = [(p.file, p.key) for p in caught.value.problems if message in p.message]
    assert problems == [(str(path), key)], caught.value.problems


# -- scopes: a key shipped inside an app cannot redirect anyone's pushes ----------------------------------


def test_a_key_without_scope_is_a_register_key(sandbox: Sandbox) -> None:
    """Keys whose config names no scope get the least power (register); manage must be asked for."""
    config = load_config(sandbox.write(api=api_section(sandbox)))
    assert config.api.keys["ios-app"].scope == "register" and not config.api.keys["ios-app"].manages
    assert config.api.keys["ios-backend"].scope == "manage" and config.api.keys["ios-backend"].manages


async def test_a_register_key_registers_a_token_as_itself(api: Callable[[str | None], Api]) -> None:
    """The app's own key may create, re-register (every launch) and read its own token, with its environment."""
    token = _apns_hex()
    status, body = await api(APP_KEY).put(token, {"app": "ios", "environment": "sandbox"})
    assert (status, body["device_token"], body["environment"]) == (201, token, "sandbox")
    status, body = await api(APP_KEY).put(token, {"app": "ios", "device_token": token, "environment": "sandbox"})
    assert (status, body["environment"]) == (200, "sandbox")
    status, body = await api(APP_KEY).put(token, {"app": "ios"})  # omitted: the environment stays
    assert (status, body["environment"]) == (200, "sandbox")
    assert (await api(APP_KEY).get(token))[0] == 200


async def test_a_register_key_cannot_change_a_registered_devices_environment(api: Callable[[str | None], Api],
                                                                            relay: RelayUnderTest) -> None:
    """Pointing someone's production token at the sandbox would get it refused and killed: 403 naming environment,
    for a device registered without one and for one declared otherwise; a manage key may change it."""
    plain, declared = _apns_hex(), _apns_hex()
    assert (await api(APP_KEY).put(plain, {"app": "ios"}))[0] == 201
    assert (await api(APP_KEY).put(declared, {"app": "ios", "environment": "production"}))[0] == 201
    for token in (plain, declared):
        status, body = await api(APP_KEY).put(token, {"app": "ios", "environment": "sandbox"})
        assert (status, body["field"]) == (403, "environment")
    route = relay.relay.registry.lookup(declared)
    assert route is not None and route.environment == "production"
    status, body = await api(IOS_KEY).put(declared, {"app": "ios", "environment": "sandbox"})
    assert (status, body["environment"]) == (200, "sandbox")


async def test_a_register_key_cannot_map_a_token_to_another_device(api: Callable[[str | None], Api],
                                                                   relay: RelayUnderTest) -> None:
    """``device_token`` other than the Parley token: 403 naming device_token, and nothing is stored."""
    token = _apns_hex()
    status, body = await api(APP_KEY).put(token, {"app": "ios", "device_token": _apns_hex()})
    assert (status, body["field"]) == (403, "device_token") and "scope manage" in body["error"]
    assert relay.relay.registry.entry(token) is None
    assert await relay.relay.store.list_devices() == []


async def test_a_register_key_cannot_take_over_someone_elses_token(api: Callable[[str | None], Api],
                                                                   relay: RelayUnderTest, sandbox: Sandbox) -> None:
    """A token a backend mapped to its user's device stays there: the app key's PUT is 403 (field parley_token),
    its GET too (the mapping names a device token), and the user's pushes still reach the user's device."""
    victim, victims_device = _apns_hex(), _apns_hex()
    assert (await api(IOS_KEY).put(victim, {"app": "ios", "device_token": victims_device}))[0] == 201
    status, body = await api(APP_KEY).put(victim, {"app": "ios"})
    assert (status, body["field"]) == (403, "parley_token")
    status, body = await api(APP_KEY).get(victim)
    assert (status, body["field"]) == (403, "parley_token")
    await relay.post(sample("message", to=[victim]))
    (push,) = await sandbox.apns.wait_for(1)
    assert push.device_token == victims_device


async def test_a_register_key_cannot_delete_or_list(api: Callable[[str | None], Api],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """DELETE and listing need scope manage: 403 naming Authorization, logged with the key's name."""
    token = _apns_hex()
    assert (await api(APP_KEY).put(token, {"app": "ios"}))[0] == 201
    caplog.set_level("INFO")
    for status, body in [await api(APP_KEY).delete(token), await api(APP_KEY).list()]:
        assert (status, body["field"]) == (403, "Authorization") and "scope register" in body["error"]
    assert (await api(APP_KEY).get(token))[0] == 200  # still there
    refusals = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "device API request refused"]
    assert [(f.get("key"), f.get("operation"), f.get("status")) for f in refusals] == [
        ("ios-app", "delete", 403), ("ios-app", "list", 403)]


async def test_environment_in_the_body_is_checked(api: Callable[[str | None], Api]) -> None:
    """``environment`` is sandbox, production or null, and only for APNs apps: 400 naming it otherwise."""
    for token, body in [(_apns_hex(), {"app": "ios", "environment": "staging"}),
                        (_apns_hex(), {"app": "ios", "environment": 1}),
                        (_fcm_token(), {"app": "android", "environment": "sandbox"})]:
        status, answer = await api(BOTH_KEY).put(token, body)
        assert (status, answer["field"]) == (400, "environment"), body


def test_devices_add_and_the_api_refuse_the_same_malformed_tokens(sandbox: Sandbox,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``devices add`` checks the token's shape per platform like the API's PUT: ``zz`` is no APNs token."""
    path = str(sandbox.write())
    assert main(["devices", "add", "zz", "--app", "ios", "-c", path]) == 1
    assert "the device token must be 64 hex characters" in capsys.readouterr().err
    assert main(["devices", "add", _apns_hex(), "--app", "ios", "--device-token", "zz", "-c", path]) == 1
    assert "--device-token 'zz'" in capsys.readouterr().err
    assert main(["devices", "add", "short", "--app", "android", "-c", path]) == 1
    assert "32 to 4096 characters" in capsys.readouterr().err
    assert main(["devices", "add", _fcm_token(), "--app", "android", "--environment", "sandbox", "-c", path]) == 1
    assert "only APNs devices" in capsys.readouterr().err
    assert main(["devices", "list", "-c", path]) == 0
    assert "runtime" not in capsys.readouterr().out  # nothing was stored
    token = _apns_hex()
    assert main(["devices", "add", token, "--app", "ios", "--environment", "sandbox", "-c", path]) == 0
    assert main(["devices", "list", "-c", path]) == 0
    assert f"{token}\tios\truntime" in capsys.readouterr().out


async def test_the_api_refuses_zz_with_the_same_words(api: Callable[[str | None], Api]) -> None:
    """PUT of ``zz`` for an APNs app is 400 with the message ``devices add`` prints."""
    status, body = await api(BOTH_KEY).put("zz", {"app": "ios"})
    assert (status, body["field"]) == (400, "device_token")
    assert body["error"] == "app 'ios' is APNs: the device token must be 64 hex characters"


# -- persistence, overlay and delivery -----------------------------------------------------------


def _backends() -> list[Any]:
    return ["sqlite", pytest.param("redis", marks=pytest.mark.skipif(
        redis_unavailable() is not None, reason=redis_unavailable() or ""))]




@pytest.fixture
async def restartable(sandbox: Sandbox, aiohttp_client: Any) -> AsyncIterator[Callable[..., Any]]:
    """Start (and later restart) a relay app on one config and store, as a new process would."""
    clients: list[TestClient[web.Request, web.Application]] = []
    prefix = f"test-api-{uuid.uuid4().hex[:12]}"  # this test's own Redis keys, whatever else shares the database

    async def start(backend: str) -> RelayUnderTest:
        for old in clients:
            await old.close()
        store = ({"backend": "redis", "url": REDIS_URL, "prefix": prefix} if backend == "redis"
                 else {"backend": "sqlite", "path": str(sandbox.root / "relay.db")})
        path = sandbox.write(api=api_section(sandbox), store=store)
        app = create_app(load_config(path))
        client = await aiohttp_client(app)
        clients.append(client)
        return RelayUnderTest(client, app, await aiohttp_client(create_ops_app(app[RELAY_KEY])))

    yield start
    if clients and clients[-1].app[RELAY_KEY].config.store.backend == "redis":
        delete_redis_keys(prefix)


@pytest.mark.parametrize("backend", _backends())
async def test_registered_devices_survive_a_restart_and_a_reload(restartable: Callable[..., Any], sandbox: Sandbox,
                                                                 backend: str) -> None:
    """A device PUT before a restart is still listed, readable and routed after it, and after a SIGHUP reload."""
    token, device_token = _apns_hex(), _apns_hex()
    first = await restartable(backend)
    assert (await Api(first, IOS_KEY).put(token, {"app": "ios", "device_token": device_token}))[0] == 201
    second = await restartable(backend)
    assert second.app is not first.app
    status, body = await Api(second, IOS_KEY).get(token)
    assert (status, body["device_token"], body["source"]) == (200, device_token, "runtime")
    assert await reload(second.relay)
    assert (await Api(second, IOS_KEY).get(token))[0] == 200
    await second.post(sample("message", to=[token]))
    (push,) = await sandbox.apns.wait_for(1)
    assert push.device_token == device_token


@pytest.mark.parametrize(("app", "make_token"), [("ios", _apns_hex), ("android", _fcm_token)])
async def test_put_releases_a_pending_unroutable_delivery_at_once(api: Callable[[str | None], Api],
                                                                 relay: RelayUnderTest, sandbox: Sandbox, app: str,
                                                                 make_token: Callable[[], str]) -> None:
    """A webhook for an unknown token waits (grace 600 s); registering the token sends it within seconds."""
    token = make_token()
    assert (await relay.post(sample("message", to=[token])))[0] == 200
    await _parked(relay)
    started = time.monotonic()
    assert (await api(BOTH_KEY).put(token, {"app": app}))[0] == 201
    if app == "ios":
        (push,) = await sandbox.apns.wait_for(1)
        assert push.device_token == token
    else:
        (request,) = await sandbox.fcm.wait_for(1)
        assert request.message["token"] == token
    assert time.monotonic() - started < 5
    await relay.settle()
    assert sum((await relay.relay.store.stats()).ended.values()) == 1


async def test_put_revives_a_token_reported_dead(api: Callable[[str | None], Api], relay: RelayUnderTest,
                                                 sandbox: Sandbox) -> None:
    """After APNs says Unregistered the device reads dead; a PUT (the app re-registered) makes it deliverable again."""
    token = _apns_hex()
    await api(IOS_KEY).put(token, {"app": "ios"})
    sandbox.apns.respond(token, 410, "Unregistered", times=1)
    await relay.post(sample("message", to=[token]))
    await relay.settle()
    assert (await api(IOS_KEY).get(token))[1]["dead"] is True
    status, body = await api(IOS_KEY).put(token, {"app": "ios"})
    assert (status, body["dead"]) == (200, False)
    assert token not in await relay.relay.store.dead_tokens()
    await relay.post(sample("message", to=[token], id=4242))
    requests = await sandbox.apns.wait_for(2)
    assert [r.status for r in requests] == [410, 200]


async def test_api_requests_are_counted_and_keys_never_logged(api: Callable[[str | None], Api], relay: RelayUnderTest,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Each answer is counted by operation and status; log lines name the key, never its secret or a full token."""
    token = _apns_hex()
    caplog.set_level("DEBUG")
    await api(IOS_KEY).put(token, {"app": "ios"})
    await api(IOS_KEY).put(_fcm_token(), {"app": "android"})
    await api("Bearer-wrong-key-value").get(token)
    metrics = relay.relay.metrics.registry
    assert metrics.get_sample_value("parley_relay_api_requests_total", {"operation": "put", "status": "201"}) == 1
    assert metrics.get_sample_value("parley_relay_api_requests_total", {"operation": "put", "status": "403"}) == 1
    assert metrics.get_sample_value("parley_relay_api_requests_total", {"operation": "get", "status": "401"}) == 1
    ours = [r for r in caplog.records if r.name == "parley_relay"]  # the production access log is off
    text = " ".join(f"{r.getMessage()} {getattr(r, 'fields', {})}" for r in ours)
    assert "ios-backend" in text and "device API request refused" in text
    assert IOS_KEY not in text and "Bearer-wrong-key-value" not in text and token not in text


def test_key_file_is_read_and_kept_hashed(sandbox: Sandbox) -> None:
    """A key_file's content is hashed at load; the config holds only the SHA-256 hex."""
    path = sandbox.write(api=api_section(sandbox))
    config = load_config(path)
    key = config.api.keys["android-backend"]
    assert key.key_sha256 == _sha(ANDROID_KEY) and key.apps == ("android",)
    assert ANDROID_KEY not in repr(config)
    assert config.api.keys["ops"].key_sha256 == _sha(BOTH_KEY)


def test_api_keys_use_paths_relative_to_the_config(sandbox: Sandbox, tmp_path: Path) -> None:
    """key_file is resolved next to the config file like every other file value."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "k").write_text(IOS_KEY)
    path = sandbox.write(api={"keys": {"x": {"key_file": str(other / "k"), "apps": ["ios"]}}})
    assert load_config(path).api.keys["x"].key_sha256 == _sha(IOS_KEY)


async def test_api_can_live_on_the_metrics_listener_only(sandbox: Sandbox, aiohttp_client: Any) -> None:
    """With api.listener: metrics the webhook listener has no /v1/ routes and the separate listener serves them."""
    from relay.http.app import create_ops_app

    api = {**api_section(sandbox), "listener": "metrics"}
    app = create_app(load_config(sandbox.write(api=api, metrics={"listen": {"host": "127.0.0.1", "port": 0}})))
    main = await aiohttp_client(app)
    ops = await aiohttp_client(create_ops_app(app[RELAY_KEY]))
    headers = {"Authorization": f"Bearer {IOS_KEY}"}
    assert (await main.put(f"/v1/devices/{_apns_hex()}", json={"app": "ios"}, headers=headers)).status == 404
    assert (await ops.put(f"/v1/devices/{_apns_hex()}", json={"app": "ios"}, headers=headers)).status == 201
    assert (await ops.get("/v1/openapi.json")).status == 200
