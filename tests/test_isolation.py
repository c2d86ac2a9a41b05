"""Per-app isolation under a backlog (SPEC §6): a slow or failing app never delays another, whatever the backlog.

Default delivery settings, the real clients against the fakes. Bounds are orderings the old shared admission
broke (an iOS push arriving before any FCM send could even time out; an Android push arriving while thousands
of APNs sends are still queued), and the measured times are printed.
"""

from __future__ import annotations

import time
import uuid

from relay.outcome import EndState
from relay.testing.sandbox import Sandbox, sample
from tests.conftest import MakeRelay, RelayUnderTest, wait_until

ROUTING = [{"match": "apns-hex", "app": "ios"}, {"match": "any", "app": "android"}]


def _apns_token() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def _fcm_token() -> str:
    return f"fcm-{uuid.uuid4().hex}:APA91b" + "x" * 20


async def _post_many(r: RelayUnderTest, tokens: list[str], first_id: int) -> None:
    """One webhook per 100 tokens (the default max_tokens), each acknowledged."""
    for n, start in enumerate(range(0, len(tokens), 100)):
        status, answer = await r.post(sample("message", to=tokens[start:start + 100], id=first_id + n))
        assert status == 200 and answer["accepted"] == len(tokens[start:start + 100])


async def test_hung_fcm_with_a_backlog_never_delays_an_ios_push(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """FCM accepts but never answers, 400 Android deliveries queued (more than delivery.concurrency): an iOS
    webhook's push reaches APNs at once, long before any hung FCM send could time out."""
    # delivery: the defaults; shutdown_timeout only shortens the test's end (sends still hung then)
    r = await make_relay(devices={}, routing=ROUTING, delivery={}, shutdown_timeout=1)
    settings = r.relay.config.delivery
    assert settings.concurrency == 256 and settings.send_timeout == 15
    sandbox.fcm.hang(True)
    await _post_many(r, [_fcm_token() for _ in range(400)], first_id=1)
    android_slots = r.relay.config.apps["android"].concurrency
    await wait_until(lambda: _inflight(r, android_slots))  # Android's own slots are all taken by hung sends
    hung = await sandbox.fcm.wait_for(1)
    ios = _apns_token()
    posted = time.time()
    status, _ = await r.post(sample("message", to=[ios], id=999))
    assert status == 200
    (push,) = await sandbox.apns.wait_for(1, timeout=30)
    first_hung = min(q.received_at for q in hung)
    print(f"iOS push reached APNs {1000 * (push.received_at - posted):.1f} ms after its webhook "
          f"(FCM: {len(sandbox.fcm.requests)} sends hung, 400 queued)")
    assert push.device_token == ios and push.status == 200
    assert push.received_at < first_hung + settings.send_timeout  # no FCM timeout had freed anything
    assert all(q.status == 0 for q in sandbox.fcm.requests)  # ... and FCM never answered
    assert len(sandbox.fcm.requests) <= android_slots  # the hung app holds only its own slots
    await wait_until(lambda: _sent(r, 1))  # recorded as sent while FCM still hangs
    assert (await r.relay.store.stats()).balanced


async def test_android_push_flows_while_apns_drains_a_large_backlog(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """3,000 APNs deliveries kept through an outage are released at once; while they drain, an Android
    webhook's push reaches FCM without queueing behind them."""
    r = await make_relay(devices={}, routing=ROUTING, delivery={})
    backlog = [_apns_token() for _ in range(3000)]
    sandbox.apns.fail_all(503, "ServiceUnavailable")
    await _post_many(r, backlog, first_id=1)
    await wait_until(lambda: sum(q.status == 503 for q in sandbox.apns.requests) >= 5)  # enough to open the circuit
    sandbox.apns.recover()
    sandbox.apns.set_delay(0.02)  # a real APNs answers in tens of ms: the drain takes a while
    await wait_until(lambda: sum(q.status == 200 for q in sandbox.apns.requests) >= 200, timeout=30)
    posted = time.time()
    status, _ = await r.post(sample("message", to=[_fcm_token()], id=9999))
    assert status == 200
    (push,) = await sandbox.fcm.wait_for(1, timeout=30)
    sent_before = sum(q.status == 200 and q.received_at <= push.received_at for q in sandbox.apns.requests)
    print(f"Android push reached FCM {1000 * (push.received_at - posted):.1f} ms after its webhook, "
          f"with {len(backlog) - sent_before} of {len(backlog)} APNs deliveries still queued")
    assert push.status == 200
    assert sent_before < len(backlog) - 500  # it did not wait for the backlog
    await r.settle(timeout=120)
    stats = await r.relay.store.stats()
    assert stats.ended[EndState.SENT] == len(backlog) + 1 and stats.balanced



async def _sent(r: RelayUnderTest, n: int) -> bool:
    return (await r.relay.store.stats()).ended.get(EndState.SENT, 0) >= n


async def _inflight(r: RelayUnderTest, n: int) -> bool:
    return (await r.relay.store.stats()).inflight >= n
