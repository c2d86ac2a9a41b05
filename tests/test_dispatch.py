"""Dispatcher on a fake clock: backoff, expiry, grace periods, breakers and per-device order in milliseconds.

The store is the real SQLite store; the provider is a small scripted fake (the real clients are covered by the
end-to-end and fault tests).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.config import Config, load_config
from relay.delivery.dispatcher import Dispatcher, RetryPolicy
from relay.inbound.parse import dedupe_key, parse_webhook
from relay.observability import Metrics
from relay.outcome import EndState, Outcome, SendResult, WaitReason
from relay.providers import Provider
from relay.push import ApnsPush, Push
from relay.registry.device import Device
from relay.registry.file import load_registry
from relay.registry.routing import Registry
from relay.store.base import NewDelivery
from relay.store.sqlite import SqliteStore
from relay.testing.sandbox import IOS_TOKEN, Sandbox, sample


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Scripted:
    """A provider answering from a per-token script (default: sent)."""

    script: dict[str, list[SendResult]] = field(default_factory=dict)
    sent: list[Push] = field(default_factory=list)

    async def send(self, push: Push) -> SendResult:
        self.sent.append(push)
        token = push.device_token if isinstance(push, ApnsPush) else push.token
        queue = self.script.get(token)
        return queue.pop(0) if queue else SendResult.sent()

    async def close(self) -> None:
        return None

    async def retire(self) -> None:
        return None


@dataclass
class Harness:
    config: Config
    store: SqliteStore
    registry: Registry
    provider: Scripted
    clock: FakeClock
    dispatcher: Dispatcher

    async def accept(self, doc: dict[str, object]) -> list[bool]:
        hook = parse_webhook(json.dumps(doc).encode())
        ttl = self.config.delivery.max_age if hook.type == "message" else 30.0
        now = self.clock.now()
        items = [NewDelivery(t, hook.type, hook.data, dedupe_key(hook, t), now + ttl) for t in hook.tokens]
        return await self.store.enqueue(items, now, self.config.webhook.dedupe_window)

    async def run(self) -> None:
        await self.dispatcher.run_until_idle()

    def bodies(self) -> list[str]:
        return [p.payload["aps"]["alert"]["body"] for p in self.provider.sent if isinstance(p, ApnsPush)]


@pytest.fixture
async def harness(sandbox: Sandbox, tmp_path: Path) -> Harness:
    config = load_config(sandbox.write(delivery={"backoff_initial": 1, "backoff_max": 60, "max_age": 3600,
                                                 "unroutable_grace": 600, "config_error_retry": 60}))
    store = SqliteStore(config.store)
    await store.open()
    registry = Registry(config.apps, load_registry(config.registry, config.apps))
    provider = Scripted()
    providers: Mapping[str, Provider] = {"ios": provider, "android": provider}
    clock = FakeClock()
    dispatcher = Dispatcher(store, registry, lambda: providers, config.delivery, Metrics(), clock,
                            RetryPolicy(1, 60, rng=lambda lo, hi: hi))
    yield Harness(config, store, registry, provider, clock, dispatcher)
    await store.close()


def msg(i: int, to: str = IOS_TOKEN) -> dict[str, object]:
    return sample("message", to=[to], id=i, message=f"m{i}")


async def test_retry_backs_off_exponentially_and_honours_retry_after(harness: Harness) -> None:
    """Transient failures are retried after 1 s, 2 s, ... and never sooner than Retry-After."""
    harness.provider.script[IOS_TOKEN] = [SendResult(Outcome.RETRY, "503", 503),
                                          SendResult(Outcome.RETRY, "429", 429, retry_after=30)]
    await harness.accept(msg(1))
    await harness.run()
    assert len(harness.provider.sent) == 1
    harness.clock.t += 0.9
    await harness.run()
    assert len(harness.provider.sent) == 1  # not due yet
    harness.clock.t += 0.2
    await harness.run()
    assert len(harness.provider.sent) == 2  # after ~1 s
    harness.clock.t += 2.5  # the backoff would allow this, Retry-After says 30 s
    await harness.run()
    assert len(harness.provider.sent) == 2
    harness.clock.t += 28
    await harness.run()
    assert len(harness.provider.sent) == 3
    stats = await harness.store.stats()
    assert stats.ended[EndState.SENT] == 1 and stats.balanced


async def test_message_past_max_age_ends_expired_and_counted(harness: Harness) -> None:
    """A message that keeps failing ends as expired once its next attempt would pass max_age."""
    harness.provider.script[IOS_TOKEN] = [SendResult(Outcome.RETRY, "503", 503)] * 100
    await harness.accept(msg(1))
    for _ in range(80):
        await harness.run()
        harness.clock.t += 61
    stats = await harness.store.stats()
    assert stats.ended[EndState.EXPIRED] == 1 and stats.pending == 0 and stats.balanced


async def test_event_past_its_ttl_is_never_sent(harness: Harness) -> None:
    """A typing event that could not be sent within 30 s ends expired and is never sent late."""
    await harness.accept(sample("event", to=[IOS_TOKEN]))
    harness.clock.t += 31
    await harness.run()
    assert harness.provider.sent == []
    assert (await harness.store.stats()).ended[EndState.EXPIRED] == 1


async def test_unroutable_token_waits_for_grace_then_ends_unroutable(harness: Harness) -> None:
    """A token without a registry entry is kept for the grace period, then ends unroutable."""
    await harness.accept(msg(1, to="unknown-token-1"))
    await harness.run()
    harness.clock.t += 599
    await harness.run()
    assert (await harness.store.stats()).pending == 1
    harness.clock.t += 2
    await harness.run()
    stats = await harness.store.stats()
    assert stats.ended[EndState.UNROUTABLE] == 1 and harness.provider.sent == []


async def test_unroutable_delivery_is_sent_as_soon_as_a_device_is_added(harness: Harness) -> None:
    """Adding the device (run time) and waking its token sends the parked delivery before the grace ends."""
    token = "e" * 64
    await harness.accept(msg(1, to=token))
    await harness.run()
    device = Device(token, "ios", token)
    await harness.store.put_device(device, harness.clock.now())
    harness.registry.put(device)
    assert await harness.store.wake(harness.clock.now(), reasons={WaitReason.UNROUTABLE}, tokens=[token]) == 1
    await harness.run()
    assert harness.bodies() == ["m1"]


async def test_dead_token_is_marked_and_never_attempted_again(harness: Harness) -> None:
    """After a dead-token answer, the token is dead in the store and later deliveries end without a send."""
    harness.provider.script[IOS_TOKEN] = [SendResult(Outcome.TOKEN_DEAD, "410 Unregistered", 410)]
    await harness.accept(msg(1))
    await harness.run()
    await harness.accept(msg(2))
    await harness.run()
    assert len(harness.provider.sent) == 1
    assert await harness.store.dead_tokens() == {IOS_TOKEN: "410 Unregistered"}
    stats = await harness.store.stats()
    assert stats.ended[EndState.TOKEN_DEAD] == 2 and stats.dead_tokens == 1


async def test_permanent_refusal_is_dead_lettered_with_reason_and_can_be_retried(harness: Harness) -> None:
    """Other 4xx answers end as dead letters with the provider's reason; retry queues them again."""
    harness.provider.script[IOS_TOKEN] = [SendResult(Outcome.PERMANENT, "400 BadCollapseId", 400)]
    await harness.accept(msg(1))
    await harness.run()
    (letter,) = await harness.store.dead_letters()
    assert letter.reason == "400 BadCollapseId" and json.loads(letter.data)["object"]["message"] == "m1"
    assert await harness.store.retry_dead_letters(None, harness.clock.now()) == 1
    await harness.run()
    stats = await harness.store.stats()
    assert stats.ended[EndState.SENT] == 1 and stats.ended[EndState.DEAD_LETTER] == 0 and stats.balanced


async def test_config_error_keeps_deliveries_raises_alarm_and_probes(harness: Harness) -> None:
    """A refused credential alarms the app, keeps every delivery, and one probe per interval resumes them."""
    harness.provider.script[IOS_TOKEN] = [SendResult(Outcome.CONFIG_ERROR, "403 InvalidProviderToken", 403)]
    others = ["f" * 63 + str(i) for i in range(3)]
    for token in others:
        harness.registry.put(Device(token, "ios", token))
    await harness.accept(msg(1))
    await harness.run()
    assert harness.dispatcher.alarms == {"ios": "403 InvalidProviderToken"}
    for i, token in enumerate(others):
        await harness.accept(msg(10 + i, to=token))
    await harness.run()
    assert len(harness.provider.sent) == 1  # circuit open: nothing else is attempted
    harness.clock.t += 61
    await harness.run()  # one probe goes out; deliveries claimed alongside it wait a second
    assert harness.dispatcher.alarms == {}
    harness.clock.t += 1.1
    await harness.run()
    stats = await harness.store.stats()
    assert stats.ended[EndState.SENT] == 4 and stats.balanced


async def test_one_app_failing_does_not_delay_another(harness: Harness) -> None:
    """A broken iOS app opens its own circuit; Android deliveries keep flowing."""
    harness.provider.script[IOS_TOKEN] = [SendResult(Outcome.RETRY, "503", 503)] * 50
    await harness.accept(msg(1))
    for i in range(6):
        await harness.run()
        harness.clock.t += 2 ** i + 0.1
    await harness.accept(sample("message", to=["eJ9xQ2-fcm-registration-token:APA91bH_demo_android_device"]))
    await harness.run()
    fcm = [p for p in harness.provider.sent if not isinstance(p, ApnsPush)]
    assert len(fcm) == 1


async def test_per_device_order_holds_across_retries_while_other_devices_proceed(harness: Harness) -> None:
    """m1 fails twice; m2 and m3 to the same device wait for it; another device is not held back."""
    other = "9" * 64
    harness.registry.put(Device(other, "ios", other))
    harness.provider.script[IOS_TOKEN] = [SendResult(Outcome.RETRY, "503", 503)] * 2
    for i in (1, 2, 3):
        await harness.accept(msg(i))
    await harness.accept(msg(4, to=other))
    await harness.run()
    assert harness.bodies() == ["m1", "m4"]
    harness.clock.t += 1.1
    await harness.run()
    harness.clock.t += 2.1
    await harness.run()
    mine = [p.payload["aps"]["alert"]["body"] for p in harness.provider.sent
            if isinstance(p, ApnsPush) and p.device_token == IOS_TOKEN]
    assert mine == ["m1", "m1", "m1", "m2", "m3"]


async def test_duplicate_within_window_is_stored_once(harness: Harness) -> None:
    """The same message id to the same token within the window is a duplicate; after the window it is new."""
    assert await harness.accept(msg(1)) == [True]
    assert await harness.accept(msg(1)) == [False]
    event = sample("event", to=[IOS_TOKEN])
    assert await harness.accept(event) == [True]
    assert await harness.accept(event) == [False]
    harness.clock.t += 601
    assert await harness.accept(msg(1)) == [True]
    stats = await harness.store.stats()
    assert stats.accepted == 3 and stats.duplicates == 2


async def test_retries_keep_the_same_apns_id(harness: Harness) -> None:
    """One stable apns-id per delivery, the same on every retry."""
    harness.provider.script[IOS_TOKEN] = [SendResult(Outcome.RETRY, "500", 500)]
    await harness.accept(msg(1))
    await harness.run()
    harness.clock.t += 2
    await harness.run()
    ids = {p.apns_id for p in harness.provider.sent if isinstance(p, ApnsPush)}
    assert len(harness.provider.sent) == 2 and len(ids) == 1


def test_retry_policy_is_full_jitter_within_bounds() -> None:
    """Delays stay between half the initial delay and the exponential ceiling, capped at the maximum."""
    policy = RetryPolicy(1, 60)
    for attempts in range(12):
        delay = policy.delay(attempts)
        assert 0.5 <= delay <= min(60, 2 ** attempts)
    assert policy.delay(0, retry_after=120) == 120
    with pytest.raises(ValueError):
        RetryPolicy(0, 10)


async def test_device_registered_by_another_instance_is_found_in_the_store(harness: Harness) -> None:
    """A token unknown to this instance's overlay but added to the shared store (CLI, another relay) is sent."""
    token = "7" * 64
    await harness.store.put_device(Device(token, "ios", token), harness.clock.now())  # not in our registry
    await harness.accept(msg(1, to=token))
    await harness.run()
    assert harness.bodies() == ["m1"]


async def test_reloaded_delivery_settings_apply_to_waiting_deliveries(harness: Harness) -> None:
    """configure() (what a reload calls) takes new delivery settings: here a shorter unroutable grace period."""
    import dataclasses

    harness.dispatcher.configure(dataclasses.replace(harness.config.delivery, unroutable_grace=5))
    await harness.accept(msg(1, to="unknown-token-2"))
    await harness.run()
    harness.clock.t += 6
    await harness.run()
    assert (await harness.store.stats()).ended[EndState.UNROUTABLE] == 1
