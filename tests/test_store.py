"""The Store protocol's behaviour: one suite, run against SQLite (in tmp_path) and Redis (at REDIS_URL).

Redis tests use ``REDIS_URL`` (default ``redis://127.0.0.1:6379/15``, a dedicated database index) and are
skipped, with the reason, only when no Redis answers there. Each test starts on an empty keyspace of its own
(a fresh key prefix, deleted afterwards) rather than a FLUSHDB: flushing the shared test database wiped the
keys of other test runs in progress (the multi-instance test, ``test_api``) and made them fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis

from relay.config import StoreSettings
from relay.errors import StoreError, StoreUnavailable
from relay.outcome import EndState
from relay.registry.device import Device
from relay.store import NewDelivery, Store, create_store
from relay.testing.fleet import RedisServer
from tests.conftest import REDIS_URL, redis_unavailable

NOW = 1_000_000.0
IDLE = 0.5  # claim_idle for these tests: a dead consumer's work is reclaimed after half a second
LEASE = 300.0

_KEYS = itertools.count()

MakeStore = Callable[..., Awaitable[Store]]




@pytest.fixture(params=["sqlite", "redis"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSettings]:
    """Settings of a fresh, empty store of each backend."""
    if request.param == "sqlite":
        yield StoreSettings(backend="sqlite", path=tmp_path / "relay.db")
        return
    reason = redis_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"test-store-{uuid.uuid4().hex[:12]}"
    yield StoreSettings(backend="redis", url=REDIS_URL, claim_idle=IDLE, prefix=prefix)
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def make_store(settings: StoreSettings) -> AsyncIterator[MakeStore]:
    """Open another store on the same backend and data (another relay instance, or a restart)."""
    opened: list[Store] = []

    async def make(**changes: object) -> Store:
        store = create_store(dataclasses.replace(settings, **changes))  # type: ignore[arg-type]
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> Store:
    return await make_store()


def item(token: str, key: str | None = None, kind: str = "message", data: bytes = b"{}") -> NewDelivery:
    return NewDelivery(token, kind, data, key or f"{token}:{next(_KEYS)}", NOW + 86400)


async def enqueue(store: Store, *tokens: str, at: float = NOW) -> None:
    for n, token in enumerate(tokens):
        assert await store.enqueue([item(token, data=f'{{"n":{n}}}'.encode())], at, 600) == [True]


# -- enqueue and dedupe ------------------------------------------------------------------------------


async def test_enqueue_accepts_every_item_and_counts_it(store: Store) -> None:
    """Each new item is accepted (True) and counted as accepted and pending."""
    assert await store.enqueue([item("a"), item("b"), item("c")], NOW, 600) == [True, True, True]
    stats = await store.stats()
    assert (stats.accepted, stats.pending, stats.inflight, stats.duplicates) == (3, 3, 0, 0)
    assert stats.balanced


async def test_duplicate_inside_the_window_is_refused_and_counted(store: Store) -> None:
    """A dedupe key seen within the window is refused (False), also within one batch, and counted."""
    assert await store.enqueue([item("a", "k1"), item("a", "k1")], NOW, 600) == [True, False]
    assert await store.enqueue([item("a", "k1")], NOW + 599, 600) == [False]
    stats = await store.stats()
    assert (stats.accepted, stats.duplicates, stats.pending) == (1, 2, 1)


async def test_duplicate_key_is_accepted_again_after_the_window(store: Store) -> None:
    """Once the window has passed, the same key is a new delivery."""
    assert await store.enqueue([item("a", "k1")], NOW, 600) == [True]
    assert await store.enqueue([item("a", "k1")], NOW + 601, 600) == [True]
    assert (await store.stats()).accepted == 2


async def test_zero_window_disables_dedupe(store: Store) -> None:
    """With a window of 0 nothing is refused as a duplicate."""
    assert await store.enqueue([item("a", "k1"), item("a", "k1")], NOW, 0) == [True, True]


# -- claim and per-device order ------------------------------------------------------------------


async def test_claim_returns_only_the_oldest_open_delivery_per_token(store: Store) -> None:
    """Of a token's deliveries only its oldest is claimable; other tokens proceed in parallel."""
    await enqueue(store, "a", "a", "b")
    jobs = await store.claim(10, NOW, LEASE)
    assert [(j.token, j.data) for j in jobs] == [("a", b'{"n":0}'), ("b", b'{"n":2}')]
    assert all(j.attempts == 0 and j.received_at == NOW and j.kind == "message" for j in jobs)
    stats = await store.stats()
    assert (stats.pending, stats.inflight) == (1, 2) and stats.balanced


async def test_claim_never_returns_a_delivery_behind_an_inflight_head(store: Store) -> None:
    """While a token's head is in flight, its next delivery waits; finishing the head releases it."""
    await enqueue(store, "a", "a", "a")
    first = await store.claim(10, NOW, LEASE)
    assert await store.claim(10, NOW, LEASE) == []
    await store.finish(first[0], EndState.SENT, "", NOW)
    second = await store.claim(10, NOW, LEASE)
    assert [j.data for j in second] == [b'{"n":1}']
    assert second[0].id != first[0].id and second[0].delivery_id != first[0].delivery_id


async def test_claim_honours_the_limit_in_arrival_order(store: Store) -> None:
    """``limit`` caps a claim; what is left is claimed next, oldest first."""
    await enqueue(store, "a", "b", "c", "d", "e")
    first = await store.claim(2, NOW, LEASE)
    rest = await store.claim(10, NOW, LEASE)
    assert [j.token for j in first] == ["a", "b"]
    assert [j.token for j in rest] == ["c", "d", "e"]
    assert [int(j.id) for j in first + rest] == sorted(int(j.id) for j in first + rest)


async def test_retry_keeps_per_device_order_and_counts_attempts(store: Store) -> None:
    """A retried head stays first for its token: nothing behind it is claimed until it is due and done."""
    await enqueue(store, "a", "a")
    (job,) = await store.claim(10, NOW, LEASE)
    await store.retry(job, NOW + 10, "503 ServiceUnavailable")
    assert await store.claim(10, NOW + 5, LEASE) == []
    (again,) = await store.claim(10, NOW + 10, LEASE)
    assert (again.id, again.delivery_id, again.attempts) == (job.id, job.delivery_id, 1)
    await store.retry(again, NOW + 20, "config_error", count_attempt=False)
    (third,) = await store.claim(10, NOW + 20, LEASE)
    assert third.attempts == 1
    await store.finish(third, EndState.SENT, "", NOW + 20)
    (last,) = await store.claim(10, NOW + 20, LEASE)
    assert last.data == b'{"n":1}'


async def test_finish_records_the_end_state_once(store: Store) -> None:
    """Each end state is counted; finishing a delivery twice changes nothing."""
    await enqueue(store, "a", "b", "c", "d", "e")
    jobs = await store.claim(10, NOW, LEASE)
    for job, end in zip(jobs, EndState, strict=True):
        await store.finish(job, end, f"because {end}", NOW + 1)
    await store.finish(jobs[0], EndState.SENT, "", NOW + 2)
    stats = await store.stats()
    assert stats.ended == {end: 1 for end in EndState}
    assert (stats.pending, stats.inflight, stats.accepted) == (0, 0, 5) and stats.balanced
    assert await store.claim(10, NOW + 2, LEASE) == []


async def test_next_due_reports_the_earliest_pending_delivery(store: Store) -> None:
    """None with nothing pending; otherwise the earliest due time, including scheduled retries."""
    assert await store.next_due() is None
    await enqueue(store, "a")
    assert await store.next_due() == NOW
    (job,) = await store.claim(10, NOW, LEASE)
    assert await store.next_due() is None
    await store.retry(job, NOW + 30, "429")
    assert await store.next_due() == NOW + 30
    (job,) = await store.claim(10, NOW + 30, LEASE)
    await store.finish(job, EndState.SENT, "", NOW + 30)
    assert await store.next_due() is None


# -- wake ---------------------------------------------------------------------------------------------


async def test_wake_tokens_makes_their_unroutable_deliveries_due(store: Store) -> None:
    """``wake(tokens)`` brings forward only those tokens' parked (unroutable/config_error) deliveries."""
    await enqueue(store, "a", "b", "c")
    a, b, c = await store.claim(10, NOW, LEASE)
    await store.retry(a, NOW + 600, "unroutable", count_attempt=False)
    await store.retry(b, NOW + 600, "unroutable", count_attempt=False)
    await store.retry(c, NOW + 600, "503", count_attempt=False)  # an ordinary backoff is not woken
    assert await store.wake(["zzz"], NOW) == 0
    assert await store.wake(["a", "c"], NOW) == 1
    assert [j.token for j in await store.claim(10, NOW, LEASE)] == ["a"]


async def test_wake_all_makes_every_parked_delivery_due(store: Store) -> None:
    """``wake(None)`` brings forward every unroutable and config_error delivery, and nothing else."""
    await enqueue(store, "a", "b", "c")
    a, b, c = await store.claim(10, NOW, LEASE)
    await store.retry(a, NOW + 600, "unroutable", count_attempt=False)
    await store.retry(b, NOW + 60, "config_error", count_attempt=False)
    await store.retry(c, NOW + 60, "circuit_open", count_attempt=False)
    assert await store.wake(None, NOW) == 2
    assert await store.wake(None, NOW) == 0
    assert await store.next_due() == NOW
    assert sorted(j.token for j in await store.claim(10, NOW, LEASE)) == ["a", "b"]


# -- devices and dead tokens ---------------------------------------------------------------------------


async def test_devices_are_put_replaced_listed_and_removed(store: Store) -> None:
    """The run-time overlay: put adds or replaces, list is sorted by token, remove says if there was one."""
    await store.put_device(Device("t2", "android", "t2"), NOW)
    await store.put_device(Device("t1", "ios", "dev1"), NOW)
    await store.put_device(Device("t1", "ios", "dev1-new"), NOW)
    assert await store.list_devices() == [Device("t1", "ios", "dev1-new"), Device("t2", "android", "t2")]
    assert await store.get_device("t1") == Device("t1", "ios", "dev1-new")
    assert await store.get_device("nope") is None
    assert await store.remove_device("t2") is True
    assert await store.remove_device("t2") is False
    assert (await store.stats()).devices == 1


async def test_mark_dead_reports_only_the_first_time_and_put_device_revives(store: Store) -> None:
    """A token is marked dead once (with the provider's reason); registering it again clears the mark."""
    assert await store.mark_dead("t1", "Unregistered", NOW) is True
    assert await store.mark_dead("t1", "BadDeviceToken", NOW) is False
    assert await store.dead_tokens() == {"t1": "Unregistered"}
    assert (await store.stats()).dead_tokens == 1
    await store.put_device(Device("t1", "ios", "t1"), NOW)
    assert await store.dead_tokens() == {}


# -- dead letters ----------------------------------------------------------------------------------


async def test_dead_letters_are_listed_and_retried_by_id(store: Store) -> None:
    """A dead letter keeps its payload and reason; retrying it by id queues it again with the same apns-id."""
    await enqueue(store, "a", "b")
    a, b = await store.claim(10, NOW, LEASE)
    await store.finish(a, EndState.DEAD_LETTER, "400 BadTopic", NOW + 1)
    await store.finish(b, EndState.SENT, "", NOW + 1)
    (letter,) = await store.dead_letters()
    assert (letter.id, letter.token, letter.data, letter.reason) == (a.id, "a", a.data, "400 BadTopic")
    assert (letter.received_at, letter.finished_at) == (NOW, NOW + 1)
    assert await store.retry_dead_letters(["999999"], NOW + 2) == 0
    with pytest.raises(StoreError):
        await store.retry_dead_letters(["not-an-id"], NOW + 2)
    assert await store.retry_dead_letters([letter.id], NOW + 2) == 1
    assert await store.dead_letters() == []
    stats = await store.stats()
    assert (stats.ended[EndState.DEAD_LETTER], stats.pending) == (0, 1) and stats.balanced
    (again,) = await store.claim(10, NOW + 2, LEASE)
    assert (again.delivery_id, again.data) == (a.delivery_id, a.data)
    assert again.expires_at >= NOW + 2 + 86400


async def test_retry_all_dead_letters(store: Store) -> None:
    """``retry_dead_letters(None)`` queues every dead letter again, oldest first."""
    await enqueue(store, "a", "b", "c")
    for job in await store.claim(10, NOW, LEASE):
        await store.finish(job, EndState.DEAD_LETTER, "400", NOW)
    assert [d.token for d in await store.dead_letters(2)] == ["a", "b"]
    assert await store.retry_dead_letters(None, NOW) == 3
    assert [j.token for j in await store.claim(10, NOW, LEASE)] == ["a", "b", "c"]
    assert (await store.stats()).balanced


# -- crashes, restarts, availability ----------------------------------------------------------------

_CRASHER = """
import asyncio, sys
from pathlib import Path
from relay.config import StoreSettings
from relay.store import create_store

async def main() -> None:
    store = create_store(StoreSettings(backend=sys.argv[1], path=Path(sys.argv[2]), url=sys.argv[3],
                                       claim_idle=float(sys.argv[4]), prefix=sys.argv[6]))
    await store.open()
    jobs = await store.claim(10, float(sys.argv[5]), 300)
    print(",".join(job.id for job in jobs), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_work_in_flight_at_a_crash_is_claimable_again(
    settings: StoreSettings, store: Store, make_store: MakeStore
) -> None:
    """A process killed with SIGKILL mid-delivery loses nothing: sqlite on reopen, redis after claim_idle."""
    await enqueue(store, "a", "a", "b")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CRASHER), settings.backend, str(settings.path), settings.url,
         str(IDLE), str(NOW), settings.prefix],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    claimed = (await asyncio.to_thread(proc.stdout.readline)).strip().split(",")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert len(claimed) == 2
    if settings.backend == "sqlite":
        await store.close()
        survivor = await make_store()  # a restart: open() makes the crashed process's work due again
    else:
        survivor = store
        assert await survivor.claim(10, NOW, LEASE) == []  # still within claim_idle: nothing, not even "a" #2
        due = await survivor.next_due()
        assert due is not None
        await asyncio.sleep(IDLE + 0.2)
    jobs = await survivor.claim(10, NOW, LEASE)
    assert sorted(j.id for j in jobs) == sorted(claimed)
    for job in jobs:
        await survivor.finish(job, EndState.SENT, "", NOW)
    (last,) = await survivor.claim(10, NOW, LEASE)
    assert last.data == b'{"n":1}'
    await survivor.finish(last, EndState.SENT, "", NOW)
    stats = await survivor.stats()
    assert (stats.accepted, stats.ended[EndState.SENT], stats.pending, stats.inflight) == (3, 3, 0, 0)


async def test_a_clean_close_leaves_claimed_work_claimable(store: Store, make_store: MakeStore) -> None:
    """Deliveries claimed but not recorded when a store closes are claimable by the next one at once."""
    await enqueue(store, "a")
    assert len(await store.claim(10, NOW, LEASE)) == 1
    await store.close()
    other = await make_store()
    (job,) = await other.claim(10, NOW, LEASE)
    assert job.token == "a"
    assert (await other.stats()).balanced


async def test_ping_succeeds_on_a_working_store(store: Store) -> None:
    """``ping`` returns quietly when the backend works."""
    await store.ping()


async def test_unreachable_backend_raises_store_unavailable(settings: StoreSettings, tmp_path: Path) -> None:
    """A backend that cannot be reached is reported as StoreUnavailable (webhooks answer 503), not a crash."""
    (tmp_path / "not-a-dir").write_text("")
    broken = StoreSettings(backend=settings.backend, path=tmp_path / "not-a-dir" / "relay.db",
                           url="redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailable):
        await create_store(broken).open()


# -- Redis only: what several instances add --------------------------------------------------------


# Several instances sharing one store is the Redis backend's job: these run on Redis only.
redis_only = pytest.mark.parametrize("settings", ["redis"], indirect=True)


@redis_only
async def test_concurrent_instances_never_hold_two_deliveries_of_one_token(make_store: MakeStore) -> None:
    """Three consumers claiming at once get each delivery once, and never two of one token at a time."""
    stores = [await make_store() for _ in range(3)]
    tokens = [f"t{n % 7}" for n in range(70)]
    for token in tokens:
        assert await stores[0].enqueue([item(token)], NOW, 600) == [True]
    seen: list[str] = []
    holding: set[str] = set()

    async def work(store: Store) -> None:
        while True:
            jobs = await store.claim(5, NOW, LEASE)
            if not jobs:
                if (await store.stats()).pending == 0:
                    return
                await asyncio.sleep(0.001)
                continue
            for job in jobs:
                assert job.token not in holding
                holding.add(job.token)
            await asyncio.sleep(0)
            for job in jobs:
                holding.discard(job.token)
                seen.append(job.id)
                await store.finish(job, EndState.SENT, "", NOW)

    await asyncio.gather(*(work(s) for s in stores))
    assert sorted(seen, key=int) == [str(n) for n in range(1, 71)]
    assert (await stores[0].stats()).ended[EndState.SENT] == 70


@redis_only
async def test_a_live_instance_keeps_its_work_past_claim_idle(store: Store, make_store: MakeStore) -> None:
    """The heartbeat renews a live instance's claims, so no other instance takes them over."""
    await enqueue(store, "a")
    (job,) = await store.claim(10, NOW, LEASE)
    other = await make_store()
    await asyncio.sleep(IDLE * 2.5)
    assert await other.claim(10, NOW, LEASE) == []
    await store.finish(job, EndState.SENT, "", NOW)
    assert (await other.stats()).ended[EndState.SENT] == 1


@redis_only
async def test_a_stalled_instance_cannot_record_work_another_took_over(make_store: MakeStore) -> None:
    """Fencing: once another instance reclaimed a delivery, the stalled one's late finish is ignored."""
    stalled = await make_store(claim_idle=30.0)  # its heartbeat will not run during this test
    await enqueue(stalled, "a", "a")
    (job,) = await stalled.claim(10, NOW, LEASE)
    taker = await make_store(claim_idle=0.05)
    await asyncio.sleep(0.1)
    (taken,) = await taker.claim(10, NOW, LEASE)
    assert taken.id == job.id
    await stalled.retry(job, NOW + 99, "late")
    await stalled.finish(job, EndState.DEAD_LETTER, "late", NOW)
    await taker.finish(taken, EndState.SENT, "", NOW)
    stats = await taker.stats()
    assert (stats.ended[EndState.SENT], stats.ended[EndState.DEAD_LETTER], stats.pending) == (1, 0, 1)
    assert stats.balanced


@redis_only
async def test_a_claim_past_its_lease_is_no_longer_renewed(store: Store, make_store: MakeStore) -> None:
    """A delivery its claimer never records (a bug) is renewed only for the lease, then another instance takes it."""
    await enqueue(store, "a")
    (job,) = await store.claim(10, NOW, lease=0.1)
    other = await make_store()
    await asyncio.sleep(0.1 + IDLE * 1.5)
    (taken,) = await other.claim(10, NOW, LEASE)
    assert taken.id == job.id


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
async def test_redis_outage_raises_store_unavailable_and_recovers_with_the_data(tmp_path: Path) -> None:
    """Redis killed: every call raises StoreUnavailable (no hang, no other error); restarted with AOF
    ``always``: the same store object works again and nothing it acknowledged is gone."""
    server = RedisServer(tmp_path / "redis").start()
    store = create_store(StoreSettings(backend="redis", url=server.url, claim_idle=IDLE))
    await store.open()
    try:
        await enqueue(store, "a", "b")
        server.kill()
        for call in (store.ping(), store.enqueue([item("c")], NOW, 600), store.claim(10, NOW, LEASE),
                     store.next_due(), store.stats()):
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(call, 10)
        server.start()
        await store.ping()
        assert [j.token for j in await store.claim(10, NOW, LEASE)] == ["a", "b"]
        assert (await store.stats()).accepted == 2
    finally:
        await store.close()
        server.kill()
