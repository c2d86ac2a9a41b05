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
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from relay.config import StoreSettings
from relay.errors import StoreError, StoreUnavailable
from relay.outcome import EndState, WaitReason
from relay.registry.device import Device
from relay.registry.scope import Removal
from relay.store import NewDelivery, Store, create_store
from relay.store.base import DeliveryRecord
from relay.store.sqlite import SqliteStore
from relay.testing.fleet import RedisServer
from tests.conftest import REDIS_URL, redis_keyspace

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
    with redis_keyspace("store") as prefix:
        yield StoreSettings(backend="redis", url=REDIS_URL, claim_idle=IDLE, prefix=prefix)


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


def item(token: str, key: str | None = None, kind: str = "message", data: bytes = b"{}", *,
         app: str | None = None, request_id: str = "", message_id: str | None = None) -> NewDelivery:
    return NewDelivery(token, kind, data, key or f"{token}:{next(_KEYS)}", NOW + 86400, app=app,
                       request_id=request_id, message_id=message_id)


async def prune_all(store: Store, now: float) -> int:
    """Prune slice after slice, as the delivering process's upkeep does; what was removed in all."""
    removed = 0
    while True:
        pruned = await store.prune(now)
        removed += pruned.removed
        if not pruned.more:
            return removed


async def enqueue(store: Store, *tokens: str, at: float = NOW, app: str | None = None) -> None:
    for n, token in enumerate(tokens):
        assert await store.enqueue([item(token, data=f'{{"n":{n}}}'.encode(), app=app)], at, 600) == [True]


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
    await store.retry(job, NOW + 10, WaitReason.RETRY, "503 ServiceUnavailable")
    assert await store.claim(10, NOW + 5, LEASE) == []
    (again,) = await store.claim(10, NOW + 10, LEASE)
    assert (again.id, again.delivery_id, again.attempts) == (job.id, job.delivery_id, 1)
    await store.retry(again, NOW + 20, WaitReason.CONFIG_ERROR, "403 InvalidProviderToken", count_attempt=False)
    (third,) = await store.claim(10, NOW + 20, LEASE)
    assert third.attempts == 1
    await store.finish(third, EndState.SENT, "", NOW + 20)
    (last,) = await store.claim(10, NOW + 20, LEASE)
    assert last.data == b'{"n":1}'


async def test_finish_records_the_end_state_once(store: Store) -> None:
    """Each end state is counted; finishing a delivery twice changes nothing."""
    await enqueue(store, *(f"t{n}" for n in range(len(EndState))))
    jobs = await store.claim(10, NOW, LEASE)
    for job, end in zip(jobs, EndState, strict=True):
        await store.finish(job, end, f"because {end}", NOW + 1)
    await store.finish(jobs[0], EndState.SENT, "", NOW + 2)
    stats = await store.stats()
    assert stats.ended == {end: 1 for end in EndState}
    assert (stats.pending, stats.inflight, stats.accepted) == (0, 0, len(EndState)) and stats.balanced
    assert await store.claim(10, NOW + 2, LEASE) == []


async def test_the_summary_for_status_lines_and_metrics_agrees_with_the_counted_stats(store: Store) -> None:
    """``summary`` (status lines and metrics, which run every few seconds) does not count the open deliveries
    (SQLite reads every open row for that): it gives the same figures as ``stats`` through duplicates, claims,
    retries, every end state, lease takeovers and dead letters queued again."""

    async def agree() -> None:
        counted, summary = await store.stats(), await store.summary()
        assert summary == counted and counted.balanced

    await enqueue(store, *(f"t{n}" for n in range(len(EndState))), "t0", "x")
    assert await store.enqueue([item("x", key="dup")], NOW, 600) == [True]
    assert await store.enqueue([item("x", key="dup")], NOW, 600) == [False]
    await agree()
    jobs = await store.claim(20, NOW, LEASE)
    await agree()
    await store.retry(jobs[-1], NOW + 5, WaitReason.RETRY, "503")
    for job, end in zip(jobs, EndState, strict=False):
        await store.finish(job, end, "", NOW + 1)
    await agree()
    assert len(await store.claim(20, NOW + 1, LEASE)) == 1  # t0's second (x's first waits for its retry)
    assert len(await store.claim(20, NOW + 2 * LEASE, LEASE)) == 2  # t0's second taken over, and x's first
    await agree()
    assert await store.retry_dead_letters(None, NOW + 2 * LEASE) == 1
    await agree()


async def test_next_due_reports_the_earliest_pending_delivery(store: Store) -> None:
    """None with nothing pending; otherwise the earliest due time, including scheduled retries."""
    assert await store.next_due() is None
    await enqueue(store, "a")
    assert await store.next_due() == NOW
    (job,) = await store.claim(10, NOW, LEASE)
    assert await store.next_due() is None
    await store.retry(job, NOW + 30, WaitReason.RETRY, "429")
    assert await store.next_due() == NOW + 30
    (job,) = await store.claim(10, NOW + 30, LEASE)
    await store.finish(job, EndState.SENT, "", NOW + 30)
    assert await store.next_due() is None


async def test_oldest_waiting_is_each_apps_oldest_open_delivery_whether_due_parked_or_claimed(store: Store) -> None:
    """Per app: the arrival of its oldest pending or in-flight delivery (due, parked or claimed alike);
    an app with nothing open, and finished deliveries, do not count."""
    assert await store.oldest_waiting(["ios", "android"]) == {}
    await enqueue(store, "a", at=NOW, app="ios")
    await enqueue(store, "b", at=NOW + 5, app="ios")
    await enqueue(store, "c", at=NOW + 7, app="android")
    assert await store.oldest_waiting(["ios", "android", "web"]) == {"ios": NOW, "android": NOW + 7}
    jobs = {job.token: job for job in await store.claim(10, NOW + 10, LEASE)}
    assert await store.oldest_waiting(["ios"]) == {"ios": NOW}  # claimed: still waiting to leave
    await store.retry(jobs["a"], NOW + 600, WaitReason.CIRCUIT_OPEN, "circuit open", app="ios",
                      count_attempt=False)
    assert await store.oldest_waiting(["ios"]) == {"ios": NOW}  # parked behind an open circuit
    await store.finish(jobs["c"], EndState.SENT, "", NOW + 10)
    await store.retry(jobs["b"], NOW + 900, WaitReason.RETRY, "429", app="ios")
    (job,) = await store.claim(10, NOW + 600, LEASE)  # "a" leaves; "b" waits for its retry
    await store.finish(job, EndState.SENT, "", NOW + 600)
    assert await store.oldest_waiting(["ios", "android"]) == {"ios": NOW + 5}


# -- wake: typed wait reasons -----------------------------------------------------------------------


async def park(store: Store, *waits: tuple[str, WaitReason, str], app: str | None = None) -> None:
    """Enqueue one delivery per (token, reason, detail), claim them, and put each back for 600 s."""
    await enqueue(store, *(token for token, _, _ in waits))
    jobs = {job.token: job for job in await store.claim(100, NOW, LEASE)}
    for token, reason, detail in waits:
        await store.retry(jobs[token], NOW + 600, reason, detail, app=app, count_attempt=False)


async def test_wake_by_reason_releases_a_config_error_whatever_the_provider_said(store: Store) -> None:
    """A reload wakes config errors, open circuits and unroutable deliveries by their typed reason, whatever
    the provider's words were; an ordinary backoff keeps its time."""
    await park(store, ("a", WaitReason.CONFIG_ERROR, "403 InvalidProviderToken"),
               ("b", WaitReason.UNROUTABLE, ""), ("c", WaitReason.RETRY, "503 ServiceUnavailable"),
               ("d", WaitReason.CIRCUIT_OPEN, "breaker open after 5 failures"))
    reload = {WaitReason.CONFIG_ERROR, WaitReason.CIRCUIT_OPEN, WaitReason.UNROUTABLE}
    assert await store.wake(NOW + 1, reasons=reload) == 3
    assert await store.wake(NOW + 1, reasons=reload) == 0  # already due: nothing more to wake
    assert await store.next_due() == NOW + 1
    woken = await store.claim(10, NOW + 1, LEASE)
    assert sorted(j.token for j in woken) == ["a", "b", "d"]
    for job in woken:
        await store.finish(job, EndState.SENT, "", NOW + 1)
    assert await store.claim(10, NOW + 599, LEASE) == []
    assert [j.token for j in await store.claim(10, NOW + 600, LEASE)] == ["c"]


async def test_wake_by_tokens_releases_only_those_tokens_unroutable_deliveries(store: Store) -> None:
    """A device added wakes its token's unroutable delivery, not another token's, nor its config errors."""
    await park(store, ("a", WaitReason.UNROUTABLE, ""), ("b", WaitReason.UNROUTABLE, ""),
               ("c", WaitReason.CONFIG_ERROR, "403 InvalidProviderToken"))
    assert await store.wake(NOW, reasons={WaitReason.UNROUTABLE}, tokens=["zzz"]) == 0
    assert await store.wake(NOW, reasons={WaitReason.UNROUTABLE}, tokens=["a", "c"]) == 1
    assert [j.token for j in await store.claim(10, NOW, LEASE)] == ["a"]


async def test_wake_by_apps_releases_only_that_apps_deliveries(store: Store) -> None:
    """An app's circuit closing wakes that app's deliveries (by the app given at retry), not another app's."""
    await enqueue(store, "a", "b")
    a, b = await store.claim(10, NOW, LEASE)
    await store.retry(a, NOW + 600, WaitReason.CIRCUIT_OPEN, "", app="ios", count_attempt=False)
    await store.retry(b, NOW + 600, WaitReason.CIRCUIT_OPEN, "", app="android", count_attempt=False)
    assert await store.wake(NOW, apps=["web"]) == 0
    assert await store.wake(NOW, reasons={WaitReason.CIRCUIT_OPEN}, apps=["ios"]) == 1
    (job,) = await store.claim(10, NOW, LEASE)
    assert (job.token, job.app) == ("a", "ios")


async def test_wake_without_filters_releases_every_waiting_delivery(store: Store) -> None:
    """With no filter every waiting delivery is due now, whatever its reason."""
    await park(store, ("a", WaitReason.UNROUTABLE, ""), ("b", WaitReason.RETRY, "429"),
               ("c", WaitReason.CIRCUIT_OPEN, ""))
    assert await store.wake(NOW) == 3
    assert sorted(j.token for j in await store.claim(10, NOW, LEASE)) == ["a", "b", "c"]


async def test_wait_reason_and_provider_words_are_kept_apart(store: Store) -> None:
    """``deliveries`` shows the typed wait reason and, separately, the provider's own words."""
    await park(store, ("a", WaitReason.CONFIG_ERROR, "403 InvalidProviderToken"))
    (record,) = await store.deliveries(token="a")
    assert (record.state, record.wait_reason, record.reason) == ("pending", WaitReason.CONFIG_ERROR,
                                                                 "403 InvalidProviderToken")
    assert (record.next_at, record.attempts, record.finished_at) == (NOW + 600, 0, None)


# -- app hints and per-app claim limits --------------------------------------------------------------


async def test_app_hint_and_tracing_ids_travel_with_the_delivery(store: Store) -> None:
    """The app hint, request id and message id given at acceptance come back on the claimed job;
    a retry with another app updates the hint."""
    assert await store.enqueue([item("a", app="ios", request_id="req-1", message_id="m-1")], NOW, 600) == [True]
    (job,) = await store.claim(10, NOW, LEASE)
    assert (job.app, job.request_id, job.message_id) == ("ios", "req-1", "m-1")
    await store.retry(job, NOW, WaitReason.RETRY, "503", app="ios-sandbox")
    (again,) = await store.claim(10, NOW, LEASE)
    assert (again.app, again.request_id, again.message_id, again.attempts) == ("ios-sandbox", "req-1", "m-1", 1)


async def test_app_limits_cap_each_named_app_and_zero_skips_it(store: Store) -> None:
    """``app_limits`` takes at most N heads of a named app (oldest first) and none of an app at 0;
    unnamed apps and deliveries without a hint share the claim's limit."""
    await enqueue(store, "a1", "a2", "a3", "a4", app="A")
    await enqueue(store, "b1", "b2", app="B")
    await enqueue(store, "c1", app="C")
    await enqueue(store, "n1")
    jobs = await store.claim(10, NOW, LEASE, app_limits={"A": 2, "B": 0})
    assert [j.token for j in jobs] == ["a1", "a2", "c1", "n1"]
    assert [j.token for j in await store.claim(10, NOW, LEASE, app_limits={"A": 1, "B": 0})] == ["a3"]
    assert [j.token for j in await store.claim(10, NOW, LEASE)] == ["a4", "b1", "b2"]


async def test_a_backlog_of_one_app_does_not_hide_another_apps_head(store: Store) -> None:
    """400 due heads of app A (limit 0, then 3) never keep app B's single, newer head out of a claim."""
    items = [item(f"a{n:03}", app="A") for n in range(400)]
    assert await store.enqueue(items, NOW, 600) == [True] * 400
    await enqueue(store, "b", app="B")
    assert [j.token for j in await store.claim(5, NOW, LEASE, app_limits={"A": 0})] == ["b"]
    await enqueue(store, "b2", app="B")
    jobs = await store.claim(5, NOW, LEASE, app_limits={"A": 3})
    assert [j.token for j in jobs] == ["a000", "a001", "a002", "b2"]


async def test_a_claim_shares_its_limit_across_apps_when_an_older_backlog_has_free_slots(store: Store) -> None:
    """App A's 400 heads, due a minute before app B's one, and slots to spare for both (caps above the claim's
    limit): a claim of 5 takes B's head beside A's four earliest, not five of A's. Earliest-due-first across
    apps made B's push wait for A's whole backlog once an app's slots outnumbered a claim (SPEC §6)."""
    items = [item(f"a{n:03}", app="A") for n in range(400)]
    assert await store.enqueue(items, NOW - 60, 600) == [True] * 400
    await enqueue(store, "b", app="B")
    jobs = await store.claim(5, NOW, LEASE, app_limits={"A": 1000, "B": 1000})
    assert sorted(j.token for j in jobs) == ["a000", "a001", "a002", "a003", "b"]


async def test_app_limits_keep_each_tokens_head_first(store: Store) -> None:
    """A token whose head belongs to a skipped app is not claimed at all: its newer delivery of
    another app stays behind its head (per-device order)."""
    assert await store.enqueue([item("t", app="A"), item("t", app="B")], NOW, 600) == [True, True]
    assert await store.claim(10, NOW, LEASE, app_limits={"A": 0}) == []
    (head,) = await store.claim(10, NOW, LEASE, app_limits={"B": 0})
    assert head.app == "A"
    assert await store.claim(10, NOW, LEASE) == []


# -- tracing: deliveries and one dead letter ---------------------------------------------------------


async def test_deliveries_are_found_by_token_request_and_message_newest_first(store: Store) -> None:
    """``deliveries`` filters by token, request id and message id (all given must match), newest first,
    with state, attempts, last reason and times; ``limit`` caps the answer."""
    assert await store.enqueue([item("a", request_id="r1", message_id="m1", app="ios"),
                                item("b", request_id="r1", message_id="m1")], NOW, 600) == [True, True]
    assert await store.enqueue([item("a", request_id="r2", message_id="m2")], NOW + 1, 600) == [True]
    first, _b = await store.claim(10, NOW + 2, LEASE)
    await store.finish(first, EndState.SENT, "", NOW + 3)
    records = await store.deliveries(token="a")
    assert [(r.request_id, r.message_id, r.state) for r in records] == [("r2", "m2", "pending"),
                                                                        ("r1", "m1", EndState.SENT.value)]
    sent = records[1]
    assert isinstance(sent, DeliveryRecord)
    assert (sent.id, sent.delivery_id, sent.token, sent.kind, sent.app) == (first.id, first.delivery_id, "a",
                                                                          "message", "ios")
    assert (sent.attempts, sent.received_at, sent.finished_at, sent.next_at) == (1, NOW, NOW + 3, None)
    assert [r.token for r in await store.deliveries(request_id="r1")] == ["b", "a"]
    assert [r.state for r in await store.deliveries(request_id="r1", token="b")] == ["inflight"]
    assert [r.request_id for r in await store.deliveries(message_id="m2")] == ["r2"]
    assert len(await store.deliveries(token="a", limit=1)) == 1
    assert await store.deliveries(token="nobody") == []


async def test_dead_letter_returns_one_with_its_payload(store: Store) -> None:
    """``dead_letter(id)`` gives the payload and reason of a dead letter; None for any other delivery."""
    await enqueue(store, "a", "b")
    a, b = await store.claim(10, NOW, LEASE)
    await store.finish(a, EndState.DEAD_LETTER, "400 BadTopic", NOW + 1)
    await store.finish(b, EndState.SENT, "", NOW + 1)
    letter = await store.dead_letter(a.id)
    assert letter is not None
    assert (letter.id, letter.token, letter.data, letter.reason, letter.finished_at) == (
        a.id, "a", b'{"n":0}', "400 BadTopic", NOW + 1)
    assert await store.dead_letter(b.id) is None
    assert await store.dead_letter("999999") is None


# -- retention: prune ---------------------------------------------------------------------------------

# Pruning by the caller's clock is SQLite's: in Redis a finished delivery's hash and a dedupe key carry a TTL
# (keep_finished, the dedupe window) and expire by themselves. tests/test_store_redis.py proves those TTLs.
sqlite_prunes = pytest.mark.parametrize("settings", ["sqlite"], indirect=True)


@sqlite_prunes
async def test_prune_drops_finished_deliveries_after_the_default_retention(store: Store) -> None:
    """At the default ``keep_finished`` (an hour) finished deliveries stay inspectable, then prune drops
    them; dead letters and open deliveries stay, and the counters still balance."""
    await enqueue(store, "a", "b", "c", "d")
    a, b, c, _d = await store.claim(10, NOW, LEASE)
    await store.finish(a, EndState.SENT, "", NOW)
    await store.finish(b, EndState.EXPIRED, "too old", NOW)
    await store.finish(c, EndState.DEAD_LETTER, "400", NOW)
    keep = StoreSettings().keep_finished
    assert keep == 3600
    await prune_all(store, NOW + keep - 1)
    assert len(await store.deliveries(token="a")) == 1
    assert await prune_all(store, NOW + keep + 1) >= 2
    assert await store.deliveries(token="a") == [] and await store.deliveries(token="b") == []
    assert [r.state for r in await store.deliveries(token="d")] == ["inflight"]
    assert [d.id for d in await store.dead_letters()] == [c.id]
    stats = await store.stats()
    assert (stats.accepted, stats.ended[EndState.SENT], stats.ended[EndState.EXPIRED], stats.inflight) == (4, 1, 1, 1)
    assert stats.balanced


@sqlite_prunes
async def test_prune_drops_expired_dedupe_keys_without_finishing_anything(store: Store) -> None:
    """Expired dedupe keys go with prune alone (no delivery needs to finish); live keys still refuse."""
    assert await store.enqueue([item("a", "old")], NOW, 600) == [True]
    assert await store.enqueue([item("a", "new")], NOW + 500, 600) == [True]
    assert await prune_all(store, NOW + 700) >= 1
    assert await store.enqueue([item("a", "new")], NOW + 700, 600) == [False]
    assert await store.enqueue([item("a", "old")], NOW + 700, 600) == [True]


# -- owners: operator commands, live and dead processes -----------------------------------------------


async def test_opening_the_store_again_changes_no_delivery_state(store: Store, make_store: MakeStore) -> None:
    """An operator command (open, stats, lists, close) while a live instance holds claims resets nothing:
    nothing is claimable again, nothing counts as redelivered, and each delivery is sent once."""
    await enqueue(store, "a", "b", "c", "d", "e", "f")
    jobs = await store.claim(10, NOW, LEASE)
    assert len(jobs) == 6
    for _ in range(2):
        operator = await make_store()
        stats = await operator.stats()
        await operator.list_devices()
        await operator.dead_letters()
        await operator.deliveries(token="a")
        await operator.close()
        assert (stats.inflight, stats.pending, stats.redelivered) == (6, 0, 0)
    other = await make_store()
    assert await other.claim(10, NOW, LEASE) == []
    for job in jobs:
        await store.finish(job, EndState.SENT, "", NOW)
    stats = await store.stats()
    assert (stats.ended[EndState.SENT], stats.inflight, stats.redelivered) == (6, 0, 0) and stats.balanced


async def test_recover_leaves_a_live_instances_work_alone(store: Store, make_store: MakeStore) -> None:
    """Another delivering instance starting up recovers nothing that a live instance has in flight."""
    await enqueue(store, "a", "b")
    jobs = await store.claim(10, NOW, LEASE)
    other = await make_store()
    assert await other.recover(NOW) == 0
    assert await other.claim(10, NOW, LEASE) == []
    for job in jobs:
        await store.finish(job, EndState.SENT, "", NOW)
    stats = await other.stats()
    assert (stats.ended[EndState.SENT], stats.redelivered) == (2, 0)


async def test_claim_takes_over_a_delivery_whose_lease_ran_out(store: Store, make_store: MakeStore) -> None:
    """A claim past its lease (an owner hung or gone, on any host) is claimed by another instance, counted
    as redelivered; the first owner's late answer is ignored."""
    await enqueue(store, "a", "a")
    (job,) = await store.claim(10, NOW, 10)
    other = await make_store()
    assert await other.claim(10, NOW + 9, LEASE) == []
    (taken,) = await other.claim(10, NOW + 11, LEASE)
    assert (taken.id, taken.delivery_id) == (job.id, job.delivery_id)
    await store.finish(job, EndState.DEAD_LETTER, "late", NOW + 12)
    await other.finish(taken, EndState.SENT, "", NOW + 12)
    stats = await other.stats()
    assert (stats.ended[EndState.SENT], stats.ended[EndState.DEAD_LETTER], stats.pending) == (1, 0, 1)
    assert stats.redelivered == 1 and stats.balanced


# -- devices and dead tokens ---------------------------------------------------------------------------


async def test_devices_are_put_replaced_listed_and_removed(store: Store) -> None:
    """The run-time overlay: put adds or replaces, list is sorted by token, remove says if there was one."""
    await store.put_device(Device("t2", "android", "t2"), NOW)
    await store.put_device(Device("t1", "ios", "dev1"), NOW)
    await store.put_device(Device("t1", "ios", "dev1-new"), NOW)
    assert await store.list_devices() == [Device("t1", "ios", "dev1-new"), Device("t2", "android", "t2")]
    assert await store.get_device("t1") == Device("t1", "ios", "dev1-new")
    assert await store.get_device("nope") is None
    assert await store.remove_device("t2") is Removal.REMOVED
    assert await store.remove_device("t2") is Removal.ABSENT
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
    """A process killed with SIGKILL mid-delivery loses nothing: sqlite's recover() sees the claimer's pid is gone
    (at once, no lease to wait out), redis reclaims after claim_idle; both count the deliveries as redelivered."""
    await enqueue(store, "a", "a", "b")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CRASHER), settings.backend, str(settings.path), settings.url,
         str(IDLE), str(NOW), settings.prefix],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    claimed = (await asyncio.to_thread(proc.stdout.readline)).strip().split(",")
    assert await store.recover(NOW) == 0  # the claimer is alive: its work is its own
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert len(claimed) == 2
    if settings.backend == "sqlite":
        survivor = store  # a live process on the same host: it sees that the claimer's pid is gone
        assert await survivor.claim(10, NOW, LEASE) == []  # the lease has not run out: only recover() frees them
        assert await survivor.recover(NOW) == 2
        assert await survivor.recover(NOW) == 0
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
    assert stats.redelivered == 2 and stats.balanced


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


# -- several instances on one store ------------------------------------------------------------------


# Heartbeats and claim_idle are the Redis backend's way of telling a dead instance: these run on Redis only.
redis_only = pytest.mark.parametrize("settings", ["redis"], indirect=True)


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
    taker = await make_store(claim_idle=0.1)  # the least the config accepts
    await asyncio.sleep(0.25)
    (taken,) = await taker.claim(10, NOW, LEASE)
    assert taken.id == job.id
    await stalled.retry(job, NOW + 99, WaitReason.RETRY, "late")
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


# -- SQLite only: the file, its owners and its processes ----------------------------------------------


sqlite_only = pytest.mark.parametrize("settings", ["sqlite"], indirect=True)


def query(settings: StoreSettings, sql: str) -> list[tuple[object, ...]]:
    """Read the store's file from outside, as another process would (WAL lets it, beside the open store)."""
    with closing(sqlite3.connect(settings.path)) as conn:
        return conn.execute(sql).fetchall()


async def finished_burst(store: Store, count: int, size: int = 1000, at: float = NOW) -> None:
    """``count`` deliveries of ``size``-byte payloads, accepted, claimed and sent."""
    payload = b"x" * size
    for start in range(0, count, 250):
        batch = [item(f"burst-{n}", data=payload) for n in range(start, min(count, start + 250))]
        assert all(await store.enqueue(batch, at, 600))
    while jobs := await store.claim(500, at, LEASE):
        for job in jobs:
            await store.finish(job, EndState.SENT, "", at)


@sqlite_only
async def test_finish_drops_the_payload_of_every_end_but_a_dead_letter(settings: StoreSettings, store: Store) -> None:
    """A finished delivery keeps no payload in the file, except a dead letter (shown and retried from it)."""
    for end in EndState:
        assert await store.enqueue([item(f"t-{end}", data=b"p" * 700)], NOW, 600) == [True]
    jobs = await store.claim(10, NOW, LEASE)
    for job, end in zip(jobs, EndState, strict=True):
        await store.finish(job, end, "", NOW)
    sizes = dict(query(settings, "SELECT d.state, length(d.data) + COALESCE(length(p.data), 0) "
                                 "FROM deliveries AS d LEFT JOIN payloads AS p ON p.id = d.id"))
    assert sizes == {end.value: (700 if end is EndState.DEAD_LETTER else 0) for end in EndState}


@sqlite_only
async def test_prune_gives_the_space_back_to_the_file(settings: StoreSettings, store: Store) -> None:
    """A new file uses incremental auto-vacuum: once a burst is finished and pruned, the file shrinks
    instead of keeping its high-water mark."""
    assert query(settings, "PRAGMA auto_vacuum") == [(2,)]
    await finished_burst(store, 3000)
    (peak,) = query(settings, "PRAGMA page_count")[0]
    assert await prune_all(store, NOW + StoreSettings().keep_finished + 1) >= 3000
    (after,) = query(settings, "PRAGMA page_count")[0]
    assert isinstance(peak, int) and isinstance(after, int) and after < peak / 4
    await store.close()
    assert settings.path.stat().st_size <= after * 4096


_OLD_SCHEMA = """
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, delivery_id TEXT NOT NULL, token TEXT NOT NULL, kind TEXT NOT NULL,
    data BLOB NOT NULL, received_at REAL NOT NULL, expires_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, lease_until REAL, reason TEXT, finished_at REAL
);
CREATE INDEX deliveries_open ON deliveries (token, id) WHERE state IN ('pending', 'inflight');
CREATE TABLE dedupe (key TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE devices (token TEXT PRIMARY KEY, app TEXT NOT NULL, device_token TEXT NOT NULL, updated_at REAL NOT NULL)
    WITHOUT ROWID;
CREATE TABLE dead_tokens (token TEXT PRIMARY KEY, reason TEXT NOT NULL, since REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO deliveries (delivery_id, token, kind, data, received_at, expires_at, state, next_at, lease_until)
VALUES ('d1', 'a', 'message', x'7b7d', 1000000, 1086400, 'inflight', 1000000, 1000300),
       ('d2', 'b', 'message', x'7b7d', 1000000, 1086400, 'pending', 1000000, NULL),
       ('d3', 'c', 'message', x'7b7d', 1000000, 1086400, 'sent', 1000000, NULL);
UPDATE deliveries SET finished_at = 1000000 WHERE state = 'sent';
INSERT INTO counters VALUES ('accepted', 3), ('sent', 1);
"""


@sqlite_only
async def test_a_file_of_the_previous_version_is_migrated(settings: StoreSettings, make_store: MakeStore) -> None:
    """A store file written before owners, app hints and auto-vacuum opens with its data; the delivering
    process's recover() frees the old version's in-flight row (its process is gone: it ran alone) and turns on
    incremental auto-vacuum; an operator command opening it first resets nothing."""
    with closing(sqlite3.connect(settings.path)) as conn:
        conn.executescript(_OLD_SCHEMA)
    operator = await make_store()
    stats = await operator.stats()
    assert (stats.accepted, stats.pending, stats.inflight, stats.ended[EndState.SENT]) == (3, 1, 1, 1)
    await operator.close()
    assert query(settings, "PRAGMA auto_vacuum") == [(0,)]
    store = await make_store()
    assert await store.recover(NOW) == 1
    assert query(settings, "PRAGMA auto_vacuum") == [(2,)]
    jobs = await store.claim(10, NOW, LEASE)
    assert sorted((j.token, j.delivery_id, j.data, j.app, j.request_id) for j in jobs) == [
        ("a", "d1", b"{}", None, ""), ("b", "d2", b"{}", None, "")]
    for job in jobs:
        await store.finish(job, EndState.SENT, "", NOW)
    stats = await store.stats()
    assert (stats.ended[EndState.SENT], stats.redelivered) == (3, 1) and stats.balanced


_CLAIMER = """
import asyncio, sys
from pathlib import Path
from relay.config import StoreSettings
from relay.outcome import EndState
from relay.store import create_store

async def main() -> None:
    store = create_store(StoreSettings(path=Path(sys.argv[1])))
    await store.open()
    await store.recover(float(sys.argv[2]))
    claimed = []
    while True:
        jobs = await store.claim(7, float(sys.argv[2]), 300)
        if not jobs and (await store.stats()).pending == 0:
            break
        for job in jobs:
            claimed.append(job.id)
            await store.finish(job, EndState.SENT, "", float(sys.argv[2]))
    await store.close()
    print(",".join(claimed), flush=True)

asyncio.run(main())
"""


@sqlite_only
async def test_processes_delivering_from_one_file_claim_each_delivery_once(
    settings: StoreSettings, store: Store
) -> None:
    """Three delivery processes claiming from one SQLite file at once (each recovering at start) take every
    delivery exactly once: claims are atomic across processes and nothing counts as redelivered."""
    tokens = [f"t{n % 40}" for n in range(600)]
    for start in range(0, len(tokens), 100):
        assert all(await store.enqueue([item(t) for t in tokens[start:start + 100]], NOW, 600))
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CLAIMER), str(settings.path), str(NOW)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
             for _ in range(3)]
    outputs = [(await asyncio.to_thread(p.communicate, None, 90))[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    claimed = [i for out in outputs for i in out.strip().split(",") if i]
    assert sorted(claimed, key=int) == [str(n) for n in range(1, 601)]
    stats = await store.stats()
    assert (stats.ended[EndState.SENT], stats.redelivered, stats.pending, stats.inflight) == (600, 0, 0, 0)


@sqlite_only
async def test_reads_take_no_write_lock(settings: StoreSettings, store: Store, make_store: MakeStore) -> None:
    """Operator reads (stats, lists, tracing) answer while another process holds the file's write lock: they
    never wait for, nor hold up, a live relay's commits."""
    await enqueue(store, "a")
    operator = await make_store()
    with closing(sqlite3.connect(settings.path, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")  # a live relay in the middle of a group commit
        try:
            stats = await operator.stats()
            assert (stats.pending, await operator.next_due()) == (1, NOW)
            assert [r.token for r in await operator.deliveries(token="a")] == ["a"]
            assert await operator.list_devices() == [] and await operator.dead_tokens() == {}
            assert await operator.dead_letters() == [] and await operator.dead_letter("1") is None
        finally:
            writer.execute("ROLLBACK")


@sqlite_only
async def test_only_a_store_that_acknowledges_webhooks_fsyncs_each_commit(settings: StoreSettings) -> None:
    """The webhook role's commits are what a 200 promises (synchronous=FULL); a delivery process's claims and
    outcomes skip the fsync (NORMAL): losing them to a power cut only sends a push again."""
    modes = []
    for acknowledges in (True, False):
        store = create_store(settings, acknowledges=acknowledges)
        await store.open()
        try:
            assert isinstance(store, SqliteStore)
            modes.append(await store._read(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]))
        finally:
            await store.close()
    assert modes == [2, 1]  # FULL, NORMAL


@sqlite_only
async def test_writers_queue_on_the_side_lock_and_go_as_soon_as_it_is_free(settings: StoreSettings,
                                                                          store: Store) -> None:
    """Processes sharing the file take turns on an flock of ``<file>-writer`` before BEGIN IMMEDIATE, so the
    kernel hands the write lock over at once instead of SQLite's busy handler polling with sleeps."""
    import fcntl

    fd = os.open(f"{settings.path}-writer", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process in the middle of its group commit
        pending = asyncio.ensure_future(enqueue(store, "a"))
        done, _ = await asyncio.wait({pending}, timeout=0.3)
        assert not done, "the commit did not wait for the writer lock"
        fcntl.flock(fd, fcntl.LOCK_UN)
        await asyncio.wait_for(pending, timeout=5)
    finally:
        os.close(fd)
    assert (await store.stats()).pending == 1
