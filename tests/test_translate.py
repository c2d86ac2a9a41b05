"""Translation (pure): SPEC §5 payloads, typeId policy, templates and the 4096-byte limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay.config import ApnsApp, FcmApp
from relay.delivery.translate import APNS_MAX_PAYLOAD, ELLIPSIS, translate
from relay.inbound.parse import Agent, Event, Message, parse_webhook
from relay.push import ApnsPush, FcmPush
from relay.registry.device import Route

APNS = ApnsApp(name="ios", topic="com.example", key_file=Path("k.p8"), key_id="ABCDE12345", team_id="ABCDE12345")
FCM = FcmApp(name="android", service_account_file=Path("sa.json"))
AGENT = Agent(7, "Ann", None)


def _message(text: str = "Hi", type_id: int | None = 2, image: str | None = None) -> Message:
    return Message(id=42, type_id=type_id, text=text, image=image, agent=AGENT, time=1)


def _apns(n: Message | Event, app: ApnsApp = APNS) -> ApnsPush:
    push = translate(n, Route(app, "d" * 64), "id-1", 1000.0, 1030.0)
    assert isinstance(push, ApnsPush)
    return push


def _fcm(n: Message | Event, app: FcmApp = FCM) -> FcmPush:
    push = translate(n, Route(app, "fcm-token"), "id-1", 1000.0, 1030.0)
    assert isinstance(push, FcmPush)
    return push


def test_parley_key_is_a_json_string_with_numeric_ids() -> None:
    """The SDKs parse `parley` as a JSON string whose object has numeric id/typeId and body/title."""
    parley = json.loads(_apns(_message()).payload["parley"])
    assert parley == {"type": "message", "object": {"id": 42, "typeId": 2, "body": "Hi", "title": "Ann", "time": 1,
                                                    "agent": {"id": 7, "name": "Ann", "avatar": None}}}


def test_system_type_id_is_silent_and_unknown_type_ids_alert() -> None:
    """Default policy: typeId 5 silent, 2/3 alert, unknown ids alert."""
    assert _apns(_message(type_id=5)).push_type == "background"
    assert _fcm(_message(type_id=5)).silent
    assert _apns(_message(type_id=3)).push_type == "alert"
    assert _apns(_message(type_id=77)).push_type == "alert"
    assert _apns(_message(type_id=None)).push_type == "alert"


def test_templates_thread_id_and_default_title_are_applied() -> None:
    """Per-app title/body templates, thread-id and the default title when the agent has no name."""
    app = ApnsApp(name="ios", topic="t", cert_file=Path("c.pem"), title_template="{agent} (support)",
                  body_template="» {message}", thread_id="chat", default_title="Support")
    aps = _apns(_message(), app).payload["aps"]
    assert aps["alert"] == {"title": "Ann (support)", "body": "» Hi"}
    assert aps["thread-id"] == "chat"
    nameless = Message(id=1, type_id=2, text="x", image=None, agent=None, time=None)
    assert _apns(nameless, app).payload["aps"]["alert"]["title"] == "(support)"
    plain = _apns(nameless)
    assert plain.payload["aps"]["alert"]["title"] == "New message"


def test_broken_template_never_raises() -> None:
    """A template with a bad placeholder renders literally instead of failing the delivery."""
    app = FcmApp(name="android", service_account_file=Path("sa.json"), title_template="{0} {agent")
    assert _fcm(_message(), app).title == "{0} {agent"


@pytest.mark.parametrize("unit", ["a", "é", "📷", "中"])
def test_long_message_is_shortened_to_fit_4096_bytes_on_a_character_boundary(unit: str) -> None:
    """A 20,000-character message still becomes a push under 4096 bytes, cut on a code point with `…`."""
    text = unit * 20_000
    push = _apns(_message(text))
    body = push.payload["aps"]["alert"]["body"]
    assert body.endswith(ELLIPSIS) and set(body[:-1]) == {unit}
    assert len(json.dumps(push.payload, ensure_ascii=False).encode()) <= APNS_MAX_PAYLOAD
    assert len(json.dumps(push.payload, ensure_ascii=False).encode()) > APNS_MAX_PAYLOAD - 64  # not over-cut
    fcm = _fcm(_message(text))
    assert fcm.body is not None and fcm.body.endswith(ELLIPSIS)
    data_size = sum(len(k.encode()) + len(v.encode()) for k, v in fcm.data.items())
    assert data_size <= 4096


def test_short_message_is_not_touched() -> None:
    """Messages that fit are sent verbatim."""
    assert _apns(_message("short 📷")).payload["aps"]["alert"]["body"] == "short 📷"


def test_event_expiry_and_fcm_ttl_come_from_the_deadline() -> None:
    """Events carry an absolute APNs expiration and an FCM TTL of the time left."""
    event = Event("stopTyping", AGENT)
    assert _apns(event).expiration == 1030
    assert _apns(event).collapse_id == "parley-typing-7"
    assert _fcm(event).ttl == 30 and _fcm(event).priority == "normal"


def test_parse_webhook_keeps_unicode_and_fans_out_unique_tokens() -> None:
    """Emoji survive parsing; a token listed twice is one delivery."""
    hook = parse_webhook(json.dumps({"data": {"type": "message", "object": {"id": 1, "message": "📷"}},
                                     "to": ["a", "b", "a"]}).encode())
    assert hook.tokens == ("a", "b")
    assert isinstance(hook.notification, Message) and hook.notification.text == "📷"
