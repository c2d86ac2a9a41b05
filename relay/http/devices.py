"""Device API stage: apps (or their backends) register push tokens at run time under ``/v1/``.

Request path: ``API key -> refresh the registry copy -> validate -> store.put_device (durable, scope decided
in the same transaction) -> refresh -> wake parked deliveries``. A device registered here persists in the
store (either backend), overlays the YAML registry, survives restarts and reloads, and steers the next push of
every process and instance (they refresh from the store's device epoch, :mod:`relay.registry.sync`).

Each API key (``api.keys`` in the config, kept as SHA-256 only) may touch the devices of its own apps only,
within its scope (:mod:`relay.registry.scope`, decided by the store): a ``register`` key (the kind an app may
carry: it can be extracted) may only register a token as itself, never map it to another device token,
overwrite an entry that maps elsewhere, delete or list; a ``manage`` key (a backend's) may do all of that.
Every answer is JSON; a refused request names the field at fault. The contract is ``relay/http/openapi.json``,
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
from relay.config.model import APNS_ENVIRONMENTS, ApnsEnvironment
from relay.errors import RelayError, StoreError
from relay.http.errors import error_body
from relay.observability import event, short_token
from relay.outcome import WaitReason
from relay.registry.device import Device, as_environment, device_token_problem
from relay.registry.scope import Refusal, Removal, Scope
from relay.running import RELAY_KEY, Relay

PREFIX = "/v1"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Parley push tokens travel in the URL (path, cursor): URL-safe characters only (FCM and APNs tokens fit), and
# short enough that even percent-encoded they stay under aiohttp's 8190-byte request line.
MAX_TOKEN_CHARS = 2048
PARLEY_TOKEN_RE = re.compile(r"^[A-Za-z0-9_:.+=~-]{1,2048}$")
_BODY_FIELDS = frozenset({"app", "device_token", "environment"})
_LIST_PARAMETERS = frozenset({"app", "cursor", "limit"})


class ApiRefused(RelayError):
    """A device API request answered with a 4xx/503 JSON error; ``field`` names what is at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, *,
                 apps: list[str] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.apps = status, message, field, apps
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = error_body(self.message, self.field)
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
            await _refresh(relay)
            response = await handler(request, relay, key)
        except ApiRefused as exc:
            response = exc.response()
            level = logging.ERROR if exc.status >= 500 else logging.WARNING
            event(level, "device API request refused", operation=name, status=exc.status, key=key_name,
                  field=exc.field or "-", reason=exc.message, peer=request.remote or "-")
        relay.metrics.api_requests.labels(name, str(response.status)).inc()
        return response

    return run


async def _refresh(relay: Relay) -> None:
    """Catch up with device changes made elsewhere (the delivery process's dead marks, the CLI, another
    instance), so that what this request reads and answers is the store's state now."""
    try:
        await relay.overlay.refresh()
    except StoreError as exc:
        raise _store_down(exc) from exc


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
    problem = device_token_problem(app, device_token)
    if problem is not None:
        raise ApiRefused(400, problem, field)


def _environment(app: App, value: object) -> ApnsEnvironment | None:
    """The body's optional ``environment``: the APNs host of the device token (a development build: sandbox)."""
    if value is None:
        return None
    environment = as_environment(value)
    if environment is None:
        raise ApiRefused(400, f"must be one of {', '.join(APNS_ENVIRONMENTS)} or null", "environment")
    if app.platform != "apns":
        raise ApiRefused(400, f"app {app.name!r} is FCM: only APNs devices have an environment", "environment")
    return environment


# A refused conditional write (decided in the store, see relay.registry.scope) as the API answers it.
_REFUSALS = {
    Refusal.OTHER_APP: ("this push token is registered to an app this API key may not manage", "parley_token"),
    Refusal.NOT_ITSELF: ("this API key (scope register) may only register a push token as itself: mapping it "
                         "to another device_token needs a key with scope manage", "device_token"),
    Refusal.TAKEN: ("this push token is registered to another device or app; a key with scope register cannot "
                    "replace it (scope manage can)", "parley_token"),
    Refusal.ENVIRONMENT: ("this push token is already registered: a key with scope register cannot change its "
                          "environment (scope manage can)", "environment"),
}


def _scope(relay: Relay, key: ApiKey, token: str) -> Scope:
    return Scope(key.manages, frozenset(key.apps), frozenset(relay.config.apps), relay.registry.file_entry(token))


def _require_manage(key: ApiKey, what: str) -> None:
    if not key.manages:
        raise ApiRefused(403, f"this API key has scope register: {what} needs a key with scope manage",
                         "Authorization", apps=list(key.apps))


def device_json(relay: Relay, device: Device) -> dict[str, object]:
    """The API's view of one registry entry; ``environment`` is the declared one, else one the relay learned."""
    app = relay.config.apps.get(device.app)
    return {
        "parley_token": device.token,
        "app": device.app,
        "platform": app.platform if app is not None else None,
        "device_token": device.device_token,
        "environment": device.environment or relay.registry.learned_environment(device.device_token),
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
        raise ApiRefused(400, "the body must be a JSON object {app, device_token?, environment?}", "body")
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
        raise ApiRefused(400, "unknown field (allowed: app, device_token, environment)", unknown[0][:100])
    app = _allowed_app(relay, key, body.get("app"))
    device_token = body.get("device_token")
    if device_token is not None and not isinstance(device_token, str):
        raise ApiRefused(400, "must be a string", "device_token")
    environment = _environment(app, body.get("environment"))
    _own_entry(relay, key, token)  # another app's entry: refused first, as the store would
    if device_token is None:
        # The Parley token is the provider token itself unless told otherwise (as in the YAML registry).
        check_device_token(app, token, "device_token")
        device_token = token
    else:
        check_device_token(app, device_token)
    if not key.manages and device_token != token:  # refused before the store is asked (also decided there)
        raise ApiRefused(403, *_REFUSALS[Refusal.NOT_ITSELF])
    scope = _scope(relay, key, token)
    now = relay.clock.now()
    try:
        # The scope is decided in the store, against the entry as it is there, in the write's own transaction.
        put = await relay.store.put_device(Device(token, app.name, device_token, environment), now, scope)
        if put.device is None:
            raise ApiRefused(403, *_REFUSALS[put.refusal or Refusal.TAKEN], apps=list(key.apps))
        await relay.overlay.refresh()
        woken = await relay.store.wake(now, reasons={WaitReason.UNROUTABLE}, tokens=[token])
    except StoreError as exc:
        raise _store_down(exc) from exc
    if woken and relay.dispatcher is not None:
        relay.dispatcher.wake()
    existing = put.replaced or scope.base
    event(logging.INFO, "device registered", key=key.name, scope=key.scope, app=app.name, token=short_token(token),
          environment=put.device.environment or "-", replaced=existing is not None, released=woken)
    return web.json_response(device_json(relay, put.device), status=200 if existing is not None else 201)


async def get_device(request: web.Request, relay: Relay, key: ApiKey) -> web.Response:
    """One device (run-time or YAML) of this key's apps (scope register: only an entry registered as itself)."""
    token = _path_token(request)
    entry = _own_entry(relay, key, token)
    if entry is None:
        raise ApiRefused(404, "no device is registered with this push token", "parley_token")
    if not key.manages and entry.device_token != token:
        # A mapped entry names someone's device token: only a backend (scope manage) may read it.
        raise ApiRefused(403, "this push token is mapped to another device token; reading it needs a key with "
                              "scope manage", "parley_token")
    return web.json_response(device_json(relay, entry))


async def delete_device(request: web.Request, relay: Relay, key: ApiKey) -> web.Response:
    """Remove a run-time device; a YAML entry of the same token (if any) applies again."""
    token = _path_token(request)
    _require_manage(key, "deleting a device")
    entry = _own_entry(relay, key, token)
    if entry is None:
        raise ApiRefused(404, "no device is registered with this push token", "parley_token")
    if not relay.registry.is_runtime(token):
        raise ApiRefused(409, "this device is listed in the registry file; remove it there", "parley_token")
    try:
        removed = await relay.store.remove_device(token, _scope(relay, key, token))
        await relay.overlay.refresh()
    except StoreError as exc:
        raise _store_down(exc) from exc
    if removed is Removal.ABSENT:  # removed by someone else since this request read it
        raise ApiRefused(404, "no device is registered with this push token", "parley_token")
    if removed is not Removal.REMOVED:  # re-registered to another app meanwhile
        raise ApiRefused(403, _REFUSALS[Refusal.OTHER_APP][0], "parley_token", apps=list(key.apps))
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
    _require_manage(key, "listing devices")  # an app's key must not enumerate every user's push token
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
