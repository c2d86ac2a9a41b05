"""SPEC §5 payload limits: whatever Parley can send, both pushes fit by the providers' own counting, shrunk in
the documented order, and the ``parley`` key carries Parley's object as received (what fits)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from firebase_admin import messaging
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relay.config import ApnsApp, FcmApp, Policy, load_config
from relay.delivery.budget import APNS_MAX_PAYLOAD, ELLIPSIS, FCM_MAX_PAYLOAD, DoesNotFit, Draft, fit, is_url
from relay.delivery.fits import check_fits
from relay.delivery.translate import translate
from relay.errors import ConfigError
from relay.inbound.parse import MAX_STRING, Notification, load_notification, parse_webhook
from relay.outcome import EndState, Outcome
from relay.providers.fcm import build_message
from relay.push import ApnsPush, FcmPush
from relay.registry.device import Route
from relay.runtime.relay import create_app, reload
from relay.testing.fake_fcm import payload_size
from relay.testing.sandbox import ANDROID_TOKEN, IOS_TOKEN, Sandbox, sample
from tests.conftest import MakeRelay

DEFAULT = Policy()
MAX_BODY = 64 * 1024  # the webhook's default body limit (SPEC §2)
AVATAR = "https://cdn.example.com/avatars/" + "a" * 2968  # 3,000 characters
IMAGE = "https://cdn.example.com/images/" + "i" * 2969  # 3,000 characters
LONG_TEXT = "Hello! We received your photo 📷 and will get back to you. " * 200  # 11,600 characters


def _notification(obj: dict[str, Any], kind: str = "message") -> Notification:
    """Through the real path: webhook parse, then the stored canonical data loaded back (the dispatcher's side)."""
    hook = parse_webhook(json.dumps({"data": {"type": kind, "object": obj}, "to": ["t"]}).encode())
    return load_notification(hook.data)


def _keys(policy: Policy, *platform: str) -> dict[str, Any]:
    """The app keys that describe ``policy`` (the common ones and the ``platform`` ones)."""
    names = ("default_title", "title_template", "body_template", "type_policy", "event_ttl", *platform)
    return {name: getattr(policy, name) for name in names}


def _apns(n: Notification, policy: Policy = DEFAULT) -> ApnsPush:
    app = ApnsApp(name="ios", topic="com.example", key_file=Path("k.p8"), key_id="ABCDE12345", team_id="ABCDE12345",
                  **_keys(policy, "thread_id", "sound"))
    push = translate(n, Route(app, "d" * 64), "id-1", 1000.0, 1030.0)
    assert isinstance(push, ApnsPush)
    return push


def _fcm(n: Notification, policy: Policy = DEFAULT) -> FcmPush:
    app = FcmApp(name="android", service_account_file=Path("sa.json"), **_keys(policy, "channel_id", "event_priority"))
    push = translate(n, Route(app, "fcm-token"), "id-1", 1000.0, 1030.0)
    assert isinstance(push, FcmPush)
    return push


def apns_size(push: ApnsPush) -> int:
    """Apple's count: the bytes of the JSON body as sent (the provider writes ``push.body`` as is)."""
    assert push.body == json.dumps(push.payload, ensure_ascii=False).encode()
    return len(push.body)


def fcm_size(push: FcmPush, *, count_json: bool = True) -> int:
    """Google's count at its most conservative (the JSON form, as the fake's ``count_json`` applies it; else keys
    and values), over the message exactly as firebase-admin encodes it."""
    return payload_size(messaging._MessagingService.encode_message(build_message(push)), count_json=count_json)


def _parley(push: ApnsPush | FcmPush) -> dict[str, Any]:
    raw = push.payload["parley"] if isinstance(push, ApnsPush) else push.data["parley"]
    doc: dict[str, Any] = json.loads(raw)
    return doc


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


# -- faithful to Parley ---------------------------------------------------------------------------------------


def test_small_message_carries_parleys_object_as_received_plus_the_sdk_keys() -> None:
    """Every member Parley sent (unknown ones, agent.uid) reaches the SDKs, with numeric id/typeId, body, title."""
    obj = {"id": 3224, "time": 1583243432, "image": None, "typeId": 2, "message": "Hello 📷", "newField": {"x": [1]},
           "agent": {"id": 1, "uid": "a-7f3", "name": "Webuildapps", "avatar": "https://example.com/a.png"}}
    n = _notification(obj)
    expected = {**obj, "body": "Hello 📷", "title": "Webuildapps"}
    assert _parley(_apns(n)) == {"type": "message", "object": expected}
    assert _parley(_fcm(n)) == {"type": "message", "object": expected}
    silent = _notification({**obj, "typeId": 5})
    assert _parley(_fcm(silent))["object"] == {**obj, "typeId": 5, "body": "Hello 📷"}


def test_event_carries_agent_uid_and_unknown_members() -> None:
    """An event's object reaches the SDKs as sent: agent.uid and members the relay does not know included."""
    obj = {"name": "startTyping", "conversation": 12,
           "body": {"agent": {"id": 1, "uid": "9c1e-44", "name": "Ann", "avatar": None}, "since": 5}}
    n = _notification(obj, "event")
    assert _parley(_apns(n)) == {"type": "event", "object": obj}
    assert _parley(_fcm(n)) == {"type": "event", "object": obj}


# -- the documented order --------------------------------------------------------------------------------------


def test_a_push_that_fits_is_rendered_once_and_left_whole() -> None:
    """The common case costs one render: fit() measures, finds it fits, and returns that very render."""
    calls: list[Draft] = []

    def render(d: Draft) -> tuple[str, int]:
        calls.append(d)
        return d.parley_string(), 10

    draft = Draft("message", {"id": 1, "typeId": 2}, frozenset({"id", "typeId"}), frozenset(), "Hi", "Ann", None)
    assert json.loads(fit(draft, render, 4096))["object"] == {"id": 1, "typeId": 2, "body": "Hi", "title": "Ann"}
    assert calls == [draft]


def test_abnormally_long_other_strings_shrink_before_the_text() -> None:
    """Step 1: a 3,000-character agent name is cut (to no less than 256) while a 900-character text stays whole."""
    text = "t" * 900
    n = _notification({"id": 1, "typeId": 2, "message": text, "agent": {"id": 1, "name": "N" * 3000, "avatar": None}})
    for push in (_apns(n), _fcm(n)):
        parley = _parley(push)["object"]
        assert parley["body"] == text
        name = parley["agent"]["name"]
        assert name.endswith(ELLIPSIS) and 256 <= len(name) < 3000
        assert parley["message"] == text or 256 <= len(parley["message"]) < 900  # Parley's own copy of the text
    assert _apns(n).payload["aps"]["alert"] == {"title": "N" * 255 + ELLIPSIS, "body": text}
    assert _fcm(n).body == text and _fcm(n).data["message"] == text


def test_a_url_is_never_cut_it_becomes_null() -> None:
    """A 3,000-character avatar URL is sent whole when it fits, else dropped (null), never cut."""
    agent = {"id": 1, "name": "Ann", "avatar": AVATAR}
    fits = _notification({"id": 1, "typeId": 2, "message": "Hi", "agent": agent})
    assert _parley(_apns(fits))["object"]["agent"] == agent
    n = _notification({"id": 1, "typeId": 2, "message": "m" * 3000, "agent": agent})
    for push in (_apns(n), _fcm(n)):
        assert _parley(push)["object"]["agent"] == {"id": 1, "name": "Ann", "avatar": None}
        assert not [s for s in _strings(_parley(push)) if is_url(s) and s.endswith(ELLIPSIS)]


def test_text_keeps_200_characters_before_the_image_is_dropped() -> None:
    """Steps 2-3: the text is cut to make room for an image that fits; an image that leaves under 200 is dropped."""
    fitting = "https://cdn.example.com/" + "p" * 1476  # 1,500 characters
    n = _notification({"id": 1, "typeId": 2, "message": "m" * 5000, "image": fitting})
    apns = _apns(n)
    assert apns.payload["aps"]["mutable-content"] == 1
    assert _parley(apns)["object"]["image"] == fitting
    body = apns.payload["aps"]["alert"]["body"]
    assert body.endswith(ELLIPSIS) and len(body) > 200
    assert apns_size(apns) > APNS_MAX_PAYLOAD - 16  # the text filled the room the image left

    huge = _notification({"id": 1, "typeId": 2, "message": "m" * 5000, "image": "https://x.example/" + "p" * 3600})
    apns, fcm = _apns(huge), _fcm(huge)
    assert "mutable-content" not in apns.payload["aps"] and _parley(apns)["object"]["image"] is None
    assert fcm.image is None and _parley(fcm)["object"]["image"] is None
    assert len(apns.payload["aps"]["alert"]["body"]) > 1000  # the text got the image's room back
    assert fcm.body is not None and len(fcm.body) > 500


def test_members_the_sdks_do_not_read_are_removed_largest_first() -> None:
    """Step 6: bulk no shortening can help (a long array of numbers) is removed; ids, text and small members stay."""
    n = _notification({"id": 7, "typeId": 3, "message": "Hi", "time": 5, "history": list(range(2000))})
    apns, fcm = _apns(n), _fcm(n)
    assert apns_size(apns) <= APNS_MAX_PAYLOAD and fcm_size(fcm) <= FCM_MAX_PAYLOAD
    for push in (apns, fcm):
        obj = _parley(push)["object"]
        assert "history" not in obj
        assert (obj["id"], obj["typeId"], obj["body"], obj["time"]) == (7, 3, "Hi", 5)


def test_the_title_gives_way_last() -> None:
    """Steps 7-8: with an operator's huge thread-id, the text goes first, then the title is cut, and it still fits."""
    policy = Policy(thread_id="t" * 3500)
    n = _notification({"id": 1, "typeId": 2, "message": "m" * 300, "agent": {"id": 1, "name": "é" * 300}})
    push = _apns(n, policy)
    alert = push.payload["aps"]["alert"]
    assert alert["body"] == ""
    assert alert["title"].endswith(ELLIPSIS) and 10 < len(alert["title"]) < 256
    assert apns_size(push) <= APNS_MAX_PAYLOAD


# -- any object Parley can send ---------------------------------------------------------------------------------

_CHARS = st.characters(blacklist_categories=("Cs",))  # lone surrogates are refused at the webhook (400)


def _long_text(prefix: str = "") -> st.SearchStrategy[str]:
    """Short strings of any characters, or long repetitions up to the parser's per-field limit."""
    repeated = st.builds(lambda unit, n: (prefix + unit * n)[:MAX_STRING], st.text(_CHARS, min_size=1, max_size=3),
                         st.integers(0, 6000))
    return st.one_of(st.text(_CHARS, max_size=40).map(lambda s: prefix + s), repeated)


_URLS = _long_text("https://cdn.example.com/")
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                     st.floats(allow_nan=False, allow_infinity=False), _long_text(), _URLS)
_EXTRA_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                             | st.dictionaries(st.text(_CHARS, max_size=12), inner, max_size=4), max_leaves=12)
_EXTRAS = st.one_of(st.dictionaries(st.text(_CHARS, max_size=12), _EXTRA_VALUES, max_size=4),
                    st.integers(0, 4000).map(lambda n: {"bulk": {f"k{i}": i for i in range(n)}}),
                    _long_text().map(lambda key: {key: 1}))  # a key of any length
_AGENT = st.one_of(st.none(), st.fixed_dictionaries(
    {"id": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), "name": st.one_of(st.none(), _long_text()),
     "avatar": st.one_of(st.none(), _URLS)},
    optional={"uid": _long_text(), "extra": _EXTRA_VALUES}))
_MESSAGES = st.builds(
    lambda extras, fields: {**extras, **fields}, _EXTRAS,
    st.fixed_dictionaries({"id": st.integers(-(2**63), 2**63 - 1), "agent": _AGENT,
                           "typeId": st.one_of(st.none(), st.sampled_from([2, 3, 5, 77])),
                           "message": st.one_of(st.none(), _long_text()), "image": st.one_of(st.none(), _URLS),
                           "time": st.one_of(st.none(), st.integers(0, 2**40))}))
_EVENTS = st.builds(
    lambda extras, name, body: {**extras, "name": name, "body": body}, _EXTRAS,
    _long_text().filter(bool),
    st.one_of(st.none(), st.builds(lambda extras, agent: {**extras, "agent": agent}, _EXTRAS, _AGENT)))
_POLICIES = [Policy(), Policy(type_policy={2: "silent", 3: "silent", 5: "silent", 77: "silent"},
                              title_template="{agent} · {message}", body_template="» {message} «")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much,
                                                                  HealthCheck.data_too_large])
@given(st.one_of(_MESSAGES.map(lambda o: ("message", o)), _EVENTS.map(lambda o: ("event", o))))
def test_any_parley_object_fits_both_providers_and_keeps_its_ids(case: tuple[str, dict[str, Any]]) -> None:
    """Any object the webhook accepts (any field length up to 64 KiB) gives an APNs body and an FCM payload within
    4096 bytes by each provider's count, and a `parley` string that is valid JSON with the ids/name kept."""
    kind, obj = case
    body = json.dumps({"data": {"type": kind, "object": obj}, "to": ["t"]}, ensure_ascii=False).encode()
    assume(len(body) <= MAX_BODY)
    n = load_notification(parse_webhook(body).data)
    for policy in _POLICIES:
        apns, fcm = _apns(n, policy), _fcm(n, policy)
        assert apns_size(apns) <= APNS_MAX_PAYLOAD
        assert fcm_size(fcm) <= FCM_MAX_PAYLOAD
        for push in (apns, fcm):
            parley = _parley(push)
            assert parley["type"] == kind
            if kind == "message":
                assert (parley["object"]["id"], parley["object"]["typeId"]) == (obj["id"], obj["typeId"])
            else:
                assert parley["object"]["name"] == obj["name"][:256]
                agent = (obj["body"] or {}).get("agent")
                if agent is not None:
                    assert parley["object"]["body"]["agent"]["id"] == agent["id"]


# -- end to end, real clients against the fakes -----------------------------------------------------------------


async def test_the_fakes_refuse_one_byte_over_4096_as_the_providers_do(make_relay: MakeRelay) -> None:
    """Fake APNs answers 413 PayloadTooLarge to a 4097-byte body and fake FCM 400 one byte over its count; 4096
    passes both (sent through the relay's real aioapns and firebase-admin clients)."""
    r = await make_relay()
    apns, fcm = r.relay.providers["ios"], r.relay.providers["android"]

    def apns_push(size: int) -> ApnsPush:
        payload = {"aps": {"content-available": 1}, "pad": ""}
        payload["pad"] = "x" * (size - len(json.dumps(payload).encode()))
        body = json.dumps(payload).encode()
        assert len(body) == size
        return ApnsPush("ios", IOS_TOKEN, "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "background", 5, None, None,
                        payload, body)

    def fcm_push(size: int) -> FcmPush:
        data = {"parley": "{}", "message": ""}
        data["message"] = "x" * (size - len("title" + "Ann" + "body" + "Hi") - len("parley{}message"))
        push = FcmPush("android", ANDROID_TOKEN, "m-1", "Ann", "Hi", None, data, "high", None, None, None)
        assert fcm_size(push, count_json=False) == size
        return push

    assert (await apns.send(apns_push(4096))).outcome is Outcome.SENT
    over = await apns.send(apns_push(4097))
    assert (over.outcome, over.status, over.reason) == (Outcome.TOO_BIG, 413, "413 PayloadTooLarge")
    assert (await fcm.send(fcm_push(4096))).outcome is Outcome.SENT
    over = await fcm.send(fcm_push(4097))
    assert (over.outcome, over.status) == (Outcome.TOO_BIG, 400)


async def test_long_fields_webhook_is_delivered_on_both_platforms(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """A 1,500-character agent name, 3,000-character avatar and image URLs and a long text: sent on APNs and FCM
    (no PayloadTooLarge, no 400, no dead letter), title and text cut with `…`, ids kept."""
    r = await make_relay()
    doc = sample("message", to=[IOS_TOKEN, ANDROID_TOKEN], image=IMAGE, message=LONG_TEXT,
                 agent={"id": 1, "name": "N" * 1500, "avatar": AVATAR})
    status, answer = await r.post(doc)
    assert (status, answer["accepted"]) == (200, 2)
    (apns,) = await sandbox.apns.wait_for(1)
    (fcm,) = await sandbox.fcm.wait_for(1)
    await r.settle()
    assert (apns.status, fcm.status) == (200, 200)
    ended = (await r.relay.store.stats()).ended
    assert {state: count for state, count in ended.items() if count} == {EndState.SENT: 2}
    assert apns.payload["aps"]["alert"]["title"] == "N" * 255 + ELLIPSIS
    assert apns.payload["aps"]["alert"]["body"].endswith(ELLIPSIS)
    assert fcm.message["notification"]["title"] == "N" * 255 + ELLIPSIS
    assert payload_size(fcm.message, count_json=True) <= FCM_MAX_PAYLOAD
    for parley in (json.loads(apns.payload["parley"]), json.loads(fcm.message["data"]["parley"])):
        assert (parley["object"]["id"], parley["object"]["typeId"]) == (3224, 2)
        assert parley["object"]["agent"]["avatar"] is None  # a URL that cannot fit is dropped, not cut
        assert LONG_TEXT.startswith(parley["object"]["body"][:-1])


async def test_event_agent_uid_reaches_both_platforms(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """An event's `agent.uid` (and any member Parley adds) arrives in the `parley` key on APNs and FCM."""
    r = await make_relay()
    doc = sample("event", to=[IOS_TOKEN, ANDROID_TOKEN])
    doc["data"]["object"]["body"]["agent"]["uid"] = "3f2a-agent-uid"
    doc["data"]["object"]["conversationId"] = 77
    await r.post(doc)
    (apns,) = await sandbox.apns.wait_for(1)
    (fcm,) = await sandbox.fcm.wait_for(1)
    for raw in (apns.payload["parley"], fcm.message["data"]["parley"]):
        assert json.loads(raw) == {"type": "event", "object": doc["data"]["object"]}


@pytest.mark.parametrize("unit", ["a", "é", "📷", "\x01"])
def test_long_text_of_any_character_fills_the_push_without_passing_it(unit: str) -> None:
    """The text is cut on a code point with `…` to just under the limit, whatever bytes or escapes it costs."""
    n = _notification({"id": 1, "typeId": 2, "message": unit * MAX_STRING, "agent": {"id": 1, "name": "Ann"}})
    apns, fcm = _apns(n), _fcm(n)
    assert APNS_MAX_PAYLOAD - 16 < apns_size(apns) <= APNS_MAX_PAYLOAD
    assert FCM_MAX_PAYLOAD - 16 < fcm_size(fcm) <= FCM_MAX_PAYLOAD
    for body in (apns.payload["aps"]["alert"]["body"], fcm.body):
        assert body is not None and body.endswith(ELLIPSIS) and set(body[:-1]) == {unit}


# -- however the provider counts (issue 19.1) ------------------------------------------------------------------

NINE_THOUSAND = ("Your order 📦 is on its way — «tracking» \"inside\" \\ ✓ " * 200)[:9000]


async def test_a_json_counting_fcm_gets_the_9000_character_message_and_the_long_fields_webhook(
        make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """Against an FCM that counts the notification and data in JSON form (quotes and escapes included), a
    9,000-character message with emoji and the long-fields webhook reach both platforms, each on the first try."""
    sandbox.fcm.count_json = True
    r = await make_relay()
    long_fields = sample("message", to=[IOS_TOKEN, ANDROID_TOKEN], id=2, image=IMAGE, message=LONG_TEXT,
                         agent={"id": 1, "name": "N" * 1500, "avatar": AVATAR})
    for doc in (sample("message", to=[IOS_TOKEN, ANDROID_TOKEN], id=1, message=NINE_THOUSAND), long_fields):
        assert (await r.post(doc))[0] == 200
    await sandbox.apns.wait_for(2)
    await sandbox.fcm.wait_for(2)
    await r.settle()
    assert [q.status for q in sandbox.apns.requests] == [200, 200]
    assert [q.status for q in sandbox.fcm.requests] == [200, 200]
    assert all(payload_size(q.message, count_json=True) <= FCM_MAX_PAYLOAD for q in sandbox.fcm.requests)
    ended = (await r.relay.store.stats()).ended
    assert {state: count for state, count in ended.items() if count} == {EndState.SENT: 4}


async def test_a_push_the_provider_calls_too_big_once_is_refitted_smaller_and_sent_on_the_second_try(
        make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """APNs 413 PayloadTooLarge and FCM "Message is too big" once each: the push is fitted again to a smaller
    budget and sent (no dead letter), the refit counted per app and logged once per app."""
    r = await make_relay()
    for i in (1, 2):  # the second push meets "too big" too: counted again, not logged again
        sandbox.apns.too_big(times=1)
        sandbox.fcm.too_big(times=1)
        assert (await r.post(sample("message", to=[IOS_TOKEN, ANDROID_TOKEN], id=i, message="m" * 5000)))[0] == 200
        await sandbox.apns.wait_for(2 * i)
        await sandbox.fcm.wait_for(2 * i)
        await r.settle()
    apns, fcm = sandbox.apns.requests, sandbox.fcm.requests
    assert [q.status for q in apns] == [413, 200, 413, 200] and [q.status for q in fcm] == [400, 200, 400, 200]
    assert len(apns[1].raw) <= len(apns[0].raw) // 2
    assert payload_size(fcm[1].message, count_json=True) <= payload_size(fcm[0].message, count_json=True) // 2
    ended = (await r.relay.store.stats()).ended
    assert {state: count for state, count in ended.items() if count} == {EndState.SENT: 4}
    metrics = r.relay.metrics.exposition().decode()
    assert 'parley_relay_payload_refits_total{app="ios",platform="apns"} 2.0' in metrics
    assert 'parley_relay_payload_refits_total{app="android",platform="fcm"} 2.0' in metrics
    assert r.relay.dispatcher is not None and r.relay.dispatcher.refitter.logged == {"ios", "android"}


def test_fit_raises_instead_of_returning_an_oversize() -> None:
    """When even the skeleton is over the limit, fit() raises DoesNotFit (strict), never hands back an oversize."""
    draft = Draft("message", {"id": 1, "typeId": 2}, frozenset({"id", "typeId"}), frozenset(), "Hi", "Ann", None)
    with pytest.raises(DoesNotFit):
        fit(draft, lambda d: (d.parley_string(), 5000), 4096)
    assert fit(draft, lambda d: (d.parley_string(), 5000), 4096, strict=False)  # a refit: the skeleton


def test_operator_settings_that_leave_no_room_for_the_smallest_push_are_refused_at_config_load(
        sandbox: Sandbox) -> None:
    """A 4,000-character thread_id or channel_id: the config is refused (start and reload), naming the app."""
    path = sandbox.write(apps={"ios": {"thread_id": "t" * 4000}, "android": {"channel_id": "c" * 4000}})
    with pytest.raises(ConfigError) as refused:
        create_app(load_config(path))
    assert {p.key for p in refused.value.problems} == {"apps.ios", "apps.android"}
    assert "thread_id" in str(refused.value) and "channel_id" in str(refused.value)
    fine = sandbox.write(apps={"ios": {"thread_id": "t" * 2000, "sound": "s" * 300}})
    assert check_fits(load_config(fine).apps, fine) == []


async def test_a_reload_to_operator_settings_that_leave_no_room_is_rejected(make_relay: MakeRelay,
                                                                          sandbox: Sandbox) -> None:
    """A reload whose thread_id leaves the smallest push no room is rejected; the running settings stay."""
    r = await make_relay()
    sandbox.write(apps={"ios": {"thread_id": "t" * 4000}})
    assert await reload(r.relay) is False
    assert r.relay.config.apps["ios"].policy.thread_id is None


_OPERATOR_TEXT = st.one_of(st.text(_CHARS, max_size=30), st.builds(lambda u, n: u * n, st.sampled_from(
    ["a", "é", "📷", '"', "\x01"]), st.integers(0, 700)))
_OPERATOR_POLICIES = st.builds(
    lambda sound, thread, channel, title, body, default, silent: Policy(
        sound=sound, thread_id=thread, channel_id=channel, title_template=title, body_template=body,
        default_title=default, type_policy={2: "silent" if silent else "alert", 3: "alert", 5: "silent"}),
    _OPERATOR_TEXT, st.one_of(st.none(), _OPERATOR_TEXT), st.one_of(st.none(), _OPERATOR_TEXT),
    st.one_of(st.just("{agent}"), _OPERATOR_TEXT.map(lambda t: t + "{agent}")),
    st.one_of(st.just("{message}"), _OPERATOR_TEXT.map(lambda t: "{message}" + t)), _OPERATOR_TEXT, st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much,
                                                                  HealthCheck.data_too_large])
@given(st.one_of(_MESSAGES.map(lambda o: ("message", o)), _EVENTS.map(lambda o: ("event", o))), _OPERATOR_POLICIES)
def test_any_parley_object_under_any_accepted_operator_settings_fits_the_conservative_count(
        case: tuple[str, dict[str, Any]], policy: Policy) -> None:
    """Any object the webhook accepts, under any operator settings the config-load check accepts (sound, thread id,
    channel id, templates, default title), gives an APNs body and an FCM message (counted in JSON form, escapes
    included) within 4096 bytes."""
    kind, obj = case
    body = json.dumps({"data": {"type": kind, "object": obj}, "to": ["t"]}, ensure_ascii=False).encode()
    assume(len(body) <= MAX_BODY)
    n = load_notification(parse_webhook(body).data)
    apps = {"ios": ApnsApp(name="ios", topic="com.example", key_file=Path("k.p8"), key_id="ABCDE12345",
                           team_id="ABCDE12345", **_keys(policy, "thread_id", "sound")),
            "android": FcmApp(name="android", service_account_file=Path("sa.json"),
                              **_keys(policy, "channel_id", "event_priority"))}
    assume(not check_fits(apps, "relay.yaml"))
    assert apns_size(_apns(n, policy)) <= APNS_MAX_PAYLOAD
    assert fcm_size(_fcm(n, policy)) <= FCM_MAX_PAYLOAD
