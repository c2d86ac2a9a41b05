"""What the Redis store adds to the shared behaviour suite (tests/test_store.py): per-app streams and claim
limits, typed schedules, recovery that tells a gone consumer from a live one, tracing indexes and retention,
and the move from the one-stream layout of earlier versions.

Uses the Redis at ``REDIS_URL`` with a fresh key prefix per test (deleted afterwards); skipped with the
reason when no Redis answers there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from relay.config import StoreSettings
from relay.outcome import EndState, WaitReason
from relay.store import NewDelivery, create_store
from relay.store.redis import RedisStore
from tests.conftest import REDIS_URL, redis_keyspace

NOW = 1_000_000.0
LEASE = 300.0
IDLE = 0.5  # claim_idle where a test needs a dead consumer's work reclaimed quickly

_KEYS = itertools.count()

MakeStore = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
def settings() -> Iterator[StoreSettings]:
    """Default Redis store settings on a fresh key prefix."""
    with redis_keyspace("redis") as prefix:
        yield StoreSettings(backend="redis", url=REDIS_URL, prefix=prefix)


@pytest.fixture
def raw(settings: StoreSettings) -> Iterator[redis.Redis]:
    """A plain client on the same database, to look at (or, for the migration test, write) the keys."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
async def make_store(settings: StoreSettings) -> AsyncIterator[MakeStore]:
    """Open another store on the same data (another relay process, or an operator command)."""
    opened: list[RedisStore] = []

    async def make(**changes: Any) -> RedisStore:
        store = create_store(dataclasses.replace(settings, **changes))
        assert isinstance(store, RedisStore)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> RedisStore:
    return await make_store()


def item(token: str, *, app: str | None = None, n: int = 0, request_id: str = "",
         message_id: str | None = None) -> NewDelivery:
    return NewDelivery(token, "message", f'{{"n":{n}}}'.encode(), f"{token}:{next(_KEYS)}", NOW + 86400, app=app,
                       request_id=request_id, message_id=message_id)


async def enqueue(store: RedisStore, *tokens: str, app: str | None = None) -> None:
    flags = await store.enqueue([item(token, app=app, n=n) for n, token in enumerate(tokens)], NOW, 600)
    assert all(flags)


def snapshot(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every key of the store with its full content, stream groups and consumers included."""
    state: dict[str, Any] = {}
    for key in sorted(client.scan_iter(f"{prefix}:*", count=1000)):
        kind = client.type(key)
        if kind == "hash":
            state[key] = client.hgetall(key)
        elif kind == "zset":
            state[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            state[key] = client.lrange(key, 0, -1)
        elif kind == "set":
            state[key] = sorted(client.smembers(key))
        elif kind == "stream":
            groups = client.xinfo_groups(key)
            consumers = [(c["name"], c["pending"]) for g in groups for c in client.xinfo_consumers(key, g["name"])]
            state[key] = (client.xrange(key), [(g["name"], g["pending"], g["last-delivered-id"]) for g in groups],
                          sorted(consumers))
        else:
            state[key] = client.get(key)
    return state


# -- open, recover: a live process's work is never touched -------------------------------------------


async def test_an_operator_store_changes_nothing_while_a_live_process_holds_work(
    store: RedisStore, make_store: MakeStore, raw: redis.Redis, settings: StoreSettings
) -> None:
    """Default settings: opening the store from an operator command and reading everything through it leaves
    every key as it was (no consumer, no reclaim); another delivering process's ``recover`` at its start
    takes nothing from the live one, so nothing is sent twice; the live process then records its work."""
    await enqueue(store, "a", "a", "b")
    held = await store.claim(10, NOW, LEASE)
    before = snapshot(raw, settings.prefix)
    operator = await make_store()
    await operator.stats()
    await operator.next_due()
    await operator.deliveries(token="a")
    await operator.deliveries()
    await operator.dead_letters()
    await operator.dead_letter(held[0].id)
    await operator.list_devices()
    await operator.close()
    assert snapshot(raw, settings.prefix) == before
    other = await make_store()
    assert await other.recover(NOW) == 0
    assert await other.claim(10, NOW, LEASE) == []
    for job in held:
        await store.finish(job, EndState.SENT, "", NOW)
    (last,) = await other.claim(10, NOW, LEASE)
    assert last.data == b'{"n":1}'
    stats = await other.stats()
    assert (stats.ended[EndState.SENT], stats.inflight, stats.redelivered) == (2, 1, 0) and stats.balanced


async def test_recover_never_takes_work_a_live_process_keeps_renewing(make_store: MakeStore) -> None:
    """Past claim_idle, a live process's heartbeat keeps its claims: a starting process's recover takes none."""
    live = await make_store(claim_idle=IDLE)
    await enqueue(live, "a", "b")
    jobs = await live.claim(10, NOW, LEASE)
    await asyncio.sleep(IDLE * 3)
    starting = await make_store(claim_idle=IDLE)
    assert await starting.recover(NOW) == 0
    assert await starting.claim(10, NOW, LEASE) == []
    for job in jobs:
        await live.finish(job, EndState.SENT, "", NOW)
    assert (await starting.stats()).ended[EndState.SENT] == 2


async def test_recover_gives_back_a_claim_past_its_lease_by_the_callers_clock(
    store: RedisStore, make_store: MakeStore
) -> None:
    """A holder that hung past its lease (still heartbeating): a starting process's recover(now) gives the
    claim back, counted as redelivered, and the hung holder's late record changes nothing."""
    await enqueue(store, "a", "a")
    (job,) = await store.claim(10, NOW, 10)
    starting = await make_store()
    assert await starting.recover(NOW + 9) == 0
    assert await starting.recover(NOW + 11) == 1
    (again,) = await starting.claim(10, NOW + 11, LEASE)
    assert (again.id, again.delivery_id) == (job.id, job.delivery_id)
    await store.finish(job, EndState.DEAD_LETTER, "late", NOW + 12)
    await starting.finish(again, EndState.SENT, "", NOW + 12)
    stats = await starting.stats()
    assert (stats.ended[EndState.SENT], stats.ended[EndState.DEAD_LETTER], stats.pending, stats.redelivered) == (
        1, 0, 1, 1) and stats.balanced


_CRASHER = """
import asyncio, sys
from relay.config import StoreSettings
from relay.store import create_store

async def main() -> None:
    store = create_store(StoreSettings(backend="redis", url=sys.argv[1], prefix=sys.argv[2],
                                       claim_idle=float(sys.argv[3])))
    await store.open()
    jobs = await store.claim(10, float(sys.argv[4]), 300, app_limits={"ios": 5})
    print(",".join(job.id for job in jobs), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_recover_puts_a_killed_process_claims_back_in_every_app_stream(
    store: RedisStore, make_store: MakeStore, settings: StoreSettings
) -> None:
    """A process SIGKILLed with claims in two app streams and the hint-less one: a starting process's
    recover() gives them all back once their claims went unrenewed for claim_idle, counts them as
    redelivered, and they are claimable by anyone; the dead process's late records would be fenced off."""
    await store.enqueue([item("i1", app="ios"), item("a1", app="android"), item("u1"), item("i1", app="ios")],
                        NOW, 600)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CRASHER), REDIS_URL, settings.prefix, str(IDLE), str(NOW)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    claimed = (await asyncio.to_thread(proc.stdout.readline)).strip().split(",")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert len(claimed) == 3
    await asyncio.sleep(IDLE + 0.2)  # its claims have now gone unrenewed for longer than claim_idle
    starting = await make_store(claim_idle=IDLE)
    assert await starting.recover(NOW) == 3
    stats = await starting.stats()
    assert (stats.redelivered, stats.pending, stats.inflight) == (3, 4, 0) and stats.balanced
    jobs = await store.claim(10, NOW, LEASE)  # any consumer: they are back in their streams
    assert sorted(j.id for j in jobs) == sorted(claimed)
    assert {j.app for j in jobs} == {"ios", "android", None}


# -- per-app streams and claim limits ---------------------------------------------------------------


async def test_an_app_at_its_limit_never_holds_back_another_apps_single_delivery(
    store: RedisStore, raw: redis.Redis, settings: StoreSettings
) -> None:
    """400 due heads of app A and app_limits {A: 0}: app B's one due head is claimed at once, no entry of A
    is read (so none is held); {A: 10} takes 10 of A besides B's; the books stay balanced."""
    await store.enqueue([item(f"a{n}", app="A") for n in range(400)], NOW, 600)
    await store.enqueue([item("b0", app="B")], NOW, 600)
    (job,) = await store.claim(256, NOW, LEASE, app_limits={"A": 0})
    assert (job.token, job.app) == ("b0", "B")
    assert raw.xpending(f"{settings.prefix}:stream:A", "relay")["pending"] == 0
    await store.enqueue([item("b1", app="B")], NOW, 600)
    jobs = await store.claim(256, NOW, LEASE, app_limits={"A": 10})
    assert sorted(j.app or "" for j in jobs) == ["A"] * 10 + ["B"]
    stats = await store.stats()
    assert (stats.pending, stats.inflight) == (390, 12) and stats.balanced


async def test_without_limits_a_claim_shares_itself_between_apps(store: RedisStore) -> None:
    """No app_limits: a backlog of one app still leaves room for the others' heads in the same claim."""
    await store.enqueue([item(f"a{n}", app="A") for n in range(400)], NOW, 600)
    await store.enqueue([item("b0", app="B"), item("u0")], NOW, 600)
    jobs = await store.claim(10, NOW, LEASE)
    assert len(jobs) == 10
    assert {j.token for j in jobs} >= {"b0", "u0"}


async def test_an_app_parked_on_its_schedule_is_not_promoted_while_at_its_limit(
    store: RedisStore, raw: redis.Redis, settings: StoreSettings
) -> None:
    """An app's due parked deliveries (circuit open) stay on their schedule while it is at its limit, and
    another app's are claimed; lifting the limit claims them."""
    await store.enqueue([item(f"a{n}", app="A") for n in range(50)] + [item("b0", app="B")], NOW, 600)
    for job in await store.claim(100, NOW, LEASE):
        await store.retry(job, NOW + 30, WaitReason.CIRCUIT_OPEN, "circuit open", count_attempt=False)
    (job,) = await store.claim(100, NOW + 30, LEASE, app_limits={"A": 0})
    assert job.token == "b0"
    assert raw.zcard(f"{settings.prefix}:wait:circuit_open:A") == 50
    assert len(await store.claim(100, NOW + 30, LEASE)) == 50


async def test_retry_moves_a_delivery_to_the_app_found_at_delivery_and_keeps_device_order(
    store: RedisStore,
) -> None:
    """``retry(app=)`` updates the hint: the delivery is then admitted as that app's; the token's next
    delivery (another hint) still waits behind it; ``app=None`` keeps the stored hint."""
    await store.enqueue([item("t", app=None, n=0), item("t", app="other", n=1)], NOW, 600)
    (job,) = await store.claim(10, NOW, LEASE)
    await store.retry(job, NOW, WaitReason.RETRY, "503", app="ios")
    assert await store.claim(10, NOW, LEASE, app_limits={"ios": 0}) == []
    (again,) = await store.claim(10, NOW, LEASE, app_limits={"other": 0})
    assert (again.id, again.app, again.attempts) == (job.id, "ios", 1)
    await store.retry(again, NOW, WaitReason.RETRY, "503")
    (third,) = await store.claim(10, NOW, LEASE)
    assert third.app == "ios"
    await store.finish(third, EndState.SENT, "", NOW)
    (last,) = await store.claim(10, NOW, LEASE)
    assert (last.data, last.app) == (b'{"n":1}', "other")


async def test_a_stalled_instance_cannot_retry_into_another_app_after_a_takeover(make_store: MakeStore) -> None:
    """Fencing holds across streams: a late retry with a new app hint from the stalled holder changes nothing."""
    stalled = await make_store(claim_idle=30.0)
    await stalled.enqueue([item("a", app="ios")], NOW, 600)
    (job,) = await stalled.claim(10, NOW, LEASE)
    taker = await make_store(claim_idle=0.1)  # the least the config accepts
    await asyncio.sleep(0.25)
    (taken,) = await taker.claim(10, NOW, LEASE)
    assert taken.id == job.id
    await stalled.retry(job, NOW + 99, WaitReason.RETRY, "late", app="android")
    await taker.finish(taken, EndState.SENT, "", NOW)
    stats = await taker.stats()
    assert (stats.ended[EndState.SENT], stats.pending, stats.inflight, stats.redelivered) == (1, 0, 0, 1)
    (record,) = await taker.deliveries(token="a")
    assert (record.app, record.state) == ("ios", "sent")


# -- typed schedules and wake ---------------------------------------------------------------------


async def test_a_reload_wake_makes_config_errors_claimable_at_once_and_leaves_backoffs(
    store: RedisStore, raw: redis.Redis, settings: StoreSettings
) -> None:
    """Each typed reason has its own schedule; ``wake(reasons={CONFIG_ERROR, CIRCUIT_OPEN, UNROUTABLE})``
    (a reload after an alarm) puts those heads straight into their streams, claimable at once, and leaves an
    ordinary backoff alone; ``wake(reasons={UNROUTABLE}, tokens=[t])`` (devices add) wakes only t."""
    await store.enqueue([item("c", app="ios"), item("o", app="ios"), item("u"), item("u2"), item("r", app="ios")],
                        NOW, 600)
    c, o, u, u2, r = await store.claim(10, NOW, LEASE)
    await store.retry(c, NOW + 60, WaitReason.CONFIG_ERROR, "403 InvalidProviderToken", count_attempt=False)
    await store.retry(o, NOW + 60, WaitReason.CIRCUIT_OPEN, "circuit open", count_attempt=False)
    await store.retry(u, NOW + 600, WaitReason.UNROUTABLE, count_attempt=False)
    await store.retry(u2, NOW + 600, WaitReason.UNROUTABLE, count_attempt=False)
    await store.retry(r, NOW + 60, WaitReason.RETRY, "503")
    prefix = settings.prefix
    assert [raw.zcard(f"{prefix}:wait:{name}") for name in ("config_error:ios", "circuit_open:ios", "unroutable",
                                                            "retry:ios")] == [1, 1, 2, 1]
    assert await store.wake(NOW, reasons={WaitReason.UNROUTABLE}, tokens=["u", "c", "zzz"]) == 1
    assert [j.token for j in await store.claim(10, NOW, LEASE)] == ["u"]
    assert await store.wake(NOW, reasons={WaitReason.CONFIG_ERROR, WaitReason.CIRCUIT_OPEN,
                                          WaitReason.UNROUTABLE}) == 3
    assert sorted(j.token for j in await store.claim(10, NOW, LEASE)) == ["c", "o", "u2"]
    assert raw.zcard(f"{prefix}:wait:retry:ios") == 1
    assert await store.next_due() == NOW + 60


async def test_wake_by_app_wakes_only_that_apps_deliveries(store: RedisStore) -> None:
    """An app's circuit closing: ``wake(apps=[A])`` brings forward A's waiting heads only, of every reason."""
    await store.enqueue([item("a1", app="A"), item("a2", app="A"), item("b1", app="B")], NOW, 600)
    a1, a2, b1 = await store.claim(10, NOW, LEASE)
    await store.retry(a1, NOW + 60, WaitReason.CIRCUIT_OPEN, count_attempt=False)
    await store.retry(a2, NOW + 60, WaitReason.RETRY, "503")
    await store.retry(b1, NOW + 60, WaitReason.CIRCUIT_OPEN, count_attempt=False)
    assert await store.wake(NOW, apps=["A"]) == 2
    assert sorted(j.token for j in await store.claim(10, NOW, LEASE)) == ["a1", "a2"]


async def test_wake_works_through_a_large_backlog_in_steps(store: RedisStore) -> None:
    """More waiting heads than one atomic step (1000) are all woken by one call."""
    await store.enqueue([item(f"t{n}") for n in range(1500)], NOW, 600)
    jobs = await store.claim(2000, NOW, LEASE)
    for job in jobs:
        await store.retry(job, NOW + 600, WaitReason.UNROUTABLE, count_attempt=False)
    assert await store.wake(NOW, reasons=[WaitReason.UNROUTABLE]) == 1500
    assert len(await store.claim(2000, NOW, LEASE)) == 1500


# -- tracing and retention ---------------------------------------------------------------------------


async def test_deliveries_are_found_by_token_request_and_message_newest_first(store: RedisStore) -> None:
    """Request id and message id are stored with the delivery and indexed; records show state, attempts,
    the typed wait reason and the provider's words."""
    await store.enqueue([item("t1", request_id="req-1", message_id="m-1"),
                         item("t2", request_id="req-1", message_id="m-1", app="ios")], NOW, 600)
    await store.enqueue([item("t1", request_id="req-2", message_id="m-2")], NOW + 1, 600)
    first, second = await store.claim(10, NOW + 1, LEASE)
    assert (first.request_id, first.message_id, second.app) == ("req-1", "m-1", "ios")
    await store.retry(first, NOW + 60, WaitReason.RETRY, "503 ServiceUnavailable")
    await store.finish(second, EndState.SENT, "", NOW + 2)
    by_token = await store.deliveries(token="t1")
    assert [(r.request_id, r.state) for r in by_token] == [("req-2", "pending"), ("req-1", "pending")]
    retried = by_token[1]
    assert (retried.attempts, retried.wait_reason, retried.reason, retried.next_at) == (
        1, WaitReason.RETRY, "503 ServiceUnavailable", NOW + 60)
    assert [r.token for r in await store.deliveries(request_id="req-1")] == ["t2", "t1"]
    (sent,) = await store.deliveries(message_id="m-1", token="t2")
    assert (sent.state, sent.finished_at, sent.app, sent.wait_reason, sent.next_at) == (
        "sent", NOW + 2, "ios", None, None)
    assert [r.token for r in await store.deliveries(limit=2)] == ["t1", "t2"]
    assert await store.deliveries(request_id="nope") == []


async def test_a_finished_delivery_drops_its_payload_and_expires_after_keep_finished(
    store: RedisStore, raw: redis.Redis, settings: StoreSettings
) -> None:
    """Default keep_finished (3600 s): a sent delivery keeps no payload and its record expires in an hour;
    a dead letter keeps its payload and does not expire, and ``dead_letter(id)`` shows it."""
    await store.enqueue([item("a", request_id="r"), item("b", request_id="r")], NOW, 600)
    sent, dead = await store.claim(10, NOW, LEASE)
    await store.finish(sent, EndState.SENT, "", NOW)
    await store.finish(dead, EndState.DEAD_LETTER, "400 BadTopic", NOW)
    prefix = settings.prefix
    assert raw.hget(f"{prefix}:d:{sent.id}", "data") is None
    assert 3590 <= raw.ttl(f"{prefix}:d:{sent.id}") <= 3600
    assert raw.ttl(f"{prefix}:d:{dead.id}") == -1
    assert raw.ttl(f"{prefix}:r:r") >= 3590
    letter = await store.dead_letter(dead.id)
    assert letter is not None and (letter.data, letter.reason) == (dead.data, "400 BadTopic")
    assert await store.dead_letter(sent.id) is None
    assert await store.dead_letter("not-an-id") is None


async def test_a_dedupe_key_expires_with_its_window_and_prune_changes_no_delivery(
    store: RedisStore, raw: redis.Redis, settings: StoreSettings
) -> None:
    """A dedupe key lives exactly its window (no prune needed to bound them); prune, with work in flight and
    waiting, leaves every key of the store as it was."""
    assert await store.enqueue([dataclasses.replace(item("a"), dedupe_key="k1"), item("b")], NOW, 600) == [True, True]
    assert 590_000 <= raw.pttl(f"{settings.prefix}:dd:k1") <= 600_000
    a, b = await store.claim(10, NOW, LEASE)
    await store.retry(b, NOW + 60, WaitReason.RETRY, "503")
    before = snapshot(raw, settings.prefix)
    assert (await store.prune(time.time())).removed == 0
    assert snapshot(raw, settings.prefix) == before
    await store.finish(a, EndState.SENT, "", NOW)
    assert (await store.stats()).balanced


async def test_a_finished_record_disappears_from_tracing_once_it_expired(make_store: MakeStore) -> None:
    """Past keep_finished the record is gone, and ``deliveries`` skips what its index still names."""
    store = await make_store(keep_finished=1.0)
    await store.enqueue([item("a", message_id="m")], NOW, 600)
    (job,) = await store.claim(10, NOW, LEASE)
    await store.finish(job, EndState.SENT, "", NOW)
    assert [r.state for r in await store.deliveries(message_id="m")] == ["sent"]
    await asyncio.sleep(1.2)
    assert await store.deliveries(message_id="m") == []
    assert await store.deliveries(token="a") == []
    assert (await store.stats()).ended[EndState.SENT] == 1


async def test_a_tokens_index_keeps_its_newest_hundred_and_every_open_delivery(store: RedisStore) -> None:
    """The per-token index is capped: of a token's finished deliveries the newest 100 are traceable, newest
    first; its open deliveries are always found (they are read from the token's queue as well)."""
    await store.enqueue([item("t", n=n) for n in range(130)], NOW, 600)
    assert len(await store.deliveries(token="t", limit=500)) == 130
    for _ in range(130):
        (job,) = await store.claim(10, NOW, LEASE)
        await store.finish(job, EndState.SENT, "", NOW)
    found = await store.deliveries(token="t", limit=500)
    assert [int(r.id) for r in found] == list(range(130, 30, -1))


# -- the one-stream layout of earlier versions ---------------------------------------------------------


def _legacy(client: redis.Redis, prefix: str) -> None:
    """Data as the one-stream version left it: a due head in P:stream held by a consumer that died, a retry
    and two parked heads (free-text reasons), a token's second delivery behind its head."""
    client.xgroup_create(f"{prefix}:stream", "relay", id="0", mkstream=True)

    def delivery(seq: int, token: str, state: str, **extra: Any) -> None:
        client.hset(f"{prefix}:d:{seq}", mapping={
            "delivery_id": f"id-{seq}", "token": token, "kind": "message", "data": f'{{"n":{seq}}}',
            "received_at": NOW, "expires_at": NOW + 86400, "next_at": NOW, "attempts": 0, "state": state,
            "entry": "", **extra})
        client.zadd(f"{prefix}:pending" if state == "pending" else f"{prefix}:inflight", {str(seq): NOW})
        client.rpush(f"{prefix}:q:{token}", seq)

    delivery(1, "held", "inflight")
    entry = client.xadd(f"{prefix}:stream", {"seq": "1"})
    client.hset(f"{prefix}:d:1", "entry", entry)
    client.xreadgroup("relay", "old-host-1-abcdef", {f"{prefix}:stream": ">"})
    delivery(2, "held", "pending")
    delivery(3, "backoff", "pending", next_at=NOW + 30, reason="503 ServiceUnavailable", attempts=1)
    client.zadd(f"{prefix}:retry", {"3": NOW + 30})
    delivery(4, "nodevice", "pending", next_at=NOW + 600, reason="unroutable")
    delivery(5, "badcreds", "pending", next_at=NOW + 60, reason="config_error")
    client.zadd(f"{prefix}:parked", {"4": NOW + 600, "5": NOW + 60})
    client.zadd(f"{prefix}:pending", {"3": NOW + 30, "4": NOW + 600, "5": NOW + 60})
    client.hset(f"{prefix}:counters", mapping={"accepted": 5})


async def test_data_of_the_one_stream_layout_is_migrated_by_recover(
    make_store: MakeStore, raw: redis.Redis, settings: StoreSettings
) -> None:
    """A delivering process's recover() moves the old schedules to the typed ones (free text kept as the
    detail) and takes back what a consumer of the old version held; nothing is lost or reordered."""
    _legacy(raw, settings.prefix)
    store = await make_store(claim_idle=IDLE)
    await asyncio.sleep(IDLE + 0.1)
    assert await store.recover(NOW) == 1
    prefix = settings.prefix
    assert not raw.exists(f"{prefix}:retry") and not raw.exists(f"{prefix}:parked")
    assert [raw.zcard(f"{prefix}:wait:{r}") for r in ("retry", "unroutable", "config_error")] == [1, 1, 1]
    (held,) = await store.claim(10, NOW, LEASE)
    assert (held.id, held.token) == ("1", "held")
    assert await store.wake(NOW, reasons={WaitReason.CONFIG_ERROR}) == 1
    (creds,) = await store.claim(10, NOW, LEASE)
    assert creds.token == "badcreds"
    (backoff,) = await store.claim(10, NOW + 30, LEASE)
    assert (backoff.token, backoff.attempts) == ("backoff", 1)
    (record,) = await store.deliveries(token="nodevice")
    assert (record.wait_reason, record.reason) == (WaitReason.UNROUTABLE, "unroutable")
    await store.finish(held, EndState.SENT, "", NOW)
    (second,) = await store.claim(10, NOW, LEASE)
    assert second.id == "2"
    stats = await store.stats()
    assert (stats.accepted, stats.pending, stats.inflight, stats.redelivered) == (5, 1, 3, 1) and stats.balanced
