"""Acceptance: a parsed webhook -> the deliveries the store keeps (SPEC §2), and how long each is worth sending.

The one home of two decisions:

- **Lifetime.** A message may be sent for ``delivery.max_age``; an event for its app's ``event_ttl`` (a late
  "typing…" is worse than none). At acceptance a token's app is only a hint (it may route nowhere yet), so an
  unroutable event gets the longest ``event_ttl`` of all apps; delivery narrows it with :func:`deadline` to
  the app it routes to, and translation turns the deadline into the provider's field (APNs
  ``apns-expiration``, FCM ``ttl`` by :func:`seconds_left`).
- **Resends.** A message is a resend by (``object.id``, token) within ``webhook.dedupe_window``. An event has no
  id or time: it belongs to a *stream* (push token, agent, topic: typing events share one, any other event
  name is its own) and is a resend only when it repeats the stream's last event within
  ``dedupe.event_window``, never longer than its TTL. The store applies both atomically, and ends the
  stream's queued event ``superseded`` when a new one arrives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

from relay.config.model import App, Config, Policy
from relay.inbound.parse import KNOWN_EVENTS, Event, Message, Webhook, dedupe_key
from relay.store.base import EventStream, NewDelivery

TYPING = "typing"  # the topic of startTyping/stopTyping: a stopTyping supersedes its startTyping


def event_ttl(app: App | None, apps: Mapping[str, App]) -> float:
    """Seconds an event may be sent after it arrived: its app's ``event_ttl``, or while its token routes
    nowhere the longest of all apps (the token may be registered later, to any of them)."""
    if app is not None:
        return float(app.policy.event_ttl)
    return float(max((a.policy.event_ttl for a in apps.values()), default=Policy.event_ttl))


def deadline(kind: str, received_at: float, app: App | None, apps: Mapping[str, App], max_age: float) -> float:
    """When a delivery of ``kind`` accepted at ``received_at`` (to ``app``, if known) stops being worth sending."""
    return received_at + (event_ttl(app, apps) if kind == "event" else max_age)


def seconds_left(expires_at: float, now: float) -> int:
    """A deadline as a provider's time to live in whole seconds (at least 1: 0 would mean "now or never")."""
    return max(1, int(expires_at - now))


def event_stream(event: Event, data: bytes, token: str, window: float, ttl: float) -> EventStream:
    """The stream ``event`` for ``token`` belongs to; its resend window is ``window`` but never past ``ttl``."""
    agent = event.agent
    who = "-" if agent is None else (f"id:{agent.id}" if agent.id is not None else f"name:{agent.name or ''}")
    topic = TYPING if event.name in KNOWN_EVENTS else f"event:{event.name}"
    key = hashlib.sha256("\0".join((token, who, topic)).encode()).hexdigest()[:32]
    return EventStream(key, hashlib.sha256(data).hexdigest()[:32], max(0.0, min(window, ttl)))


def new_deliveries(hook: Webhook, config: Config, now: float, app_of: Callable[[str], App | None],
                   request_id: str) -> list[NewDelivery]:
    """One delivery per token of ``hook`` (not an ignored one), with its deadline and resend rule.

    ``app_of`` is the app a token routes to now (the store's admission hint; delivery routes again).
    """
    notification = hook.notification
    message_id = str(notification.id) if isinstance(notification, Message) else None
    items = []
    for token in hook.tokens:
        app = app_of(token)
        expires_at = deadline(hook.type, now, app, config.apps, config.delivery.max_age)
        stream = None
        if isinstance(notification, Event):
            stream = event_stream(notification, hook.data, token, config.dedupe.event_window, expires_at - now)
        items.append(NewDelivery(token, hook.type, hook.data, dedupe_key(hook, token), expires_at,
                                 app.name if app is not None else None, request_id, message_id, stream))
    return items
