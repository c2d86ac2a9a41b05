"""Parley's webhook: ``authenticate -> parse -> store (durable) -> 200``, and the OAuth token endpoint.

The answer never waits on APNs or FCM: delivery reads the store afterwards (SPEC §2).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

from aiohttp import web

from relay.config.model import App
from relay.delivery import trace
from relay.errors import InvalidWebhook, StoreError
from relay.http.errors import REQUEST_ID_KEY, error_response
from relay.inbound.accept import new_deliveries
from relay.inbound.auth import AuthFailed
from relay.inbound.parse import KNOWN_EVENTS, Event, Message, parse_webhook
from relay.observability import event, log, short_token, trace_budget
from relay.outcome import EndState
from relay.running import RELAY_KEY, Relay
from relay.store.base import Enqueued, NewDelivery


async def webhook(request: web.Request) -> web.Response:
    """Parley's push webhook: 200 only once every delivery is durably stored (SPEC §2)."""
    relay = request.app[RELAY_KEY]
    started = time.perf_counter()
    result, response = await _handle_webhook(request, relay)
    relay.metrics.child(relay.metrics.webhooks, result).inc()
    relay.metrics.ack_latency.observe(time.perf_counter() - started)
    return response


async def _handle_webhook(request: web.Request, relay: Relay) -> tuple[str, web.Response]:
    settings = relay.config.webhook
    rid = request.get(REQUEST_ID_KEY, "-")
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        event(logging.WARNING, "webhook refused", request_id=rid, status=413, reason="body too large")
        return "too_large", error_response(413, f"body larger than {settings.max_body_bytes} bytes")
    try:
        async with asyncio.timeout(settings.read_timeout):  # a slow sender cannot hold the handler
            body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        event(logging.WARNING, "webhook refused", request_id=rid, status=413, reason="body too large")
        return "too_large", error_response(413, f"body larger than {settings.max_body_bytes} bytes")
    except TimeoutError:
        event(logging.WARNING, "webhook refused", request_id=rid, status=408, reason="body not received in time")
        return "timeout", error_response(408, f"body not received within {settings.read_timeout:g} s")
    try:
        relay.auth.authenticate(request.headers, body, request.remote)
    except AuthFailed as exc:
        event(logging.DEBUG if exc.quiet else logging.WARNING, "webhook refused", request_id=rid,
              status=exc.status, reason=exc.reason, peer=request.remote or "-")
        if exc.status == 429:
            return "rate_limited", error_response(429, "too many failed authentications, retry later",
                                          **{"Retry-After": str(int(exc.retry_after or 60))})
        headers = {"WWW-Authenticate": exc.www_authenticate} if exc.www_authenticate else {}
        return "unauthorized", error_response(401, "authentication failed", **headers)
    try:
        hook = parse_webhook(body, max_tokens=settings.max_tokens)
    except InvalidWebhook as exc:
        event(logging.WARNING, "webhook refused", request_id=rid, status=exc.status, reason=exc.message,
              field=exc.field or "-")
        return "invalid", error_response(exc.status, exc.message, exc.field)
    if hook.ignored:
        event(logging.INFO, "webhook ignored", request_id=rid, type=hook.type[:40])
        return "ignored", web.json_response({"status": "ignored", "type": hook.type})
    if (settings.unknown_events == "ignore" and isinstance(hook.notification, Event)
            and hook.notification.name not in KNOWN_EVENTS):
        event(logging.INFO, "webhook ignored", request_id=rid, type="event", event_name=hook.notification.name[:40])
        return "ignored", web.json_response({"status": "ignored", "type": "event", "event": hook.notification.name})
    if settings.reject_dead_tokens and await _all_dead(relay, hook.tokens):
        event(logging.INFO, "webhook for dead token refused", request_id=rid, tokens=len(hook.tokens))
        return "dead_token", error_response(410, "push token is dead (reported by the push provider)")
    now = relay.clock.now()
    message_id = str(hook.notification.id) if isinstance(hook.notification, Message) else None
    items = new_deliveries(hook, relay.config, now, functools.partial(_app_of, relay), rid)
    try:
        accepted = await relay.store.enqueue(items, now, settings.dedupe_window)
    except StoreError as exc:
        event(logging.ERROR, "store unavailable, webhook answered 503", request_id=rid, error=str(exc))
        return "store_unavailable", error_response(503, "store unavailable, retry later", **{"Retry-After": "5"})
    fresh = sum(accepted)
    _count(relay, items, accepted, rid, now)
    if relay.dispatcher is not None and fresh:
        relay.dispatcher.wake()
    # The hot path: build the fields only when they are written, within the routine-line budget.
    if log.isEnabledFor(logging.INFO) and trace_budget.allow("webhook accepted"):
        # The first line of a request's trace (SPEC §8): the delivery lines repeat its request_id.
        extra = {"message_id": message_id} if message_id is not None else {}
        event(logging.INFO, "webhook accepted", request_id=rid, type=hook.type, **extra, accepted=fresh,
              duplicates=len(items) - fresh, tokens=",".join(short_token(t) for t in hook.tokens[:5]))
    status = "accepted" if fresh else "duplicate"
    return status, _accepted_answer(status, fresh, len(items) - fresh)


async def _all_dead(relay: Relay, tokens: tuple[str, ...]) -> bool:
    """Whether every token is marked dead, as the store says now (the delivery process marks them)."""
    try:
        await relay.overlay.refresh()
    except StoreError:
        pass  # the enqueue that follows answers 503 if the store is really down
    return all(relay.registry.is_dead(t) for t in tokens)


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


def _app_of(relay: Relay, token: str) -> App | None:
    """The app a token routes to now: the store admits deliveries per app by it (delivery routes again)."""
    route = relay.registry.lookup(token)
    return route.app if route is not None else None


def _count(relay: Relay, items: list[NewDelivery], accepted: Enqueued, rid: str, now: float) -> None:
    """Metrics of what the store did: deliveries accepted, and queued events superseded by this webhook's
    (counted and logged like any other end: they are never sent)."""
    for item, ok in zip(items, accepted, strict=True):
        if ok:
            relay.metrics.child(relay.metrics.accepted, item.kind).inc()
    for ended in accepted.superseded:
        app = relay.config.apps.get(ended.app or "")
        relay.metrics.child(relay.metrics.ended, app.platform if app else "none", ended.app or "none", "event",
                            EndState.SUPERSEDED.value).inc()
        trace.delivery_superseded(ended, now, rid)
