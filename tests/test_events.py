"""Typing events (SPEC §2): resends told apart from new events by stream and window, and queued events that a
later one supersedes ended ``superseded``, never sent.

Three levels: what the webhook stores for an event (:mod:`relay.inbound.accept`), the store rule in both
stores (SQLite and Redis, the fixtures of ``tests/test_store.py``), and the dispatcher on a fake clock. The
real relay process is in ``tests/test_typing_e2e.py``.
"""

from __future__ import annotations

import json

import pytest

from relay.config import load_config
from relay.errors import ConfigError
from relay.inbound.accept import deadline, event_stream, new_deliveries
from relay.inbound.parse import Event, parse_webhook
from relay.outcome import EndState, WaitReason
from relay.push import ApnsPush, FcmPush, Push
from relay.store import NewDelivery, Store
from relay.store.base import EventStream
from relay.testing.sandbox import ANDROID_TOKEN, IOS_TOKEN, Sandbox, sample
from tests import test_dispatch, test_store
from tests.test_dispatch import Harness
from tests.test_store import LEASE, NOW

# The fixtures of the store suite (each test on SQLite and on Redis) and of the dispatcher's fake clock.
settings, make_store, store = test_store.settings, test_store.make_store, test_store.store
harness = test_dispatch.harness

WINDOW = 5.0


def typing(name: str, to: list[str], agent_id: int = 1) -> dict[str, object]:
    """A typing event of agent ``agent_id`` to ``to``."""
    doc = sample("event", to=to, name=name)
    doc["data"]["object"]["body"]["agent"]["id"] = agent_id
    return doc


def stream_of(doc: dict[str, object], token: str, window: float = WINDOW, ttl: float = 30.0) -> EventStream:
    hook = parse_webhook(json.dumps(doc).encode())
    assert isinstance(hook.notification, Event)
    return event_stream(hook.notification, hook.data, token, window, ttl)


def event_item(name: str, token: str = "tok", agent_id: int = 1, *, at: float = NOW) -> NewDelivery:
    doc = typing(name, [token], agent_id)
    hook = parse_webhook(json.dumps(doc).encode())
    return NewDelivery(token, "event", hook.data, "unused", at + 30, stream=stream_of(doc, token))


def message_item(token: str, message_id: int) -> NewDelivery:
    return NewDelivery(token, "message", b'{"m":%d}' % message_id, f"m:{message_id}:{token}", NOW + 86400)


# -- what the webhook stores for an event -------------------------------------------------------------------


def test_start_and_stop_of_one_agent_share_a_stream_with_different_fingerprints() -> None:
    """startTyping and stopTyping of one agent to one token are one stream; the bodies differ."""
    start, stop = stream_of(typing("startTyping", ["t"]), "t"), stream_of(typing("stopTyping", ["t"]), "t")
    assert start.key == stop.key and start.fingerprint != stop.fingerprint


def test_streams_differ_by_token_by_agent_and_for_other_event_names() -> None:
    """Another token, another agent, or an event name Parley may add later each make another stream."""
    base = stream_of(typing("startTyping", ["t"]), "t").key
    assert stream_of(typing("startTyping", ["u"]), "u").key != base
    assert stream_of(typing("startTyping", ["t"], agent_id=2), "t").key != base
    assert stream_of(typing("agentAway", ["t"]), "t").key != base


def test_the_event_window_is_never_longer_than_the_events_ttl() -> None:
    """``dedupe.event_window`` is cut to the event's TTL (an app with event_ttl 2 gets a 2 s window)."""
    assert stream_of(typing("startTyping", ["t"]), "t", window=5, ttl=2).window == 2
    assert stream_of(typing("startTyping", ["t"]), "t", window=5, ttl=30).window == 5


def test_an_events_deadline_is_its_apps_ttl_or_the_longest_while_unroutable(sandbox: Sandbox) -> None:
    """The one home of an event's lifetime: its app's event_ttl; the longest of all apps without a route."""
    config = load_config(sandbox.write(apps={"ios": {"event_ttl": 10}, "android": {"event_ttl": 40}}))
    apps = config.apps
    assert deadline("event", 100.0, apps["ios"], apps, 3600) == 110.0
    assert deadline("event", 100.0, None, apps, 3600) == 140.0
    assert deadline("message", 100.0, apps["ios"], apps, 3600) == 3700.0
    hook = parse_webhook(json.dumps(typing("startTyping", [IOS_TOKEN, "unknown"])).encode())
    items = new_deliveries(hook, config, 100.0, lambda t: apps["ios"] if t == IOS_TOKEN else None, "rid")
    assert [i.expires_at for i in items] == [110.0, 140.0]
    assert all(i.stream is not None and i.stream.window == 5.0 for i in items)


def test_dedupe_event_window_is_read_from_the_config_and_checked(sandbox: Sandbox) -> None:
    """``dedupe.event_window`` defaults to 5 s, takes a number, and refuses a negative one naming the key."""
    assert load_config(sandbox.write()).dedupe.event_window == 5.0
    assert load_config(sandbox.write(dedupe={"event_window": 2})).dedupe.event_window == 2.0
    with pytest.raises(ConfigError, match=r"dedupe\.event_window"):
        load_config(sandbox.write(dedupe={"event_window": -1}))


# -- the store rule (both stores) -----------------------------------------------------------------------------


async def test_start_stop_start_within_two_seconds_are_three_events(store: Store) -> None:
    """Each event differs from its stream's last one: all accepted, none a duplicate."""
    for n, name in enumerate(("startTyping", "stopTyping", "startTyping")):
        assert await store.enqueue([event_item(name, at=NOW + n)], NOW + n, 600) == [True]
    stats = await store.stats()
    assert (stats.accepted, stats.duplicates) == (3, 0) and stats.balanced


async def test_a_repeat_of_the_last_event_within_the_window_is_a_duplicate_and_after_it_is_new(store: Store) -> None:
    """A resend within the window is answered duplicate; the same body after the window is a new event."""
    assert await store.enqueue([event_item("startTyping")], NOW, 600) == [True]
    assert await store.enqueue([event_item("startTyping", at=NOW + 4)], NOW + 4, 600) == [False]
    assert await store.enqueue([event_item("startTyping", at=NOW + 6)], NOW + 6, 600) == [True]
    stats = await store.stats()
    assert (stats.accepted, stats.duplicates) == (2, 1) and stats.balanced


async def test_a_queued_event_is_superseded_by_the_next_one_of_its_stream(store: Store) -> None:
    """startTyping still queued when its stopTyping arrives ends superseded; only the stop is claimed."""
    first = await store.enqueue([event_item("startTyping")], NOW, 600)
    second = await store.enqueue([event_item("stopTyping", at=NOW + 1)], NOW + 1, 600)
    assert first == [True] and second == [True]
    assert [s.token for s in second.superseded] == ["tok"]
    (job,) = await store.claim(10, NOW + 1, LEASE)
    assert b"stopTyping" in job.data
    stats = await store.stats()
    assert stats.ended[EndState.SUPERSEDED] == 1 and stats.balanced
    records = await store.deliveries(token="tok")
    assert [r.state for r in records] == ["inflight", "superseded"]
    assert records[1].id == second.superseded[0].id


async def test_other_agents_and_messages_are_never_superseded(store: Store) -> None:
    """Another agent's event and a message between two events of a stream stay, in arrival order."""
    await store.enqueue([message_item("tok", 1), event_item("startTyping")], NOW, 600)
    await store.enqueue([event_item("startTyping", agent_id=2), message_item("tok", 2)], NOW, 600)
    await store.enqueue([event_item("stopTyping")], NOW, 600)
    seen = []
    for _ in range(5):
        jobs = await store.claim(10, NOW, LEASE)
        if not jobs:
            break
        (job,) = jobs
        seen.append(job.data)
        await store.finish(job, EndState.SENT, "", NOW)
    assert len(seen) == 4 and seen[0] == b'{"m":1}' and seen[2] == b'{"m":2}'
    assert b'"id":2' in seen[1] and b"stopTyping" in seen[3]
    stats = await store.stats()
    assert stats.ended[EndState.SUPERSEDED] == 1 and stats.ended[EndState.SENT] == 4 and stats.balanced


async def test_an_event_in_flight_is_not_superseded_and_the_later_one_waits_behind_it(store: Store) -> None:
    """A claimed event is never ended by a later one; that one is claimable once the first has ended."""
    await store.enqueue([event_item("startTyping")], NOW, 600)
    (start,) = await store.claim(10, NOW, LEASE)
    assert (await store.enqueue([event_item("stopTyping")], NOW, 600)).superseded == []
    assert await store.claim(10, NOW, LEASE) == []
    await store.finish(start, EndState.SENT, "", NOW)
    (stop,) = await store.claim(10, NOW, LEASE)
    assert b"stopTyping" in stop.data


async def test_an_event_put_back_behind_a_later_one_of_its_stream_ends_superseded(store: Store) -> None:
    """A failed send of an event whose stream moved on while it was in flight is not retried: superseded."""
    await store.enqueue([event_item("startTyping")], NOW, 600)
    (start,) = await store.claim(10, NOW, LEASE)
    await store.enqueue([event_item("stopTyping")], NOW, 600)
    assert await store.retry(start, NOW + 1, WaitReason.RETRY, "503", now=NOW) is EndState.SUPERSEDED
    (stop,) = await store.claim(10, NOW + 5, LEASE)
    assert b"stopTyping" in stop.data
    assert await store.retry(stop, NOW + 1, WaitReason.RETRY, "503", now=NOW) is None  # the stream's last
    stats = await store.stats()
    assert stats.ended[EndState.SUPERSEDED] == 1 and stats.pending == 1 and stats.balanced


async def test_prune_forgets_streams_only_after_their_last_event_is_over(store: Store) -> None:
    """A stream outlives its window while its event may still be sent; pruning then changes no delivery."""
    await store.enqueue([event_item("startTyping")], NOW, 600)
    await store.prune(NOW + 10)
    assert (await store.enqueue([event_item("stopTyping", at=NOW + 10)], NOW + 10, 600)).superseded != []
    await store.prune(NOW + 1000)
    stats = await store.stats()
    assert stats.pending == 1 and stats.balanced


# -- the dispatcher on a fake clock ------------------------------------------------------------------------


def names_to(pushes: list[Push], token: str) -> list[str]:
    """The event names pushed to ``token``, in order."""
    out = []
    for push in pushes:
        if (push.device_token if isinstance(push, ApnsPush) else push.token) == token:
            data = push.payload["parley"] if isinstance(push, ApnsPush) else push.data["parley"]
            out.append(json.loads(data)["object"]["name"])
    return out


async def test_typing_start_stop_twice_one_second_apart_reaches_both_phones_in_order(harness: Harness) -> None:
    """start, stop, start, stop 1 s apart to an iOS and an Android device: 4 of 4 on each, in order."""
    sequence = ["startTyping", "stopTyping", "startTyping", "stopTyping"]
    for name in sequence:
        assert await harness.accept(typing(name, [IOS_TOKEN, ANDROID_TOKEN])) == [True, True]
        await harness.run()
        harness.clock.t += 1
    assert names_to(harness.provider.sent, IOS_TOKEN) == sequence
    assert names_to(harness.provider.sent, ANDROID_TOKEN) == sequence
    assert isinstance(harness.provider.sent[1], FcmPush)


async def test_an_identical_event_resent_within_the_window_is_pushed_once(harness: Harness) -> None:
    """Parley's resend of a startTyping 2 s later, nothing in between: answered duplicate, pushed once."""
    assert await harness.accept(typing("startTyping", [IOS_TOKEN])) == [True]
    await harness.run()
    harness.clock.t += 2
    assert await harness.accept(typing("startTyping", [IOS_TOKEN])) == [False]
    await harness.run()
    assert names_to(harness.provider.sent, IOS_TOKEN) == ["startTyping"]


async def test_after_an_outage_only_the_last_of_twenty_typing_pairs_is_sent(harness: Harness) -> None:
    """20 start/stop pairs queue up while the provider answers 503; after recovery the drain sends only the
    last stopTyping, and the other 39 end superseded (never sent)."""
    harness.provider.down = True
    for _ in range(20):
        for name in ("startTyping", "stopTyping"):
            await harness.accept(typing(name, [IOS_TOKEN]))
            await harness.run()
            harness.clock.t += 0.1
    harness.provider.down = False
    failed = len(harness.provider.sent)
    for _ in range(20):
        harness.clock.t += 1
        await harness.run()
    assert names_to(harness.provider.sent[failed:], IOS_TOKEN) == ["stopTyping"]
    stats = await harness.store.stats()
    assert stats.ended[EndState.SUPERSEDED] == 39 and stats.ended[EndState.SENT] == 1 and stats.balanced
