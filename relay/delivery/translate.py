"""Translation stage: a Parley notification + its route -> an ``ApnsPush`` or ``FcmPush`` (pure, no I/O).

SPEC §5. Every push carries the ``parley`` key the Parley mobile SDKs read: a JSON *string* of
``{"type": ..., "object": {...}}`` where ``object`` is Parley's object as received, with ``id``/``typeId`` as
numbers, ``body`` the text and (alerts) ``title`` the title. The whole payload is budgeted against the
providers' 4096-byte limits by :mod:`relay.delivery.budget`, whatever field is long: a push always fits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from relay.config import ApnsApp, FcmApp, Policy
from relay.delivery.budget import (
    APNS_MAX_PAYLOAD,
    ELLIPSIS,
    FCM_MAX_PAYLOAD,
    MAX_TITLE,
    DoesNotFit,
    Draft,
    fcm_size,
    fit,
    shorten,
)
from relay.inbound.accept import seconds_left
from relay.inbound.parse import Event, Message, Notification
from relay.push import ApnsPush, FcmPush, Push
from relay.registry.device import Route

__all__ = [
    "APNS_MAX_PAYLOAD", "ELLIPSIS", "FCM_MAX_PAYLOAD", "MAX_TITLE", "DoesNotFit", "counted_size", "draft",
    "parley_object", "render", "shorten", "to_apns", "to_fcm", "translate",
]

# Members of the ``parley`` object the budget manages itself (never cut as "other strings") and those it never
# removes: what the SDKs read (SPEC §5).
_MESSAGE_FIXED = frozenset({"id", "typeId", "body", "image"})
_MESSAGE_PROTECTED = frozenset({("id",), ("typeId",), ("body",), ("image",)})
_ALERT_FIXED = _MESSAGE_FIXED | {"title"}
_ALERT_PROTECTED = _MESSAGE_PROTECTED | {("title",)}
_EVENT_FIXED = frozenset({"name"})
_EVENT_PROTECTED = frozenset({("name",), ("body",), ("body", "agent"), ("body", "agent", "id")})


class _Blank(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{agent}``/``{message}`` placeholders; unknown names render empty, never raise."""
    try:
        return template.format_map(_Blank(values))
    except (ValueError, IndexError, AttributeError, KeyError):
        return template


def _agent_json(agent: Any) -> dict[str, Any]:
    return {"id": agent.id, "name": agent.name, "avatar": agent.avatar}


def _typed_object(notification: Notification) -> dict[str, Any]:
    """The object rebuilt from the parsed fields, for a notification made in code (no ``raw``)."""
    if isinstance(notification, Message):
        obj: dict[str, Any] = {}
        if notification.image:
            obj["image"] = notification.image
        if notification.time is not None:
            obj["time"] = notification.time
        if notification.agent is not None:
            obj["agent"] = _agent_json(notification.agent)
        return obj
    return {"body": {"agent": _agent_json(notification.agent)} if notification.agent is not None else {}}


def draft(notification: Notification, title: str | None, text: str | None) -> Draft:
    """The budget's view of one push: Parley's object as received (ids set from the parsed values), the texts."""
    obj = dict(notification.raw) if notification.raw is not None else _typed_object(notification)
    if isinstance(notification, Message):
        obj["id"] = notification.id
        obj["typeId"] = notification.type_id
        alert = title is not None
        return Draft("message", obj, _ALERT_FIXED if alert else _MESSAGE_FIXED,
                     _ALERT_PROTECTED if alert else _MESSAGE_PROTECTED, text, title, notification.image or None)
    obj["name"] = notification.name
    return Draft("event", obj, _EVENT_FIXED, _EVENT_PROTECTED, None, None, None)


def parley_object(notification: Notification, text: str, title: str | None) -> dict[str, Any]:
    """The ``object`` the SDKs read, before any budgeting: numbers stay numbers, ``body`` the text."""
    return draft(notification, title, text if isinstance(notification, Message) else None).parley_object()


def _texts(message: Message, policy: Policy) -> tuple[str, str]:
    agent = message.agent.name if message.agent and message.agent.name else ""
    values = {"agent": agent, "message": message.text}
    title = render(policy.title_template, values).strip() or policy.default_title
    return shorten(title, MAX_TITLE), render(policy.body_template, values)


def _collapse(agent_id: int | None) -> str:
    return f"parley-typing-{agent_id if agent_id is not None else 0}"


def to_apns(
    notification: Notification, app: ApnsApp, device_token: str, delivery_id: str, expires_at: float,
    budget: int | None = None,
) -> ApnsPush:
    """Build the APNs request for one delivery (SPEC §5 table), its JSON body within 4096 bytes (or ``budget``,
    a refit after APNs counted it too big: the skeleton at least)."""
    policy = app.policy
    limit, strict = (APNS_MAX_PAYLOAD, True) if budget is None else (budget, False)
    if isinstance(notification, Message) and policy.delivery_for(notification.type_id) == "alert":
        title, body = _texts(notification, policy)

        def alert(d: Draft) -> tuple[ApnsPush, int]:
            aps: dict[str, Any] = {
                "alert": {"title": d.shown_title, "body": d.body}, "sound": policy.sound, "content-available": 1,
            }
            if d.shown_image:
                aps["mutable-content"] = 1
            if policy.thread_id:
                aps["thread-id"] = policy.thread_id
            payload = {"aps": aps, "parley": d.parley_string()}
            encoded = _apns_body(payload)
            push = ApnsPush(app.name, device_token, delivery_id, "alert", 10, None, None, payload, encoded)
            return push, len(encoded)

        return fit(draft(notification, title, body), alert, limit, strict=strict)

    # Silent: events and messages whose typeId the policy marks silent.
    if isinstance(notification, Event):
        collapse: str | None = _collapse(notification.agent.id if notification.agent else None)
        expiration: int | None = int(expires_at)
        text = None
    else:
        collapse, expiration, text = None, None, notification.text

    def silent(d: Draft) -> tuple[ApnsPush, int]:
        payload = {"aps": {"content-available": 1}, "parley": d.parley_string()}
        encoded = _apns_body(payload)
        push = ApnsPush(app.name, device_token, delivery_id, "background", 5, expiration, collapse, payload, encoded)
        return push, len(encoded)

    return fit(draft(notification, None, text), silent, limit, strict=strict)


def to_fcm(notification: Notification, app: FcmApp, token: str, delivery_id: str, ttl: int | None,
           budget: int | None = None) -> FcmPush:
    """Build the FCM HTTP v1 message for one delivery (SPEC §5 table); ``ttl`` bounds events, ``budget`` as
    :func:`to_apns`."""
    policy = app.policy
    limit, strict = (FCM_MAX_PAYLOAD, True) if budget is None else (budget, False)
    if isinstance(notification, Message) and policy.delivery_for(notification.type_id) == "alert":
        title, body = _texts(notification, policy)

        def alert(d: Draft) -> tuple[FcmPush, int]:
            text = d.body or ""
            data = {"parley": d.parley_string(), "message": text}
            push = FcmPush(app.name, token, delivery_id, d.shown_title, text, d.shown_image, data, "high", None, None,
                           policy.channel_id)
            return push, fcm_size(d.shown_title, text, d.shown_image, data, policy.channel_id)

        return fit(draft(notification, title, body), alert, limit, strict=strict)

    is_event = isinstance(notification, Event)
    collapse = _collapse(notification.agent.id if notification.agent else None) if is_event else None

    def silent(d: Draft) -> tuple[FcmPush, int]:
        data = {"parley": d.parley_string()}
        if d.body is not None:
            data["message"] = d.body
        push = FcmPush(app.name, token, delivery_id, None, None, None, data, policy.event_priority,
                       ttl if is_event else None, collapse, None)
        return push, fcm_size(None, None, None, data)

    text = notification.text if isinstance(notification, Message) else None
    return fit(draft(notification, None, text), silent, limit, strict=strict)


def translate(notification: Notification, route: Route, delivery_id: str, now: float, expires_at: float,
              budget: int | None = None) -> Push:
    """Dispatch to the platform's builder; ``expires_at`` bounds silent events' lifetime; ``budget`` (a refit)
    replaces the provider's limit."""
    app = route.app
    if isinstance(app, ApnsApp):
        push = to_apns(notification, app, route.device_token, delivery_id, expires_at, budget)
        return push.to_environment(route.environment)
    ttl = seconds_left(expires_at, now) if isinstance(notification, Event) else None
    return to_fcm(notification, app, route.device_token, delivery_id, ttl, budget)


def counted_size(push: Push) -> int:
    """The size of a built push as the budget counted it."""
    if isinstance(push, ApnsPush):
        return len(push.body)
    return fcm_size(push.title, push.body, push.image, push.data, push.channel_id)


_APNS_JSON = json.JSONEncoder(ensure_ascii=False)  # built once (json.dumps with options builds one per call)


def _apns_body(payload: Any) -> bytes:
    """The request body exactly as sent: measured here against the limit, then written as is."""
    return _APNS_JSON.encode(payload).encode()
