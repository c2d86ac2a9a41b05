"""Translation stage: a Parley notification + its route -> an ``ApnsPush`` or ``FcmPush`` (pure, no I/O).

SPEC §5. Every push carries the ``parley`` key the Parley mobile SDKs read: a JSON *string* of
``{"type": ..., "object": {...}}`` with ``id``/``typeId`` as numbers. Payloads are kept under the providers'
4096-byte limits by shortening the text on a character boundary with ``…``; a long message is never an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from relay.config import ApnsApp, FcmApp, Policy
from relay.inbound.parse import Event, Message, Notification
from relay.push import ApnsPush, FcmPush, Push
from relay.registry.device import Route

APNS_MAX_PAYLOAD = 4096
FCM_MAX_PAYLOAD = 4096
MAX_TITLE = 256
ELLIPSIS = "…"




class _Blank(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{agent}``/``{message}`` placeholders; unknown names render empty, never raise."""
    try:
        return template.format_map(_Blank(values))
    except (ValueError, IndexError, AttributeError, KeyError):
        return template


def shorten(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters (ellipsis included) on a code point boundary."""
    if len(text) <= max_chars:
        return text
    return text[: max(0, max_chars - 1)] + ELLIPSIS if max_chars > 0 else ""


def _agent_json(agent: Any) -> dict[str, Any]:
    return {"id": agent.id, "name": agent.name, "avatar": agent.avatar}


def parley_object(notification: Notification, text: str, title: str | None) -> dict[str, Any]:
    """The ``object`` the SDKs read: numbers stay numbers, ``body`` is the text, ``title`` the agent."""
    if isinstance(notification, Message):
        obj: dict[str, Any] = {"id": notification.id, "typeId": notification.type_id, "body": text}
        if title is not None:
            obj["title"] = title
        if notification.image:
            obj["image"] = notification.image
        if notification.time is not None:
            obj["time"] = notification.time
        if notification.agent is not None:
            obj["agent"] = _agent_json(notification.agent)
        return obj
    body: dict[str, Any] = {}
    if notification.agent is not None:
        body["agent"] = _agent_json(notification.agent)
    return {"name": notification.name, "body": body}


def _parley_string(notification: Notification, text: str, title: str | None) -> str:
    kind = "message" if isinstance(notification, Message) else "event"
    doc = {"type": kind, "object": parley_object(notification, text, title)}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _texts(message: Message, policy: Policy) -> tuple[str, str]:
    agent = message.agent.name if message.agent and message.agent.name else ""
    values = {"agent": agent, "message": message.text}
    title = render(policy.title_template, values).strip() or policy.default_title
    return shorten(title, MAX_TITLE), render(policy.body_template, values)


def _fit(build: Any, text: str, limit: int) -> Any:
    """Largest prefix of ``text`` (in characters) for which ``build(text)`` encodes within ``limit``."""
    push, size = build(text)
    if size <= limit:
        return push
    lo, hi = 0, len(text)  # invariant: shorten(text, lo) fits (0 fits unless the rest alone is too big)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if build(shorten(text, mid))[1] <= limit:
            lo = mid
        else:
            hi = mid - 1
    return build(shorten(text, lo))[0]


def _collapse(agent_id: int | None) -> str:
    return f"parley-typing-{agent_id if agent_id is not None else 0}"


def to_apns(
    notification: Notification, app: ApnsApp, device_token: str, delivery_id: str, expires_at: float
) -> ApnsPush:
    """Build the APNs request for one delivery (SPEC §5 table)."""
    policy = app.policy
    if isinstance(notification, Message) and policy.delivery_for(notification.type_id) == "alert":
        title, body = _texts(notification, policy)

        def build(text: str) -> tuple[ApnsPush, int]:
            aps: dict[str, Any] = {
                "alert": {"title": title, "body": text}, "sound": policy.sound, "content-available": 1,
            }
            if notification.image:
                aps["mutable-content"] = 1
            if policy.thread_id:
                aps["thread-id"] = policy.thread_id
            payload = {"aps": aps, "parley": _parley_string(notification, text, title)}
            encoded = _apns_body(payload)
            push = ApnsPush(app.name, device_token, delivery_id, "alert", 10, None, None, payload, encoded)
            return push, len(encoded)

        return _fit(build, body, APNS_MAX_PAYLOAD)  # type: ignore[no-any-return]

    # Silent: events and messages whose typeId the policy marks silent.
    if isinstance(notification, Event):
        collapse: str | None = _collapse(notification.agent.id if notification.agent else None)
        expiration: int | None = int(expires_at)
        text = ""
    else:
        collapse, expiration, text = None, None, notification.text

    def build_silent(text: str) -> tuple[ApnsPush, int]:
        payload = {"aps": {"content-available": 1}, "parley": _parley_string(notification, text, None)}
        encoded = _apns_body(payload)
        push = ApnsPush(app.name, device_token, delivery_id, "background", 5, expiration, collapse, payload, encoded)
        return push, len(encoded)

    return _fit(build_silent, text, APNS_MAX_PAYLOAD)  # type: ignore[no-any-return]


def to_fcm(notification: Notification, app: FcmApp, token: str, delivery_id: str, ttl: int | None) -> FcmPush:
    """Build the FCM HTTP v1 message for one delivery (SPEC §5 table); ``ttl`` bounds events."""
    policy = app.policy
    if isinstance(notification, Message) and policy.delivery_for(notification.type_id) == "alert":
        title, body = _texts(notification, policy)

        def build(text: str) -> tuple[FcmPush, int]:
            data = {"parley": _parley_string(notification, text, title), "message": text}
            push = FcmPush(app.name, token, delivery_id, title, text, notification.image, data, "high", None, None,
                           policy.channel_id)
            return push, _size({"t": title, "b": text, "i": notification.image, "d": data})

        return _fit(build, body, FCM_MAX_PAYLOAD)  # type: ignore[no-any-return]

    is_event = isinstance(notification, Event)
    text = "" if is_event else notification.text  # type: ignore[union-attr]
    collapse = _collapse(notification.agent.id if notification.agent else None) if is_event else None

    def build_silent(text: str) -> tuple[FcmPush, int]:
        data = {"parley": _parley_string(notification, text, None)}
        if not is_event:
            data["message"] = text
        push = FcmPush(app.name, token, delivery_id, None, None, None, data, policy.event_priority,
                       ttl if is_event else None, collapse, None)
        return push, _size({"d": data})

    return _fit(build_silent, text, FCM_MAX_PAYLOAD)  # type: ignore[no-any-return]


def translate(notification: Notification, route: Route, delivery_id: str, now: float, expires_at: float) -> Push:
    """Dispatch to the platform's builder; ``expires_at`` bounds silent events' lifetime."""
    app = route.app
    if isinstance(app, ApnsApp):
        return to_apns(notification, app, route.device_token, delivery_id, expires_at).to_environment(route.environment)
    ttl = max(1, int(expires_at - now)) if isinstance(notification, Event) else None
    return to_fcm(notification, app, route.device_token, delivery_id, ttl)


def _size(payload: Any) -> int:
    return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())


def _apns_body(payload: Any) -> bytes:
    """The request body exactly as sent: measured here against the limit, then written as is."""
    return json.dumps(payload, ensure_ascii=False).encode()
