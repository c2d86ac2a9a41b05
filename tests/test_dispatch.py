"""Dispatcher on a fake clock: backoff, expiry, grace periods, breakers and per-device order in milliseconds.

The store is the real SQLite store; the provider is a small scripted fake (the real clients are covered by the
end-to-end and fault tests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.config import App, Config, DeliverySettings, load_config
from relay.delivery import admission as admission_module
from relay.delivery.admission import UNROUTED, Admission, Slot
from relay.delivery.dispatcher import LEASE, Dispatcher
from relay.delivery.policy import Breaker, ProbePolicy, RetryPolicy
from relay.delivery.upkeep import PRUNE_EVERY
from relay.inbound.accept import new_deliveries
from relay.inbound.parse import parse_webhook
from relay.observability import LOGGER_NAME, Metrics
from relay.outcome import EndState, Outcome, SendResult, WaitReason
from relay.providers import Provider
from relay.push import ApnsPush, Push
from relay.registry.device import Device
from relay.registry.file import load_registry
from relay.registry.routing import Registry
from relay.store.base import Job, Pruned
from relay.store.sqlite import SqliteStore
from relay.testing.sandbox import IOS_TOKEN, Sandbox, sample


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


class ProviderBug(Exception):
    """What a provider's own bug looks like to the dispatcher: not a classified answer, an exception."""


@dataclass
class Scripted:
    """A provider answering from a per-token script (default: sent); a scripted exception is raised."""

    script: dict[str, list[SendResult | Exception]] = field(default_factory=dict)
    sent: list[Push] = field(default_factory=list)
    down: bool = False  # while set, every send is answered 503 (an outage)

    async def send(self, push: Push) -> SendResult:
        self.sent.append(push)
        if self.down:
            return SendResult(Outcome.RETRY, "503 ServiceUnavailable", 503)
        queue = self.script.get(token_of(push))
        answer = queue.pop(0) if queue else SendResult.sent()
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self) -> None:
        return None

    async def retire(self) -> None:
        return None


def token_of(push: Push) -> str:
    return push.device_token if isinstance(push, ApnsPush) else push.token


@dataclass
class Harness:
    config: Config
    store: SqliteStore
    registry: Registry
    provider: Scripted
    clock: FakeClock
    dispatcher: Dispatcher

    async def accept(self, doc: dict[str, object], max_age: float | None = None) -> list[bool]:
        """What the webhook stores for ``doc`` (its deliveries built as the webhook builds them)."""
        hook = parse_webhook(json.dumps(doc).encode())
        config = self.config
        if max_age is not None:
            config = dataclasses.replace(config, delivery=dataclasses.replace(config.delivery, max_age=max_age))
        items = new_deliveries(hook, config, self.clock.now(), self.app_of, "req-test")
        return await self.store.enqueue(items, self.clock.now(), config.webhook.dedupe_window)

    def app_of(self, token: str) -> App | None:
        route = self.registry.lookup(token)
        return route.app if route is not None else None

    def hint(self, token: str) -> str | None:
        """The app hint the webhook stores with a delivery."""
        route = self.registry.lookup(token)
        return route.app.name if route is not None else None

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
    """A refused credential alarms the app and parks it: nothing else is claimed until one probe per interval
    succeeds, which clears the alarm and releases every kept delivery at once."""
    harness.provider.script[IOS_TOKEN] = [SendResult(Outcome.CONFIG_ERROR, "403 InvalidProviderToken", 403)]
    others = ["f" * 63 + str(i) for i in range(3)]
    for token in others:
        await harness.store.put_device(Device(token, "ios", token), harness.clock.now())
    await harness.accept(msg(1))
    await harness.run()
    assert harness.dispatcher.alarms == {"ios": "403 InvalidProviderToken"}
    for i, token in enumerate(others):
        await harness.accept(msg(10 + i, to=token))
    harness.clock.t += 59
    await harness.run()
    assert len(harness.provider.sent) == 1  # circuit open: nothing else is attempted
    stats = await harness.store.stats()
    assert stats.pending == 4 and stats.inflight == 0  # kept in the store, not claimed and put back
    harness.clock.t += 2
    await harness.run()  # one probe goes out; its success releases the others in the same round
    assert harness.dispatcher.alarms == {}
    stats = await harness.store.stats()
    assert stats.ended[EndState.SENT] == 4 and stats.balanced
    assert sorted(harness.bodies()) == ["m1", "m1", "m10", "m11", "m12"]


async def test_one_app_failing_does_not_delay_another(harness: Harness) -> None:
    """A broken iOS app opens its own circuit and its deliveries stay unclaimed; Android's go out at once."""
    harness.provider.script[IOS_TOKEN] = [SendResult(Outcome.RETRY, "503", 503)] * 50
    await harness.accept(msg(1))
    for i in range(5):  # retried after 1, 2, 4, 8 s; the fifth failure in a row opens the circuit
        harness.clock.t += 2 ** (i - 1) + 0.1 if i else 0
        await harness.run()
    assert harness.dispatcher.breakers["ios"].is_open
    ios_sends = len(harness.provider.sent)
    parked = ["c" * 63 + str(i) for i in range(5)]
    for i, token in enumerate(parked):
        await harness.store.put_device(Device(token, "ios", token), harness.clock.now())
        await harness.accept(msg(20 + i, to=token))
    await harness.accept(sample("message", to=["eJ9xQ2-fcm-registration-token:APA91bH_demo_android_device"]))
    await harness.run()
    fcm = [p for p in harness.provider.sent if not isinstance(p, ApnsPush)]
    assert len(fcm) == 1
    assert len(harness.provider.sent) - len(fcm) == ios_sends  # no iOS send while its circuit is open
    records = [r for t in parked for r in await harness.store.deliveries(token=t)]
    assert [(r.state, r.attempts) for r in records] == [("pending", 0)] * len(parked)  # never claimed


async def test_per_device_order_holds_across_retries_while_other_devices_proceed(harness: Harness) -> None:
    """m1 fails twice; m2 and m3 to the same device wait for it; another device is not held back."""
    other = "9" * 64
    await harness.store.put_device(Device(other, "ios", other), harness.clock.now())
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


def test_retry_policy_draws_full_jitter_between_half_the_initial_delay_and_the_capped_ceiling() -> None:
    """Each delay is drawn between initial/2 and min(maximum, initial * 2**attempts); Retry-After is a floor."""
    drawn: list[tuple[float, float]] = []

    def record(lo: float, hi: float) -> float:
        drawn.append((lo, hi))
        return lo

    policy = RetryPolicy(1, 60, rng=record)
    assert [policy.delay(a) for a in range(8)] == [0.5] * 8
    assert drawn == [(0.5, 1), (0.5, 2), (0.5, 4), (0.5, 8), (0.5, 16), (0.5, 32), (0.5, 60), (0.5, 60)]
    assert policy.delay(0, retry_after=120) == 120
    assert RetryPolicy(1, 60, rng=lambda lo, hi: hi).delay(40) == 60
    with pytest.raises(ValueError):
        RetryPolicy(0, 10)


def test_probe_interval_doubles_to_a_small_cap_whatever_the_backoff() -> None:
    """Probes of an open circuit come 1, 2, 4, 4, ... s apart (jittered down to 3/4), never the 300 s backoff."""
    upper = ProbePolicy(rng=lambda lo, hi: hi)
    lower = ProbePolicy(rng=lambda lo, hi: lo)
    assert [upper.delay(n) for n in range(6)] == [1, 2, 4, 4, 4, 4]
    assert [lower.delay(n) for n in range(4)] == [0.75, 1.5, 3, 3]
    assert upper.delay(50, retry_after=30) == 30  # the provider asked for quiet


async def test_each_app_is_admitted_within_its_own_slots(harness: Harness) -> None:
    """Per-app slots (the app's concurrency, capped by delivery.concurrency), a small unrouted share, none for
    an open circuit and one probe once it is due; a full app takes nothing of another's."""
    apps = harness.config.apps
    settings = dataclasses.replace(harness.config.delivery, concurrency=64, batch_size=256)
    admission = Admission(apps, settings)
    assert admission.limits == {"ios": 64, "android": 64, UNROUTED: 4}
    android = [Job(str(i), str(i), f"t{i}", "message", b"{}", 0.0, 1e9, 0, app="android") for i in range(64)]
    plan = admission.plan({}, 0.0)
    assert plan.app_limits == {"ios": 64, "android": 64} and plan.limit == 132
    slots = [slot for _, slot in admission.claimed(android, plan)]
    plan = admission.plan({}, 0.0)
    assert plan.app_limits == {"ios": 64, "android": 0} and plan.limit == 68  # hung Android holds only its own
    breakers = {"ios": Breaker(open_until=10.0)}
    assert admission.plan(breakers, 5.0, ahead=True).app_limits["ios"] == 0  # open: parked deliveries stay unclaimed
    assert admission.plan(breakers, 10.0, ahead=True).app_limits["ios"] == 1  # half-open: one probe
    plan = admission.plan({}, 0.0, ahead=True)
    # Android's backlog may wait claimed ahead (as many again as its slots); iOS may not while Android sends.
    assert plan.app_limits == {"ios": 64, "android": 64} and plan.limit == 64 + 2 * 64 + 4
    ahead = [Job(str(i), str(i), f"t{i}", "message", b"{}", 0.0, 1e9, 0, app="android") for i in range(64, 128)]
    assert admission.claimed(ahead, plan) == [] and len(admission.waiting["android"]) == 64  # no slot: they wait
    assert admission.release(slots[0]) is False  # one freed slot is not worth a claim of its own ...
    for slot in slots[1:8]:
        admission.release(slot)
    assert admission.release(slots[8]) is True  # ... a batch of them is (the last claim was full)
    unrouted = Slot(UNROUTED)
    admission.running[UNROUTED] = 1
    assert admission.move(unrouted, "ios") and unrouted.pool == "ios"  # routed: it moves to its app's slots
    assert admission.running[UNROUTED] == 0 and admission.running["ios"] == 1
    assert dict(Admission(apps, harness.config.delivery).limits) == {"ios": 100, "android": 100, UNROUTED: 16}


async def test_a_claim_takes_the_slots_freed_while_it_waited_for_the_store(harness: Harness) -> None:
    """The free slots of an app that has the delivery process to itself are read when the store runs the claim,
    not when it was queued: the sends that ended while it waited for the write lock (as long as an APNs answer
    takes, under a stream of webhooks) get successors in the same claim. Counted at queue time, an app with a
    backlog left about half its slots idle. Room to claim ahead comes on top (as many as its slots)."""
    settings = dataclasses.replace(harness.config.delivery, concurrency=64, batch_size=256)
    admission = Admission(harness.config.apps, settings)
    ios = [Job(str(i), str(i), f"t{i}", "message", b"{}", 0.0, 1e9, 0, app="ios") for i in range(200)]
    slots = [slot for _, slot in admission.claimed(ios[:64], admission.plan({}, 0.0))]
    plan = admission.plan({}, 0.0, ahead=True)  # queued with every slot taken
    for slot in slots[:10]:
        admission.release(slot)  # ... and ten sends end before the store runs it
    assert plan.app_limits["ios"] == 10 + 64
    admission.release(slots[10])
    assert plan.app_limits["ios"] == 10 + 64  # read once: what the store was allowed is what is counted
    starts = admission.claimed(ios[64:138], plan)
    assert len(starts) == 11 and len(admission.waiting["ios"]) == 63 and admission.hungry["ios"]
    assert admission.running["ios"] == 64


async def test_an_app_claims_ahead_only_while_every_other_app_is_idle(harness: Harness,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliveries claimed ahead give a backlog the delivery process's spare time, the time another app's pushes
    are served from (during an APNs drain they doubled an Android push's way to FCM): while Android has a send
    running, or started one within ``AHEAD_QUIET``, iOS claims only its free slots; once Android is idle, as
    many again."""
    monkeypatch.setattr(admission_module, "AHEAD_QUIET", 0.0)
    settings = dataclasses.replace(harness.config.delivery, concurrency=64, batch_size=256)
    admission = Admission(harness.config.apps, settings)
    assert admission.plan({}, 0.0, ahead=True).app_limits["ios"] == 128
    android = Job("1", "1", "t1", "message", b"{}", 0.0, 1e9, 0, app="android")
    ((_, slot),) = admission.claimed([android], admission.plan({}, 0.0, ahead=True))
    assert admission.plan({}, 0.0, ahead=True).app_limits["ios"] == 64
    admission.release(slot)
    assert admission.plan({}, 0.0, ahead=True).app_limits["ios"] == 128
    monkeypatch.setattr(admission_module, "AHEAD_QUIET", 60.0)
    admission.release(admission.claimed([android], admission.plan({}, 0.0, ahead=True))[0][1])
    assert admission.plan({}, 0.0, ahead=True).app_limits["ios"] == 64  # its send ended, but only just


async def test_deliveries_claimed_ahead_for_an_app_a_reload_removed_start_unrouted(harness: Harness) -> None:
    """Waiting for a slot of an app the reload removed would be waiting for ever: they start in the unrouted
    share instead, and routing decides what becomes of them (as for any delivery of a removed app)."""
    settings = dataclasses.replace(harness.config.delivery, concurrency=1, batch_size=256)
    admission = Admission(harness.config.apps, settings)
    ios = [Job(str(i), str(i), f"t{i}", "message", b"{}", 0.0, 1e9, 0, app="ios") for i in range(2)]
    assert len(admission.claimed(ios, admission.plan({}, 0.0, ahead=True))) == 1
    assert admission.next_waiting() is None  # its one slot is taken
    admission.configure({"android": harness.config.apps["android"]}, settings)
    waiting = admission.next_waiting()
    assert waiting is not None and waiting[0].id == "1" and waiting[1].pool == UNROUTED
    assert admission.next_waiting() is None and admission.running[UNROUTED] == 1


@dataclass
class Gated(Scripted):
    """A provider whose every send waits until the test opens its gate."""

    gates: list[asyncio.Event] = field(default_factory=list)

    async def send(self, push: Push) -> SendResult:
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return await super().send(push)


async def _claimed_ahead(harness: Harness) -> tuple[Dispatcher, Gated, asyncio.Task[None]]:
    """Six iOS deliveries of six devices, an app with two slots: two sending, two claimed ahead."""
    provider = Gated()
    providers: Mapping[str, Provider] = {"ios": provider, "android": provider}
    settings = dataclasses.replace(harness.config.delivery, concurrency=2)
    dispatcher = Dispatcher(harness.store, harness.registry, lambda: providers, settings, Metrics(), harness.clock)
    tokens = [f"{i:064x}" for i in range(1, 7)]
    for n, token in enumerate(tokens):
        await harness.store.put_device(Device(token, "ios", token), harness.clock.now())
        await harness.accept(msg(100 + n, to=token))
    task = asyncio.get_running_loop().create_task(dispatcher.run())
    async with asyncio.timeout(10):
        while len(provider.gates) < 2 or len(dispatcher.admission.waiting.get("ios", ())) < 2:
            await asyncio.sleep(0.01)
    assert len(provider.gates) == 2 and (await harness.store.stats()).inflight == 4
    return dispatcher, provider, task


def _claimed_ahead_gauge(dispatcher: Dispatcher) -> float | None:
    """What ``parley_relay_delivery_claimed_ahead{app="ios"}`` shows an operator."""
    return dispatcher.metrics.registry.get_sample_value("parley_relay_delivery_claimed_ahead", {"app": "ios"})


async def test_an_answer_starts_a_delivery_claimed_ahead_while_the_store_is_busy(harness: Harness) -> None:
    """An app with a backlog claims as many deliveries again as its slots, to wait claimed: the slot an answer
    frees starts the next at once, with the store's write lock held elsewhere (as the webhooks' commits hold it
    most of the time under a closed loop of webhooks). Started only by a claim, the next send waited for a store
    round trip: in a closed loop of 64 clients an app's 100 slots stood idle half the time (0.56-0.63 of the
    acknowledged pushes left during the load)."""
    dispatcher, provider, task = await _claimed_ahead(harness)
    blocker = sqlite3.connect(harness.config.store.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # no claim nor outcome can be written now
        provider.gates[0].set()
        async with asyncio.timeout(10):
            while len(provider.gates) < 3:
                await asyncio.sleep(0.01)
        assert len(dispatcher.admission.waiting["ios"]) == 1 and _claimed_ahead_gauge(dispatcher) == 1
        blocker.execute("COMMIT")
        async with asyncio.timeout(10):
            while len(provider.gates) < 6 or not all(gate.is_set() for gate in provider.gates):
                for gate in provider.gates:
                    gate.set()
                await asyncio.sleep(0.01)
            while (await harness.store.stats()).ended[EndState.SENT] < 6:
                await asyncio.sleep(0.01)
    finally:
        if blocker.in_transaction:
            blocker.execute("COMMIT")
        blocker.close()
        await dispatcher.stop(1.0)
        await task
    assert len(provider.sent) == 6


async def test_a_stop_puts_deliveries_claimed_ahead_back_due_with_no_attempt_counted(harness: Harness) -> None:
    """What waits claimed ahead of a slot at a stop is given back to the store at once, due now, its attempts
    unchanged: the next process (or instance) sends it without waiting out a lease. The operator's gauge of
    deliveries claimed ahead shows them until then, and none after."""
    dispatcher, _, task = await _claimed_ahead(harness)
    assert _claimed_ahead_gauge(dispatcher) == 2
    await dispatcher.stop(0.4)  # the two sends hang: cancelled after the timeout, put back too
    await task
    assert _claimed_ahead_gauge(dispatcher) == 0
    stats = await harness.store.stats()
    assert (stats.pending, stats.inflight) == (6, 0)
    records = await harness.store.deliveries(limit=10)
    assert all(record.attempts == 0 and record.next_at is not None and record.next_at <= harness.clock.now()
               for record in records)
    assert sum(record.reason == "claimed, not started before the stop" for record in records) == 2


async def test_a_delivery_claimed_ahead_is_given_back_after_half_its_lease_so_it_is_never_sent_twice(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """A delivery claimed ahead waits for a slot of its app while its claim's lease (300 s) runs. Had it waited
    past the lease (slots held by a slow provider, or cut by a reload), the next claim, this process's own
    included, would take it again, and both copies would be sent. Waited half its lease, it goes back to the
    store instead, due now with no attempt counted, and is claimed again with a lease of its own: every push
    leaves once."""
    dispatcher, provider, task = await _claimed_ahead(harness)  # two sending, two claimed ahead, two pending
    try:
        harness.clock.t += LEASE / 2 + 10
        with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
            provider.gates[0].set()  # a slot frees while the two claimed ahead are stale
            async with asyncio.timeout(10):
                while len(provider.gates) < 3:
                    await asyncio.sleep(0.01)
        harness.clock.t += LEASE / 2 - 5  # the first claims' leases are over: a claim takes what they still hold
        provider.gates[1].set()
        async with asyncio.timeout(10):
            while (await harness.store.stats()).ended[EndState.SENT] < 6:
                for gate in provider.gates:
                    gate.set()
                await asyncio.sleep(0.01)
    finally:
        await dispatcher.stop(1.0)
        await task
    sent = [token_of(push) for push in provider.sent]
    assert len(sent) == 6 and len(set(sent)) == 6  # 8 when the two were started late and claimed again
    given_back = _records(caplog, "deliveries claimed ahead waited half their lease for a slot, given back to the "
                                  "store")
    assert [record["count"] for record in given_back] == [2]


async def test_device_registered_by_another_instance_is_found_in_the_store(harness: Harness) -> None:
    """A token unknown to this instance's overlay but added to the shared store (CLI, another relay) is sent."""
    token = "7" * 64
    await harness.store.put_device(Device(token, "ios", token), harness.clock.now())  # not in our registry
    await harness.accept(msg(1, to=token))
    await harness.run()
    assert harness.bodies() == ["m1"]


async def test_reloaded_delivery_settings_apply_to_waiting_deliveries(harness: Harness) -> None:
    """configure() (what a reload calls) takes new delivery settings: here a shorter unroutable grace period."""
    harness.dispatcher.configure(dataclasses.replace(harness.config.delivery, unroutable_grace=5))
    await harness.accept(msg(1, to="unknown-token-2"))
    await harness.run()
    harness.clock.t += 6
    await harness.run()
    assert (await harness.store.stats()).ended[EndState.UNROUTABLE] == 1


def _records(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of every relay log line named ``name``."""
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == name]


async def test_provider_exception_is_a_logged_retry_and_the_devices_later_pushes_flow(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """A provider that raises (a bug, not an answer) leaves a recorded wait with backoff and a log line naming
    the exception; the device's next push waits behind it (order) and both go out once the backoff passes."""
    harness.provider.script[IOS_TOKEN] = [ProviderBug("unexpected")]
    await harness.accept(msg(1))
    await harness.accept(msg(2))
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        await harness.run()
    assert harness.bodies() == ["m1"]
    (line,) = _records(caplog, "delivery failed unexpectedly, retrying")
    assert line["error_type"] == "ProviderBug" and line["wait"] == "retry" and line["attempt"] == 1
    first = [r for r in await harness.store.deliveries(token=IOS_TOKEN) if r.attempts == 1]
    assert [(r.state, r.wait_reason) for r in first] == [("pending", WaitReason.RETRY)]
    stats = await harness.store.stats()
    assert stats.inflight == 0 and stats.pending == 2 and stats.balanced  # nothing lost, nothing wedged
    harness.clock.t += 1.01  # delay(0) is at most 1 s
    await harness.run()
    assert harness.bodies() == ["m1", "m1", "m2"]
    stats = await harness.store.stats()
    assert stats.ended[EndState.SENT] == 2 and stats.balanced


async def test_translate_exception_is_retried_with_backoff_not_lost(harness: Harness,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception while building the push (before any send) is a counted retry; the push goes out after."""
    import relay.delivery.refit as refit_module

    real, calls = refit_module.translate, []

    def failing_once(*args: Any) -> Push:
        calls.append(args)
        if len(calls) == 1:
            raise KeyError("a translate bug")
        return real(*args)

    monkeypatch.setattr(refit_module, "translate", failing_once)
    await harness.accept(msg(1))
    await harness.run()
    assert harness.provider.sent == []
    assert (await harness.store.stats()).pending == 1
    harness.clock.t += 1.01
    await harness.run()
    assert harness.bodies() == ["m1"]
    stats = await harness.store.stats()
    assert stats.ended[EndState.SENT] == 1 and stats.balanced


async def _trip(harness: Harness, token: str = IOS_TOKEN) -> None:
    """Five transient failures in a row for ``token``: the iOS circuit opens."""
    harness.provider.script[token] = [SendResult(Outcome.RETRY, "503", 503)] * 5
    await harness.accept(msg(1, to=token))
    for i in range(5):
        harness.clock.t += 2 ** (i - 1) + 0.01 if i else 0
        await harness.run()
    assert harness.dispatcher.breakers["ios"].is_open


async def test_a_probe_that_raises_does_not_leave_its_app_parked(harness: Harness) -> None:
    """The half-open probe raising (a provider bug) releases the probe: the next due delivery probes at once,
    its success closes the circuit and everything parked goes out."""
    await _trip(harness)
    buggy, fine = "9" * 64, "8" * 64
    for token in (buggy, fine):
        await harness.store.put_device(Device(token, "ios", token), harness.clock.now())
    harness.provider.script[buggy] = [ProviderBug("probe bug")]
    await harness.accept(msg(7, to=buggy))
    await harness.accept(msg(8, to=fine))
    harness.clock.t = harness.dispatcher.breakers["ios"].open_until
    await harness.run()
    assert not harness.dispatcher.breakers["ios"].is_open
    assert "m8" in harness.bodies()
    harness.clock.t += 1.01
    await harness.run()
    stats = await harness.store.stats()
    assert stats.ended[EndState.SENT] == 3 and stats.pending == 0 and stats.balanced


async def test_a_long_outage_costs_few_probes_and_recovery_is_found_within_five_seconds(harness: Harness) -> None:
    """At default settings (backoff up to 300 s), an hour-long APNs outage: the open circuit probes about once
    every 3-4 s (a few dozen requests per 2 minutes, never more), and the first push after APNs answers again
    leaves within 5 s, followed by everything kept meanwhile."""
    provider = Scripted(down=True)
    providers: Mapping[str, Provider] = {"ios": provider, "android": provider}
    dispatcher = Dispatcher(harness.store, harness.registry, lambda: providers, DeliverySettings(), Metrics(),
                            harness.clock)
    tokens = [f"{i:064x}" for i in range(1, 4)]
    for token in tokens:
        await harness.store.put_device(Device(token, "ios", token), harness.clock.now())
    start = harness.clock.now()
    outage, n = 3600.0, 0
    sent_at: list[tuple[float, bool]] = []  # (time, was the provider up)
    while harness.clock.t < start + outage + 30:
        if harness.clock.t - start >= n * 300:  # a new message every 5 minutes during the outage
            await harness.accept(msg(100 + n, to=tokens[n % len(tokens)]), max_age=DeliverySettings().max_age)
            n += 1
        provider.down = harness.clock.t < start + outage
        before = len(provider.sent)
        await dispatcher.run_until_idle()
        sent_at += [(harness.clock.t, not provider.down)] * (len(provider.sent) - before)
        harness.clock.t += await _next_event(harness, dispatcher, start + outage)
    during = [t for t, up in sent_at if not up]
    first_after = min(t for t, up in sent_at if up)
    per_two_minutes = len(during) / (outage / 120)
    print(f"outage {outage:.0f} s: {len(during)} requests ({per_two_minutes:.1f} per 2 min); "
          f"first push {first_after - (start + outage):.2f} s after recovery")
    assert len(during) <= outage / 3 + 10  # at most one probe per 3 s (the jittered 4 s cap)
    assert first_after - (start + outage) <= 5.0
    stats = await harness.store.stats()
    assert stats.ended[EndState.SENT] == n and stats.pending == 0 and stats.balanced


async def _next_event(harness: Harness, dispatcher: Dispatcher, recovery: float) -> float:
    """How far the fake clock moves: to the next probe, due delivery or the recovery, as run() would wait."""
    now = harness.clock.now()
    due = await harness.store.next_due()
    candidates = [dispatcher.circuits.next_probe(now), (due - now) if due is not None else None,
                  recovery - now, 300 - (now % 300) + 0.001]
    return max(0.001, min(c for c in candidates if c is not None and c > 0))


class CountingStore:
    """The real store, counting the housekeeping calls a delivering process makes."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner, self.recovered, self.pruned = inner, 0, 0

    async def recover(self, now: float) -> int:
        self.recovered += 1
        return await self.inner.recover(now)

    async def prune(self, now: float) -> Pruned:
        self.pruned += 1
        return await self.inner.prune(now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_run_recovers_at_start_and_prunes_on_a_timer(harness: Harness) -> None:
    """run() calls store.recover() once when it starts and store.prune() at once and then every minute."""
    store = CountingStore(harness.store)
    dispatcher = Dispatcher(store, harness.registry, lambda: {}, harness.config.delivery, Metrics(),  # type: ignore[arg-type]
                            harness.clock)
    task = asyncio.get_running_loop().create_task(dispatcher.run())
    try:
        async with asyncio.timeout(5):
            while store.pruned == 0:
                await asyncio.sleep(0.01)
        assert store.recovered == 1 and store.pruned == 1
        assert PRUNE_EVERY == 60.0
    finally:
        await dispatcher.stop(1.0)
        await task


class GatedPrune(CountingStore):
    """The real store, whose prune slice waits until the test opens the gate (a prune that takes long)."""

    def __init__(self, inner: SqliteStore) -> None:
        super().__init__(inner)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def prune(self, now: float) -> Pruned:
        self.pruned += 1
        self.entered.set()
        await self.gate.wait()
        return await self.inner.prune(now)


async def test_deliveries_go_out_while_a_prune_is_still_running(harness: Harness) -> None:
    """The delivery loop starts a prune beside itself and goes on claiming: a push is sent while the prune has
    not finished (it used to wait for the whole prune, up to seconds each minute), and stop() ends the prune."""
    store = GatedPrune(harness.store)
    providers: Mapping[str, Provider] = {"ios": harness.provider}
    dispatcher = Dispatcher(store, harness.registry, lambda: providers, harness.config.delivery,  # type: ignore[arg-type]
                            Metrics(), harness.clock)
    task = asyncio.get_running_loop().create_task(dispatcher.run())
    try:
        async with asyncio.timeout(10):
            await store.entered.wait()
            await harness.accept(msg(1))
            dispatcher.wake()
            while not harness.provider.sent:
                await asyncio.sleep(0.01)
        assert dispatcher.upkeep.pruning and not store.gate.is_set()
    finally:
        await dispatcher.stop(1.0)
        await task
    assert harness.bodies() == ["m1"] and not dispatcher.upkeep.pruning


class FlakyClaims(CountingStore):
    """The real store whose first claim raises something unforeseen (a store bug, not StoreError)."""

    failed = False

    async def claim(self, *args: Any, **kwargs: Any) -> list[Job]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("unforeseen")
        return await self.inner.claim(*args, **kwargs)


async def test_an_unforeseen_error_in_the_claim_loop_never_stops_delivery(harness: Harness,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The loop logs an unexpected exception (its type) and claims again after a pause: the push still goes out."""
    store = FlakyClaims(harness.store)
    providers: Mapping[str, Provider] = {"ios": harness.provider}
    dispatcher = Dispatcher(store, harness.registry, lambda: providers, harness.config.delivery,  # type: ignore[arg-type]
                            Metrics(), harness.clock)
    await harness.accept(msg(1))
    task = asyncio.get_running_loop().create_task(dispatcher.run())
    try:
        with caplog.at_level(logging.ERROR, logger=LOGGER_NAME):
            async with asyncio.timeout(10):
                while not harness.provider.sent:
                    await asyncio.sleep(0.01)
    finally:
        await dispatcher.stop(1.0)
        await task
    assert store.failed and harness.bodies() == ["m1"]
    assert [f["error_type"] for f in _records(caplog, "dispatcher loop error, retrying")] == ["RuntimeError"]


class GatedFinish(CountingStore):
    """The real store, whose recording of an end waits until the test opens the gate (a slow commit)."""

    def __init__(self, inner: SqliteStore) -> None:
        super().__init__(inner)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def finish(self, *args: Any, **kwargs: Any) -> None:
        self.entered.set()
        await self.gate.wait()
        await self.inner.finish(*args, **kwargs)


async def test_an_apps_slot_serves_its_next_send_while_the_last_outcome_is_still_being_recorded(
        harness: Harness) -> None:
    """``apps.NAME.concurrency`` bounds sends in flight: a slot is given back when the provider has answered,
    not once the outcome is committed (which capped a single app's drain at half its rate), and only once."""
    store = GatedFinish(harness.store)
    providers: Mapping[str, Provider] = {"ios": harness.provider, "android": harness.provider}
    dispatcher = Dispatcher(store, harness.registry, lambda: providers, harness.config.delivery, Metrics(),  # type: ignore[arg-type]
                            harness.clock)
    await harness.accept(msg(1))
    running = asyncio.ensure_future(dispatcher.run_until_idle())
    await asyncio.wait_for(store.entered.wait(), 5)
    assert len(harness.provider.sent) == 1
    assert dispatcher.admission.running["ios"] == 0  # answered: the slot is free while the commit runs
    store.gate.set()
    await asyncio.wait_for(running, 5)
    assert dispatcher.admission.running["ios"] == 0  # the end of the delivery did not give it back twice
    assert (await harness.store.stats()).ended[EndState.SENT] == 1


async def test_a_delivery_outcome_and_the_claim_of_its_tokens_next_share_one_transaction(harness: Harness) -> None:
    """At everyday rates nothing else batches: the outcome of a send, the claim of its token's next delivery and
    the loop's next-due read go to the store together, one transaction (one round trip) per delivery, not three."""
    for i in range(1, 9):
        await harness.accept(msg(i))
    before = harness.store.commits
    task = asyncio.get_running_loop().create_task(harness.dispatcher.run())
    try:
        async with asyncio.timeout(10):
            while (await harness.store.stats()).ended[EndState.SENT] < 8:
                await asyncio.sleep(0.01)
    finally:
        await harness.dispatcher.stop(1.0)
        await task
    assert harness.bodies() == [f"m{i}" for i in range(1, 9)]  # per-device order holds
    # recover, prune, the first claim, then one transaction per delivery (its outcome + the next claim)
    assert harness.store.commits - before <= 3 + 8
