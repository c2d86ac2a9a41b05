"""HTTP stage: the aiohttp application (webhook, health, metrics) and its resources' lifecycle.

Request path: ``authenticate -> parse -> store (durable) -> 200``. The answer never waits on APNs or FCM:
the dispatcher, started in a ``cleanup_ctx``, delivers from the store afterwards.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.auth import Authenticator, AuthFailed, build_authenticator
from relay.config import App, Config, OAuthSettings, load_config
from relay.dispatch import Clock, Dispatcher, SystemClock
from relay.errors import ConfigError, InvalidWebhook, StoreError
from relay.inbound import KNOWN_EVENTS, Event, dedupe_key, parse_webhook
from relay.observability import Metrics, event, log, short_token
from relay.providers import Bounded, create_provider
from relay.registry import Registry, load_registry
from relay.store import Store, create_store
from relay.store.base import NewDelivery


@dataclass
class Relay:
    """Everything one running relay holds; reachable from handlers through ``RELAY_KEY``."""

    config: Config
    store: Store
    registry: Registry
    metrics: Metrics
    clock: Clock
    auth: Authenticator
    providers: dict[str, Bounded] = field(default_factory=dict)
    dispatcher: Dispatcher | None = None
    started: bool = False
    draining: bool = False
    retiring: set[asyncio.Task[None]] = field(default_factory=set)

    async def reload(self) -> bool:
        """Re-read the config and registry; on any error the old ones stay in force."""
        try:
            config = load_config(self.config.source)
            base = load_registry(config.registry, config.apps)
            # Every app gets a fresh provider: a rotated key file keeps its path but not its contents.
            fresh = await _create_providers(config.apps, config.delivery.send_timeout)
        except (ConfigError, OSError) as exc:
            self.metrics.reloads.labels("rejected").inc()
            event(logging.ERROR, "reload rejected, previous configuration stays in force", error=str(exc))
            return False
        old, self.providers = self.providers, fresh
        self.registry.replace(config.apps, base)
        self.registry.load_overlay(await self.store.list_devices(), (await self.store.dead_tokens()).keys())
        self.config = config
        self.auth = build_authenticator(config.auth, previous=self.auth)  # keeps the failure counts
        for provider in old.values():  # in-flight sends finish on the old credentials, then it closes
            task = asyncio.get_running_loop().create_task(provider.retire())
            self.retiring.add(task)
            task.add_done_callback(self.retiring.discard)
        if self.dispatcher is not None:
            self.dispatcher.configure(config.delivery)
            self.dispatcher.clear_alarms()
            await self.store.wake(None, self.clock.now())
            self.dispatcher.wake()
        self.metrics.reloads.labels("ok").inc()
        event(logging.INFO, "configuration reloaded", apps=len(config.apps), devices=len(self.registry))
        return True

    @property
    def ready_problems(self) -> list[str]:
        problems = [] if self.started else ["starting"]
        if self.draining:
            problems.append("draining")
        if self.dispatcher is not None:
            problems += [f"app {app}: {reason}" for app, reason in sorted(self.dispatcher.alarms.items())]
        return problems


RELAY_KEY = web.AppKey("relay", Relay)
REQUEST_ID_KEY = web.RequestKey("request_id", str)


async def _create_providers(apps: Mapping[str, App], timeout: float) -> dict[str, Bounded]:
    created: dict[str, Bounded] = {}
    try:
        for name, app in apps.items():
            created[name] = await create_provider(app, timeout)
    except BaseException:
        for provider in created.values():
            await provider.close()
        raise
    return created


def _error(status: int, message: str, field_name: str | None = None, **extra: str) -> web.Response:
    body: dict[str, object] = {"status": "error", "error": message}
    if field_name:
        body["field"] = field_name
    return web.json_response(body, status=status, headers=extra or None)


async def webhook(request: web.Request) -> web.Response:
    """Parley's push webhook: 200 only once every delivery is durably stored (SPEC §2)."""
    relay = request.app[RELAY_KEY]
    started = time.perf_counter()
    result, response = await _handle_webhook(request, relay)
    relay.metrics.webhooks.labels(result).inc()
    relay.metrics.ack_latency.observe(time.perf_counter() - started)
    return response


async def _handle_webhook(request: web.Request, relay: Relay) -> tuple[str, web.Response]:
    settings = relay.config.webhook
    rid = request.get(REQUEST_ID_KEY, "-")
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        event(logging.WARNING, "webhook refused", request_id=rid, status=413, reason="body too large")
        return "too_large", _error(413, f"body larger than {settings.max_body_bytes} bytes")
    try:
        async with asyncio.timeout(settings.read_timeout):  # a slow sender cannot hold the handler
            body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        event(logging.WARNING, "webhook refused", request_id=rid, status=413, reason="body too large")
        return "too_large", _error(413, f"body larger than {settings.max_body_bytes} bytes")
    except TimeoutError:
        event(logging.WARNING, "webhook refused", request_id=rid, status=408, reason="body not received in time")
        return "timeout", _error(408, f"body not received within {settings.read_timeout:g} s")
    try:
        relay.auth.authenticate(request.headers, body, request.remote)
    except AuthFailed as exc:
        event(logging.DEBUG if exc.quiet else logging.WARNING, "webhook refused", request_id=rid,
              status=exc.status, reason=exc.reason, peer=request.remote or "-")
        if exc.status == 429:
            return "rate_limited", _error(429, "too many failed authentications, retry later",
                                          **{"Retry-After": str(int(exc.retry_after or 60))})
        headers = {"WWW-Authenticate": exc.www_authenticate} if exc.www_authenticate else {}
        return "unauthorized", _error(401, "authentication failed", **headers)
    try:
        hook = parse_webhook(body, max_tokens=settings.max_tokens)
    except InvalidWebhook as exc:
        event(logging.WARNING, "webhook refused", request_id=rid, status=exc.status, reason=exc.message,
              field=exc.field or "-")
        return "invalid", _error(exc.status, exc.message, exc.field)
    if hook.ignored:
        event(logging.INFO, "webhook ignored", request_id=rid, type=hook.type[:40])
        return "ignored", web.json_response({"status": "ignored", "type": hook.type})
    if (settings.unknown_events == "ignore" and isinstance(hook.notification, Event)
            and hook.notification.name not in KNOWN_EVENTS):
        event(logging.INFO, "webhook ignored", request_id=rid, type="event", event=hook.notification.name[:40])
        return "ignored", web.json_response({"status": "ignored", "type": "event", "event": hook.notification.name})
    if settings.reject_dead_tokens and all(relay.registry.is_dead(t) for t in hook.tokens):
        event(logging.INFO, "webhook for dead token refused", request_id=rid, tokens=len(hook.tokens))
        return "dead_token", _error(410, "push token is dead (reported by the push provider)")
    now = relay.clock.now()
    ttl = relay.config.delivery.max_age if hook.type == "message" else _event_ttl(relay)
    items = [NewDelivery(t, hook.type, hook.data, dedupe_key(hook, t), now + ttl) for t in hook.tokens]
    try:
        accepted = await relay.store.enqueue(items, now, settings.dedupe_window)
    except StoreError as exc:
        event(logging.ERROR, "store unavailable, webhook answered 503", request_id=rid, error=str(exc))
        return "store_unavailable", _error(503, "store unavailable, retry later", **{"Retry-After": "5"})
    fresh = sum(accepted)
    for item, ok in zip(items, accepted, strict=True):
        if ok:
            relay.metrics.accepted.labels(item.kind).inc()
    if relay.dispatcher is not None and fresh:
        relay.dispatcher.wake()
    if log.isEnabledFor(logging.DEBUG):  # the hot path: build the fields only when they are written
        event(logging.DEBUG, "webhook accepted", request_id=rid, type=hook.type, accepted=fresh,
              duplicates=len(items) - fresh, tokens=",".join(short_token(t) for t in hook.tokens[:5]))
    status = "accepted" if fresh else "duplicate"
    return status, _accepted_answer(status, fresh, len(items) - fresh)


@functools.lru_cache(maxsize=256)
def _accepted_body(status: str, accepted: int, duplicates: int) -> bytes:
    return json.dumps({"status": status, "accepted": accepted, "duplicates": duplicates}).encode()


def _accepted_answer(status: str, accepted: int, duplicates: int) -> web.Response:
    # Answers repeat (almost always one token): encode each shape once, not per request.
    return web.Response(body=_accepted_body(status, accepted, duplicates), content_type="application/json")


async def oauth_token(request: web.Request) -> web.Response:
    """OAuth 2.0 token endpoint for Parley's pushType 5 (SPEC §3, RFC 6749 §4.4)."""
    relay = request.app[RELAY_KEY]
    return await relay.auth.token_endpoint(request, read_timeout=relay.config.webhook.read_timeout,
                                           request_id=request.get(REQUEST_ID_KEY, "-"))


def runner_options(config: Config) -> dict[str, Any]:
    """``web.AppRunner`` keyword arguments that stop slow clients from holding connections.

    aiohttp closes a connection whose next request's headers are not complete ``keepalive_timeout`` after
    the connection opened or the last answer (trickled headers do not extend it); the body has
    ``webhook.read_timeout`` (408). ``lingering_time`` bounds how long an unread body is drained after that.
    """
    return {"keepalive_timeout": config.listen.idle_timeout, "lingering_time": 2.0}


def _event_ttl(relay: Relay) -> float:
    return float(max((app.policy.event_ttl for app in relay.config.apps.values()), default=30))


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: store reachable, credentials loaded, no app alarmed."""
    relay = request.app[RELAY_KEY]
    problems = relay.ready_problems
    try:
        await asyncio.wait_for(relay.store.ping(), 2)
    except (StoreError, TimeoutError) as exc:
        problems.append(f"store: {exc or 'timeout'}")
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    relay = request.app[RELAY_KEY]
    try:
        stats = await relay.store.stats()
        relay.metrics.queue_depth.set(stats.pending + stats.inflight)
    except StoreError:
        pass
    commits = getattr(relay.store, "commits", None)
    if commits is not None:
        relay.metrics.store_commits.set(commits)
    body = generate_latest(relay.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request ids, JSON errors for everything, and never a stack trace to the client."""
    request[REQUEST_ID_KEY] = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex[:16]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status == 413:
            return _error(413, "body too large")
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}  # RFC 9110 §15.5.6: 405 lists methods
        return _error(exc.status, exc.reason, **allow)
    except Exception:
        logging.getLogger(__name__).exception("unhandled error")
        event(logging.ERROR, "unhandled error", request_id=request[REQUEST_ID_KEY], path=request.path)
        return _error(500, "internal error")
    response.headers["X-Request-Id"] = request[REQUEST_ID_KEY]
    return response


def create_app(config: Config, *, metrics_registry: Metrics | None = None, clock: Clock | None = None,
               store: Store | None = None, run_dispatcher: bool = True) -> web.Application:
    """The relay's aiohttp application; resources open and close with it."""
    app = web.Application(client_max_size=config.webhook.max_body_bytes, middlewares=[errors_middleware])
    relay = Relay(
        config=config,
        store=store or create_store(config.store),
        registry=Registry(config.apps, load_registry(config.registry, config.apps)),
        metrics=metrics_registry or Metrics(),
        clock=clock or SystemClock(),
        auth=build_authenticator(config.auth),
    )
    app[RELAY_KEY] = relay
    app.router.add_post(config.webhook.path, webhook)
    # Always routed (404 JSON while OAuth is off), so a reload can enable OAuth; moving its path takes a restart.
    app.router.add_post(config.auth.oauth.path if config.auth.oauth else OAuthSettings.path, oauth_token)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if config.metrics.listen is None:  # else only the operator's separate listener serves it (create_ops_app)
        app.router.add_get("/metrics", metrics)
    if config.api.listener == "webhook":
        from relay.api import add_api_routes

        add_api_routes(app)  # even without keys: they are read per request, so a reload can enable or rotate them
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_providers_ctx)
    if run_dispatcher:
        app.cleanup_ctx.append(_dispatcher_ctx)
    app.on_startup.append(_mark_started)
    return app


def create_ops_app(relay: Relay) -> web.Application:
    """``/metrics``, ``/healthz`` and ``/readyz`` for a separate listener; ``relay`` is owned by the main app."""
    app = web.Application(middlewares=[errors_middleware])
    app[RELAY_KEY] = relay
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if relay.config.api.listener == "metrics":
        from relay.api import add_api_routes

        add_api_routes(app)
    return app


async def _mark_started(app: web.Application) -> None:
    app[RELAY_KEY].started = True


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    relay = app[RELAY_KEY]
    await relay.store.open()
    relay.registry.load_overlay(await relay.store.list_devices(), (await relay.store.dead_tokens()).keys())
    yield
    await relay.store.close()


async def _providers_ctx(app: web.Application) -> AsyncIterator[None]:
    relay = app[RELAY_KEY]
    relay.providers = await _create_providers(relay.config.apps, relay.config.delivery.send_timeout)
    yield
    if relay.retiring:
        await asyncio.wait(set(relay.retiring))
    for provider in relay.providers.values():
        await provider.close()


async def _dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
    relay = app[RELAY_KEY]
    dispatcher = Dispatcher(relay.store, relay.registry, lambda: relay.providers, relay.config.delivery,
                            relay.metrics, relay.clock)
    relay.dispatcher = dispatcher
    task = asyncio.get_running_loop().create_task(dispatcher.run(), name="dispatcher")
    yield
    relay.draining = True
    await dispatcher.stop(relay.config.shutdown_timeout)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
