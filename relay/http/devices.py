"""Device API stage: apps (or their backends) register push tokens at run time under ``/v1/``.

Request path: ``API key -> validate -> store.put_device (durable) -> registry overlay -> wake parked
deliveries``. A device registered here persists in the store (either backend), overlays the YAML registry,
survives restarts and reloads, and takes effect at once for deliveries parked as unroutable.

Each API key (``api.keys`` in the config, kept as SHA-256 only) may touch the devices of its own apps only.
Every answer is JSON; a refused request names the field at fault. The contract is ``relay/openapi.json``,
served at ``GET /v1/openapi.json``.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources
from typing import Any

from aiohttp import web

from relay.config import ApiKey, App
from relay.errors import RelayError, StoreError
from relay.observability import event, short_token
from relay.outcome import WaitReason
from relay.registry.device import APNS_TOKEN_RE, Device
from relay.running import RELAY_KEY, Relay

PREFIX = "/v1"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Parley push tokens travel in the URL (path, cursor): URL-safe characters only (FCM and APNs tokens fit), and
# short enough that even percent-encoded they stay under aiohttp's 8190-byte request line.
MAX_TOKEN_CHARS = 2048
PARLEY_TOKEN_RE = re.compile(r"^[A-Za-z0-9_:.+=~-]{1,2048}$")
# FCM registration tokens: no published grammar; observed ones are ~150-180 characters of this alphabet.
FCM_TOKEN_RE = re.compile(r"^[A-Za-z0-9_:.-]{32,4096}$")
_BODY_FIELDS = frozenset({"app", "device_token"})
_LIST_PARAMETERS = frozenset({"app", "cursor", "limit"})


class ApiRefused(RelayError):
    """A device API request answered with a 4xx/503 JSON error; ``field`` names what is at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, *,
                 apps: list[str] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.apps = status, message, field, apps
        self.headers = headers or {}

    def response(self) -> web.Response:
        body: dict[str, object] = {"status": "error", "error": self.message}
        if self.field:
            body["field"] = self.field
        if self.apps is not None:
            body["apps"] = self.apps
        return web.json_response(body, status=self.status, headers=self.headers or None)


ApiHandler = Callable[[web.Request, Relay, ApiKey], Awaitable[web.Response]]


def _operation(name: str, handler: ApiHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Wrap a handler: authenticate, turn refusals into JSON errors, count and log every answer."""

    async def run(request: web.Request) -> web.Response:
        relay = request.app[RELAY_KEY]
        key_name = "-"
        try:
            key = authenticate(request, relay)
            key_name = key.name
            response = await handler(request, relay, key)
        except ApiRefused as exc:
            response = exc.response()
            level = logging.ERROR if exc.status >= 500 else logging.WARNING
            event(level, "device API request refused", operation=name, status=exc.status, key=key_name,
                  field=exc.field or "-", reason=exc.message, peer=request.remote or "-")
        relay.metrics.api_requests.labels(name, str(response.status)).inc()
        return response

    return run


def authenticate(request: web.Request, relay: Relay) -> ApiKey:
    """The API key presented as ``Authorization: Bearer KEY``; compared by SHA-256 in constant time."""
    keys = relay.config.api.keys
    if not keys:
        raise ApiRefused(404, "the device API is not enabled: configure api.keys")
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    challenge = {"WWW-Authenticate": 'Bearer realm="parley-relay"'}
    if scheme.lower() != "bearer" or not presented:
        raise ApiRefused(401, "an API key is required: Authorization: Bearer KEY", "Authorization",
                         headers=challenge)
    digest = hashlib.sha256(presented.encode("utf-8", "replace")).hexdigest()
    found: ApiKey | None = None
    for key in keys.values():  # no early exit: the time taken does not tell which key came close
        if hmac.compare_digest(digest, key.key_sha256):
            found = key
    if found is None:
        raise ApiRefused(401, "unknown API key", "Authorization", headers=challenge)
    return found


def _allowed_app(relay: Relay, key: ApiKey, name: object, field: str = "app") -> App:
    """The app ``name`` if this key may use it: unknown -> 404, another client's app -> 403."""
    if not isinstance(name, str) or not name:
        raise ApiRefused(400, "must be the name of an app (a non-empty string)", field, apps=list(key.apps))
    app = relay.config.apps.get(name)
    if app is None:
        raise ApiRefused(404, f"unknown app {name[:100]!r}", field, apps=list(key.apps))
    if name not in key.apps:
        raise ApiRefused(403, f"this API key may not manage devices of app {name!r}", field, apps=list(key.apps))
    return app


def _path_token(request: web.Request) -> str:
    token = request.match_info["parley_token"]
    if not PARLEY_TOKEN_RE.match(token):
        raise ApiRefused(400, f"must be 1 to {MAX_TOKEN_CHARS} characters of A-Z a-z 0-9 _ : . + = ~ -",
                         "parley_token")
    return token


def _own_entry(relay: Relay, key: ApiKey, token: str) -> Device | None:
    """The explicit entry of ``token``; 403 when it belongs to an app this key does not manage."""
    entry = relay.registry.entry(token)
    if entry is not None and entry.app in relay.config.apps and entry.app not in key.apps:
        raise ApiRefused(403, "this push token is registered to an app this API key may not manage",
                         "parley_token", apps=list(key.apps))
    return entry


def check_device_token(app: App, device_token: str, field: str = "device_token") -> None:
    """APNs device tokens are 64 hex characters; FCM tokens need a plausible length and alphabet."""
    if app.platform == "apns":
        if not APNS_TOKEN_RE.match(device_token):
            raise ApiRefused(400, f"app {app.name!r} is APNs: the device token must be 64 hex characters", field)
    elif not FCM_TOKEN_RE.match(device_token):
        raise ApiRefused(400, f"app {app.name!r} is FCM: the registration token must be 32 to 4096 characters "
                              "of A-Z a-z 0-9 _ : . -", field)


def device_json(relay: Relay, device: Device) -> dict[str, object]:
    """The API's view of one registry entry."""
    app = relay.config.apps.get(device.app)
    return {
        "parley_token": device.token,
        "app": device.app,
        "platform": app.platform if app is not None else None,
        "device_token": device.device_token,
        "source": "runtime" if relay.registry.is_runtime(device.token) else "yaml",
        "dead": relay.registry.is_dead(device.token),
    }


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiRefused(400, f"the body is not JSON: {str(exc)[:200]}", "body") from exc
    if not isinstance(body, dict):
        raise ApiRefused(400, "the body must be a JSON object {app, device_token?}", "body")
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _store_down(exc: StoreError) -> ApiRefused:
    return ApiRefused(503, f"store unavailable, retry later ({str(exc)[:200]})", headers={"Retry-After": "5"})


# -- handlers ----------------------------------------------------------------------------------------


async def put_device(request: web.Request, relay: Relay, key: ApiKey) -> web.Response:
    """Create or replace a run-time device; revives a dead token and releases its parked deliveries."""
    token = _path_token(request)
    body = await _json_object(request)
    unknown = sorted(set(body) - _BODY_FIELDS)
    if unknown:
        raise ApiRefused(400, "unknown field (allowed: app, device_token)", unknown[0][:100])
    app = _allowed_app(relay, key, body.get("app"))
    device_token = body.get("device_token")
    if device_token is not None and not isinstance(device_token, str):
        raise ApiRefused(400, "must be a string", "device_token")
    existing = _own_entry(relay, key, token)
    if device_token is None:
        # The Parley token is the provider token itself unless told otherwise (as in the YAML registry).
        check_device_token(app, token, "device_token")
        device_token = token
    else:
        check_device_token(app, device_token)
    device = Device(token, app.name, device_token)
    now = relay.clock.now()
    try:
        await relay.store.put_device(device, now)
        relay.registry.put(device)
        woken = await relay.store.wake(now, reasons={WaitReason.UNROUTABLE}, tokens=[token])
    except StoreError as exc:
        raise _store_down(exc) from exc
    if woken and relay.dispatcher is not None:
        relay.dispatcher.wake()
    event(logging.INFO, "device registered", key=key.name, app=app.name, token=short_token(token),
          replaced=existing is not None, released=woken)
    return web.json_response(device_json(relay, device), status=200 if existing is not None else 201)


async def get_device(request: web.Request, relay: Relay, key: ApiKey) -> web.Response:
    """One device (run-time or YAML) of this key's apps."""
    token = _path_token(request)
    entry = _own_entry(relay, key, token)
    if entry is None:
        raise ApiRefused(404, "no device is registered with this push token", "parley_token")
    return web.json_response(device_json(relay, entry))


async def delete_device(request: web.Request, relay: Relay, key: ApiKey) -> web.Response:
    """Remove a run-time device; a YAML entry of the same token (if any) applies again."""
    token = _path_token(request)
    entry = _own_entry(relay, key, token)
    if entry is None:
        raise ApiRefused(404, "no device is registered with this push token", "parley_token")
    if not relay.registry.is_runtime(token):
        raise ApiRefused(409, "this device is listed in the registry file; remove it there", "parley_token")
    try:
        await relay.store.remove_device(token)
    except StoreError as exc:
        raise _store_down(exc) from exc
    relay.registry.remove(token)
    event(logging.INFO, "device removed", key=key.name, app=entry.app, token=short_token(token))
    return web.json_response({"status": "deleted", "parley_token": token})


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise ApiRefused(400, f"must be an integer from 1 to {MAX_LIMIT}", "limit")
    return int(value)


async def list_devices(request: web.Request, relay: Relay, key: ApiKey) -> web.Response:
    """YAML and run-time devices of this key's apps (or of ``app``), sorted by token, ``limit`` per page."""
    query = request.query
    unknown = sorted(set(query) - _LIST_PARAMETERS)
    if unknown:
        raise ApiRefused(400, "unknown query parameter (allowed: app, cursor, limit)", unknown[0][:100])
    limit = _limit(query.get("limit"))
    cursor = query.get("cursor", "")
    if "cursor" in query and not PARLEY_TOKEN_RE.match(cursor):
        raise ApiRefused(400, "must be the next_cursor of the previous page (a push token)", "cursor")
    apps = {_allowed_app(relay, key, query["app"]).name} if "app" in query else set(key.apps)
    # One pass, no sort of the whole registry: ~12 ms a page over 100k devices.
    page = heapq.nsmallest(limit + 1, (t for t, app in relay.registry.tokens() if app in apps and t > cursor))
    more = len(page) > limit
    devices = [entry for entry in map(relay.registry.entry, page[:limit]) if entry is not None]
    return web.json_response({
        "devices": [device_json(relay, d) for d in devices],
        "next_cursor": page[limit - 1] if more else None,
    })


@cache
def openapi_document() -> bytes:
    """The OpenAPI 3.1 document shipped in the package (``relay/http/openapi.json``)."""
    return resources.files("relay.http").joinpath("openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    """The API's contract, without authentication."""
    return web.Response(body=openapi_document(), content_type="application/json")


def add_api_routes(app: web.Application) -> None:
    """Register ``/v1/`` on the relay's application (keys are read per request, so reloads apply)."""
    app.router.add_put(f"{PREFIX}/devices/{{parley_token}}", _operation("put", put_device))
    app.router.add_get(f"{PREFIX}/devices/{{parley_token}}", _operation("get", get_device), allow_head=False)
    app.router.add_delete(f"{PREFIX}/devices/{{parley_token}}", _operation("delete", delete_device))
    app.router.add_get(f"{PREFIX}/devices", _operation("list", list_devices), allow_head=False)
    app.router.add_get(f"{PREFIX}/openapi.json", openapi, allow_head=False)
