"""What only the SQLite store promises: claims and ends whose cost does not grow with a parked backlog or a
token's retained history, the schema migrations that brought them, compact dedupe keys, prune slices of
bounded size, and a time bound on the durability of a delivery process's commits."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from relay.config import StoreSettings, load_config
from relay.errors import StoreError
from relay.outcome import EndState
from relay.running import RELAY_KEY
from relay.runtime.relay import create_app
from relay.store import NewDelivery
from relay.store import sqlite as sqlite_store
from relay.store import sqlite_commit as commit
from relay.store import sqlite_schema as schema
from relay.store.base import EventStream, Job
from relay.store.sqlite import PRUNE_ROWS, PRUNE_ROWS_MAX, PRUNE_ROWS_MIN, SqliteStore
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE, IOS_TOKEN, Sandbox, sample

NOW = 1_000_000.0
LEASE = 300.0
OpenStore = Callable[..., Awaitable[SqliteStore]]


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Open SQLite stores on one file in ``tmp_path`` (closed after the test)."""
    opened: list[SqliteStore] = []

    async def make(*, acknowledges: bool = True, name: str = "relay.db") -> SqliteStore:
        store = SqliteStore(StoreSettings(path=tmp_path / name), acknowledges=acknowledges)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def new(token: str, n: int, app: str | None, key: str | None = None) -> NewDelivery:
    return NewDelivery(token, "message", b'{"n":%d}' % n, key or f"m:{n}:{token}", NOW + 86400, app=app)


async def park(store: SqliteStore, count: int, app: str = "android") -> None:
    """``count`` due deliveries of ``app``: half of them token heads, half queued behind one (fan-out)."""
    for start in range(0, count, 2000):
        items = [new(f"{app}-{n // 2:08d}", n, app) for n in range(start, min(count, start + 2000))]
        assert all(await store.enqueue(items, NOW, 0))


async def steps_of(store: SqliteStore, work: Callable[[], Awaitable[object]]) -> int:
    """SQLite VM instructions the store's connection runs while ``work`` is awaited."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    await store._run_alone(lambda conn: conn.set_progress_handler(count, 1))
    try:
        await work()
    finally:
        await store._run_alone(lambda conn: conn.set_progress_handler(None, 1))
    return steps


async def claim_steps(store: SqliteStore, app_limits: dict[str, int]) -> tuple[int, list[str]]:
    """SQLite VM instructions one claim runs (the whole claim transaction's statements), and what it took."""
    jobs: list[Job] = []

    async def claim() -> None:
        jobs.extend(await store.claim(10, NOW, LEASE, app_limits=app_limits))

    steps = await steps_of(store, claim)
    for job in jobs:
        await store.finish(job, EndState.SENT, "", NOW)
    return steps, [job.token for job in jobs]


async def test_a_claims_cost_does_not_grow_with_another_apps_parked_backlog(open_store: OpenStore) -> None:
    """With 1,000 and then 100,000 deliveries parked for an app whose slots are full (or that gets one probe),
    a claim of another app's deliveries runs about as many SQLite instructions: it reads only the heads it
    takes (it used to read every open row, under the write lock the webhooks' commits wait for)."""
    costs: dict[int, list[int]] = {}
    for parked in (1_000, 100_000):
        store = await open_store(name=f"parked-{parked}.db")
        await park(store, parked)
        costs[parked] = []
        for round_ in range(3):
            assert all(await store.enqueue([new(f"ios-{round_}-{n}", n, "ios") for n in range(10)], NOW, 0))
            caps = {"ios": 10, "android": round_ % 2}  # full slots (0), or one probe of the parked app
            steps, tokens = await claim_steps(store, caps)
            costs[parked].append(steps)
            assert len(tokens) == 10 and sum(t.startswith("android") for t in tokens) == round_ % 2
    small, large = max(costs[1_000]), max(costs[100_000])
    assert large < 2 * small, costs  # generous: a scan of the backlog would be ~100 times more


# ``count`` finished (sent) deliveries of one token, as an hour of retention keeps them (the default).
_KEPT = """
    WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
    INSERT INTO deliveries (delivery_id, token, kind, data, received_at, expires_at, state, next_at, finished_at,
                            app)
    SELECT 'kept-' || i, :token, 'message', x'', :now, :now + 86400, 'sent', :now, :now, 'ios' FROM n
"""


async def store_and_end_costs(store: SqliteStore) -> tuple[list[int], list[int]]:
    """SQLite instructions of storing three deliveries for token ``t``, then of ending the first two (each end
    makes the next one the head: the third is claimable after them)."""
    stored = [await steps_of(store, lambda n=n: store.enqueue([new("t", n, "ios")], NOW, 0)) for n in range(3)]
    ended = []
    for _ in range(2):
        [job] = await store.claim(10, NOW, LEASE)
        ended.append(await steps_of(store, lambda job=job: store.finish(job, EndState.SENT, "", NOW)))
    [last] = await store.claim(10, NOW, LEASE)
    assert last.data == b'{"n":2}'
    return stored, ended


async def test_a_deliverys_end_costs_the_same_however_many_finished_deliveries_its_token_keeps(
        open_store: OpenStore) -> None:
    """Finished deliveries stay for ``keep_finished`` (an hour: about 1,000 a device at 300/s over 1,000
    devices). Ending a delivery and making its token's next one the head, or storing a token's new delivery,
    must not walk them: with 5,000 kept it runs about as many SQLite instructions as with 10 (it used to read
    every kept row of the token, so an everyday store paid its whole retention on every push)."""
    ends: dict[int, list[int]] = {}
    stores: dict[int, list[int]] = {}
    for kept in (10, 5_000):
        store = await open_store(name=f"kept-{kept}.db")
        await store._run_alone(lambda conn, kept=kept: conn.execute(_KEPT, {"count": kept, "token": "t", "now": NOW}))
        stores[kept], ends[kept] = await store_and_end_costs(store)
    assert max(ends[5_000]) < 2 * max(ends[10]), ends  # generous: a walk of the kept rows is ~100 times more
    assert max(stores[5_000]) < 2 * max(stores[10]), stores


class RowCounter:
    """Stands in for a store's connection and records the rows each statement hands back: every row is a SQLite
    step, around which Python's sqlite3 gives up the interpreter lock (see relay.store._sqlite_claims)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.statements: list[tuple[str, int]] = []  # (statement, rows handed back)

    def execute(self, sql: str, *args: Any) -> _Fetched:
        cursor = self.conn.execute(sql, *args)
        rows = cursor.fetchall()
        self.statements.append((" ".join(sql.split()), len(rows)))
        return _Fetched(cursor, rows)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = list(rows)
        self.statements += [(" ".join(sql.split()), 0)] * len(rows)  # a step per row
        return self.conn.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


class _Fetched:
    def __init__(self, cursor: sqlite3.Cursor, rows: list[Any]) -> None:
        self.rowcount, self.lastrowid, self._rows = cursor.rowcount, cursor.lastrowid, iter(rows)

    def fetchone(self) -> Any:
        return next(self._rows, None)

    def fetchall(self) -> list[Any]:
        return list(self._rows)

    def __iter__(self) -> Any:
        return self._rows


async def test_a_claim_and_a_batch_of_ends_hand_back_one_row_per_statement_whatever_their_size(
        open_store: OpenStore) -> None:
    """A claim of 100 deliveries, then their 100 outcomes (ending together): no statement hands back more than one
    row, and the outcomes take a fixed handful of statements. Each row or statement made the store thread wait
    for the interpreter lock while it held the write lock, up to 5 ms when the event loop was busy: a claim
    fetched its rows one by one (100 steps) and each outcome was two statements of its own. The ends are
    recorded as they were one by one: sent payloads dropped, a dead letter's kept, counters right."""
    store = await open_store()
    assert all(await store.enqueue([new(f"t{n:03}", n, "ios") for n in range(100)], NOW, 0))
    assert store._conn is not None
    counter = RowCounter(store._conn)
    store._conn = counter  # type: ignore[assignment]
    jobs = await store.claim(100, NOW, LEASE)
    assert len(jobs) == 100 and [job.data for job in jobs[:2]] == [b'{"n":0}', b'{"n":1}']
    assert jobs[0].received_at == NOW and jobs[0].expires_at == NOW + 86400
    claim, counter.statements = counter.statements, []
    ends = [store.finish(job, EndState.DEAD_LETTER if n == 7 else EndState.SENT, "done", NOW + 1)
            for n, job in enumerate(jobs)]
    await asyncio.gather(*ends)
    ended, counter.statements = counter.statements, []
    assert max(rows for _, rows in claim + ended) == 1, claim + ended
    assert len(ended) <= 6, ended  # BEGIN, which are still this owner's, their ends, payloads, counters, COMMIT
    store._conn = counter.conn
    stats = await store.stats()
    assert (stats.ended[EndState.SENT], stats.ended[EndState.DEAD_LETTER], stats.pending, stats.inflight) == (
        99, 1, 0, 0)
    assert [letter.data for letter in await store.dead_letters()] == [b'{"n":7}']
    assert query(store._path, "SELECT COUNT(*) FROM payloads") == [(1,)]


async def test_messages_of_webhooks_stored_together_take_a_fixed_handful_of_statements(open_store: OpenStore) -> None:
    """50 webhooks queued for one transaction (2 deliveries each) are stored in a few statements, not five each
    (a savepoint, a dedupe key, two inserts, a release): every statement made the webhook process's store thread
    wait for the interpreter lock while holding the write lock the delivery processes' claims queue for. Each
    webhook still gets its own answer, ids follow arrival, payloads match their rows, counters are right."""
    store = await open_store()
    assert store._conn is not None
    counter = RowCounter(store._conn)
    store._conn = counter  # type: ignore[assignment]
    commits = store.commits
    answers = await asyncio.gather(*(store.enqueue([new(f"a{n}", 2 * n, "ios"), new(f"b{n}", 2 * n + 1, "ios")],
                                                   NOW, 600) for n in range(50)))
    store._conn = counter.conn
    assert [list(answer) for answer in answers] == [[True, True]] * 50
    assert store.commits == commits + 1
    assert len(counter.statements) <= 12, counter.statements  # BEGIN .. COMMIT, whatever the webhooks' number
    rows = query(store._path, "SELECT d.token, p.data FROM deliveries d JOIN payloads p ON p.id = d.id ORDER BY d.id")
    assert rows == [(f"{side}{n}", b'{"n":%d}' % (2 * n + i)) for n in range(50) for i, side in enumerate("ab")]
    assert query(store._path, "SELECT COUNT(*) FROM dedupe") == [(100,)]
    assert (await store.stats()).pending == 100


async def test_merged_messages_reuse_the_same_statements_whatever_the_number_of_webhooks(
        open_store: OpenStore) -> None:
    """Transactions of 1, 7 and 50 webhooks run the same statement texts: a text per row count was prepared
    anew for each size (about 100 µs for 30 rows, one more release of the interpreter lock under the write
    lock) and pushed the other statements out of sqlite3's cache of 128."""
    store = await open_store()
    assert store._conn is not None
    conn, texts = store._conn, {}
    for size in (1, 7, 50):
        counter = RowCounter(conn)
        store._conn = counter  # type: ignore[assignment]
        await asyncio.gather(*(store.enqueue([new(f"s{size}-{n}", n, "ios")], NOW, 600) for n in range(size)))
        store._conn = conn
        texts[size] = {text for text, _ in counter.statements}
    assert len(texts[1]) == 9 and texts[1] == texts[7] == texts[50], texts  # BEGIN .. 3 inserts .. counters, COMMIT
    assert (await store.stats()).pending == 58


async def test_a_resend_is_told_apart_within_one_merged_transaction_and_across_them(open_store: OpenStore) -> None:
    """Dedupe keys judged together: a key twice among the webhooks of one transaction keeps the first only; a key
    stored within the window is a resend; one whose window has passed is accepted again."""
    store = await open_store()
    calls = [[new("t1", 1, "ios", key="k1")], [new("t2", 2, "ios", key="k1"), new("t3", 3, "ios", key="k2")],
             [new("t4", 4, "ios", key="k2")]]
    first = await asyncio.gather(*(store.enqueue(items, NOW, 600) for items in calls))
    assert [list(answer) for answer in first] == [[True], [False, True], [False]]
    later = await asyncio.gather(store.enqueue([new("t5", 5, "ios", key="k1")], NOW + 599, 600),
                                 store.enqueue([new("t6", 6, "ios", key="k2")], NOW + 601, 600))
    assert [list(answer) for answer in later] == [[False], [True]]
    assert query(store._path, "SELECT token FROM deliveries ORDER BY id") == [("t1",), ("t3",), ("t6",)]
    stats = await store.stats()
    assert (stats.accepted, stats.duplicates) == (3, 3)


async def test_a_message_an_event_and_a_message_queued_together_keep_their_order(open_store: OpenStore) -> None:
    """Messages are stored together, events one by one (they coalesce by stream): a message queued after an
    event for the same device is not merged into an earlier message's statement, so ids keep arrival order."""
    store = await open_store()
    event = NewDelivery(IOS_TOKEN, "event", b'{"e":1}', "e:1", NOW + 60, app="ios",
                        stream=EventStream(f"{IOS_TOKEN}|agent-1|typing", "fp", 0))
    await asyncio.gather(store.enqueue([new(IOS_TOKEN, 1, "ios")], NOW, 600), store.enqueue([event], NOW, 600),
                         store.enqueue([new(IOS_TOKEN, 2, "ios")], NOW, 600))
    rows = query(store._path, "SELECT p.data FROM deliveries d JOIN payloads p ON p.id = d.id ORDER BY d.id")
    assert rows == [(b'{"n":1}',), (b'{"e":1}',), (b'{"n":2}',)]


async def test_one_bad_webhook_among_those_stored_together_fails_alone(open_store: OpenStore) -> None:
    """A call the merged statements cannot store (here a token SQLite refuses) fails its own webhook with a
    store error; the webhooks queued with it are stored, each once, as if alone."""
    store = await open_store()
    bad = NewDelivery(None, "message", b"{}", "bad", NOW + 60)  # type: ignore[arg-type]
    answers = await asyncio.gather(store.enqueue([new("t1", 1, "ios")], NOW, 600), store.enqueue([bad], NOW, 600),
                                   store.enqueue([new("t2", 2, "ios")], NOW, 600), return_exceptions=True)
    assert [list(answers[0]), list(answers[2])] == [[True], [True]]  # type: ignore[arg-type]
    assert isinstance(answers[1], StoreError), answers[1]
    assert query(store._path, "SELECT token FROM deliveries ORDER BY id") == [("t1",), ("t2",)]
    assert query(store._path, "SELECT COUNT(*) FROM dedupe") == [(2,)]  # the bad call's key went with it
    stats = await store.stats()
    assert (stats.accepted, stats.pending) == (2, 2)


async def test_a_webhook_with_text_sqlite_cannot_keep_fails_alone_and_never_blocks_the_claims(
        open_store: OpenStore) -> None:
    """A string that is not valid Unicode (a lone surrogate, as aiohttp hands over a header's bytes above 0x7f)
    fails its own webhook: sent as a JSON escape, SQLite stored bytes that no reader could decode, and every
    claim that reached the row failed ("store unavailable, dispatcher paused", for good)."""
    store = await open_store()
    bad = dataclasses.replace(new("t2", 2, "ios"), request_id="ab\udcff")
    answers = await asyncio.gather(store.enqueue([new("t1", 1, "ios")], NOW, 600), store.enqueue([bad], NOW, 600),
                                   store.enqueue([new("t3", 3, "ios")], NOW, 600), return_exceptions=True)
    assert isinstance(answers[1], StoreError) and [list(answers[0]), list(answers[2])] == [[True], [True]]
    jobs = await store.claim(10, NOW, LEASE)
    assert sorted(job.token for job in jobs) == ["t1", "t3"]


async def test_outcomes_recorded_together_change_only_this_owners_claims_once_each(open_store: OpenStore) -> None:
    """Outcomes that share a transaction: one for a delivery another process took over (its lease ran out)
    changes nothing, a second outcome of the same delivery changes nothing, the others end as one by one."""
    store = await open_store()
    assert all(await store.enqueue([new(f"t{n}", n, "ios") for n in range(3)], NOW, 0))
    taken, mine, other = await store.claim(10, NOW, LEASE)
    await store._run(lambda conn: conn.execute("UPDATE deliveries SET owner = 'elsewhere' WHERE id = ?",
                                               (int(taken.id),)))
    commits = store.commits
    await asyncio.gather(store.finish(taken, EndState.SENT, "late", NOW + 1),
                         store.finish(mine, EndState.SENT, "first", NOW + 1),
                         store.finish(mine, EndState.DEAD_LETTER, "second", NOW + 1),
                         store.finish(other, EndState.DEAD_LETTER, "bad", NOW + 1))
    assert store.commits == commits + 1  # one transaction, one call for the four
    rows = query(store._path, "SELECT state, owner, reason, attempts FROM deliveries ORDER BY id")
    assert rows == [("inflight", "elsewhere", None, 0), ("sent", None, "first", 1), ("dead_letter", None, "bad", 1)]
    stats = await store.stats()
    assert (stats.ended[EndState.SENT], stats.ended[EndState.DEAD_LETTER]) == (1, 1)
    assert query(store._path, "SELECT id FROM payloads ORDER BY id") == [(int(taken.id),), (int(other.id),)]


async def test_status_lines_and_metrics_read_no_more_with_a_parked_backlog(open_store: OpenStore) -> None:
    """Every process writes a status line every 10 s and answers each metrics scrape from ``summary``: with
    1,000 and 20,000 deliveries parked it runs about as many SQLite instructions (counting the open rows, as
    it did, read every one of them: about a second with a million parked, and it held up the commits that
    webhooks wait for)."""
    costs: dict[int, int] = {}
    for parked in (1_000, 20_000):
        store = await open_store(name=f"parked-{parked}.db")
        await park(store, parked)
        assert (await store.summary()).pending == parked
        costs[parked] = await steps_of(store, store.summary)
    assert costs[20_000] < 2 * costs[1_000], costs  # a count of the open rows would be ~20 times more


async def test_a_version_7_file_gets_head_triggers_that_name_their_index(tmp_path: Path,
                                                                         open_store: OpenStore) -> None:
    """Version 7's head triggers left the planner free to find a token's next head through the token index
    (its finished rows included): opening such a file makes them again."""
    path = tmp_path / "relay.db"
    await (await open_store()).close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP TRIGGER deliveries_head_end")
        conn.execute("CREATE TRIGGER deliveries_head_end AFTER UPDATE OF state ON deliveries BEGIN SELECT 1; END")
        conn.execute("PRAGMA user_version = 7")
        conn.commit()
    await open_store(name="relay.db")
    [(sql,)] = query(path, "SELECT sql FROM sqlite_master WHERE name = 'deliveries_head_end'")
    assert "INDEXED BY deliveries_open" in sql
    assert query(path, "PRAGMA user_version") == [(schema.SCHEMA_VERSION,)]


async def test_claims_keep_each_tokens_order_and_take_the_earliest_due_heads(open_store: OpenStore) -> None:
    """Only a token's oldest open delivery is claimable; when it ends its next one is; a retried head stays the
    head; claims take due heads earliest due first, within each app's cap."""
    store = await open_store()
    assert all(await store.enqueue([new("a", 1, "x"), new("a", 2, "x"), new("b", 3, "x"), new("c", 4, "y")],
                                   NOW, 600))
    first = await store.claim(10, NOW, LEASE, app_limits={"x": 1, "y": 5})
    assert [j.data for j in first] == [b'{"n":1}', b'{"n":4}']
    await store.retry(first[0], NOW + 5, "retry")  # type: ignore[arg-type]
    assert [j.data for j in await store.claim(10, NOW, LEASE)] == [b'{"n":3}']  # a waits; its 2nd stays behind
    again = await store.claim(10, NOW + 5, LEASE)
    assert [j.data for j in again] == [b'{"n":1}']
    await store.finish(again[0], EndState.SENT, "", NOW + 5)
    assert [j.data for j in await store.claim(10, NOW + 5, LEASE)] == [b'{"n":2}']
    assert (await store.stats()).balanced


_VERSION_3 = """
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, delivery_id TEXT NOT NULL, token TEXT NOT NULL, kind TEXT NOT NULL,
    data BLOB NOT NULL, received_at REAL NOT NULL, expires_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, lease_until REAL, reason TEXT, finished_at REAL,
    app TEXT, wait_reason TEXT, owner TEXT, request_id TEXT NOT NULL DEFAULT '', message_id TEXT
);
CREATE TABLE payloads (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE dedupe (key TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE devices (token TEXT PRIMARY KEY, app TEXT NOT NULL, device_token TEXT NOT NULL,
    updated_at REAL NOT NULL, environment TEXT) WITHOUT ROWID;
CREATE TABLE dead_tokens (token TEXT PRIMARY KEY, reason TEXT NOT NULL, since REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE apns_environments (device_token TEXT PRIMARY KEY, environment TEXT NOT NULL, learned_at REAL NOT NULL)
    WITHOUT ROWID;
CREATE INDEX deliveries_open ON deliveries (token, id) WHERE state IN ('pending', 'inflight');
CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
CREATE INDEX dedupe_expiry ON dedupe (expires_at);
INSERT INTO deliveries (delivery_id, token, kind, data, received_at, expires_at, state, next_at, app, owner)
VALUES ('d1', 'a', 'message', x'', 1000000, 1086400, 'sent', 1000000, 'ios', NULL),
       ('d2', 'a', 'message', x'', 1000000, 1086400, 'pending', 1000000, 'ios', NULL),
       ('d3', 'a', 'message', x'', 1000000, 1086400, 'pending', 1000000, 'ios', NULL),
       ('d4', 'b', 'message', x'', 1000000, 1086400, 'inflight', 1000000, 'android', NULL),
       ('d5', 'b', 'message', x'', 1000000, 1086400, 'pending', 1000000, 'android', NULL);
INSERT INTO payloads (id, data) VALUES (2, x'7b7d'), (3, x'7b7d'), (4, x'7b7d'), (5, x'7b7d');
UPDATE deliveries SET finished_at = 1000000 WHERE state = 'sent';
INSERT INTO counters VALUES ('accepted', 5), ('sent', 1);
INSERT INTO dedupe VALUES ('m:7:a', 1000600), ('m:8:b', 1000600);
PRAGMA user_version = 3;
"""


async def test_a_version_3_file_gets_its_heads_and_keeps_its_dedupe_keys(tmp_path: Path,
                                                                         open_store: OpenStore) -> None:
    """A file of the previous schema opens with its token heads marked (the oldest open delivery of each
    token, an in-flight one included) and its live dedupe keys kept as digests: a resent message is still a
    duplicate, the queue drains in per-token order, and the counters balance."""
    path = tmp_path / "relay.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(_VERSION_3)
    store = await open_store()
    assert query(path, "PRAGMA user_version") == [(schema.SCHEMA_VERSION,)]
    assert query(path, "SELECT delivery_id FROM deliveries WHERE head = 1 ORDER BY id") == [("d2",), ("d4",)]
    assert query(path, "SELECT DISTINCT typeof(key), length(key) FROM dedupe") == [("blob", 16)]
    assert await store.enqueue([new("a", 9, "ios", key="m:7:a")], NOW, 600) == [False]
    assert await store.recover(NOW) == 1  # d4 was claimed by a version that ran alone: its owner is gone
    order = []
    while jobs := await store.claim(10, NOW, LEASE):
        order += [j.delivery_id for j in jobs]
        for job in jobs:
            await store.finish(job, EndState.SENT, "", NOW)
    assert order == ["d2", "d4", "d3", "d5"]
    stats = await store.stats()
    assert (stats.ended[EndState.SENT], stats.duplicates) == (5, 1) and stats.balanced


async def test_dedupe_keys_are_stored_as_16_byte_digests(tmp_path: Path, open_store: OpenStore) -> None:
    """A dedupe key costs a fixed 16-byte digest in the file, whatever the key's length, and still refuses
    its duplicate within the window."""
    store = await open_store()
    long_key = "m:" + "9" * 40 + ":" + "f" * 64
    assert await store.enqueue([new("t", 1, "ios", key=long_key)], NOW, 600) == [True]
    assert await store.enqueue([new("t", 2, "ios", key=long_key)], NOW + 1, 600) == [False]
    assert query(tmp_path / "relay.db", "SELECT typeof(key), length(key) FROM dedupe") == [("blob", 16)]


async def _finished_and_expired(store: SqliteStore, rows: int, keys: int) -> None:
    for start in range(0, max(rows, keys), 500):
        items = [new(f"t{n}", n, "ios") for n in range(start, min(max(rows, keys), start + 500))]
        assert all(await store.enqueue(items, NOW, 600))
    while jobs := await store.claim(500, NOW, LEASE):
        await asyncio.gather(*(store.finish(job, EndState.SENT, "", NOW) for job in jobs))


async def test_one_prune_slice_is_one_transaction_of_bounded_size(tmp_path: Path, open_store: OpenStore) -> None:
    """Each prune call commits once and removes at most its slice's rows (and twice as many expired dedupe
    keys), however much is due; calls until ``more`` is False remove it all."""
    store = await open_store()
    path = tmp_path / "relay.db"
    await _finished_and_expired(store, PRUNE_ROWS * 3 + 7, PRUNE_ROWS * 6 + 11)
    later = NOW + StoreSettings().keep_finished + 1
    def counts() -> tuple[int, int]:
        (rows,), (keys,) = query(path, "SELECT COUNT(*) FROM deliveries"), query(path, "SELECT COUNT(*) FROM dedupe")
        return int(rows[0]), int(keys[0])  # type: ignore[call-overload]

    slices = 0
    while True:
        before, commits, limit = counts(), store.commits, store._prune_rows
        pruned = await store.prune(later)
        after = counts()
        assert store.commits == commits + 1
        assert 0 <= before[0] - after[0] <= limit and 0 <= before[1] - after[1] <= 2 * limit
        assert pruned.removed == (before[0] - after[0]) + (before[1] - after[1])
        slices += 1
        if not pruned.more:
            break
    assert after == (0, 0) and slices >= 2


async def test_prune_slices_are_sized_by_the_time_they_hold_the_write_lock(
        tmp_path: Path, open_store: OpenStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full slice that took longer than PRUNE_SLICE_BUDGET shrinks the next one (a row costs more in a big file
    than in a small one), down to PRUNE_ROWS_MIN; a quick one grows it, up to
    PRUNE_ROWS_MAX; a slice that emptied what was due says nothing about the size and changes nothing."""
    store = await open_store()
    await _finished_and_expired(store, 1200, 1200)
    later = NOW + StoreSettings().keep_finished + 1

    def rows() -> int:
        return int(query(tmp_path / "relay.db", "SELECT COUNT(*) FROM deliveries")[0][0])  # type: ignore[call-overload]

    assert store._prune_rows == PRUNE_ROWS
    monkeypatch.setattr(sqlite_store, "PRUNE_SLICE_BUDGET", 1e-9)  # every slice is over budget
    assert (await store.prune(later)).more and rows() == 1200 - PRUNE_ROWS
    assert store._prune_rows == PRUNE_ROWS_MIN
    assert (await store.prune(later)).more and rows() == 1200 - PRUNE_ROWS - PRUNE_ROWS_MIN
    monkeypatch.setattr(sqlite_store, "PRUNE_SLICE_BUDGET", 1e9)  # every slice is far under budget
    assert (await store.prune(later)).more
    assert store._prune_rows == PRUNE_ROWS_MAX
    while (await store.prune(later)).more:  # what is left (less than a slice): the size stays
        pass
    assert rows() == 0 and store._prune_rows == PRUNE_ROWS_MAX


async def test_a_delivery_processs_commits_are_synced_within_a_second(open_store: OpenStore) -> None:
    """A store that acknowledges nothing (``synchronous=NORMAL``) schedules an fsync of the WAL at most
    SYNC_WITHIN after its first unsynced commit, syncs everything committed by then, and syncs at most once a
    SYNC_WITHIN; an acknowledging store's commits are each synced already and need none."""
    assert commit.SYNC_WITHIN == 1.0
    acknowledging = await open_store()
    store = await open_store(acknowledges=False)
    assert all(await acknowledging.enqueue([new("x", 0, "ios")], NOW, 600))
    assert acknowledging.unsynced == 0 and acknowledging._sync_timer is None
    started = time.monotonic()
    assert all(await store.enqueue([new("a", 1, "ios")], NOW, 600))
    assert store.unsynced == 1 and store.syncs == 0
    timer = store._sync_timer
    assert timer is not None and timer.when() - asyncio.get_running_loop().time() <= commit.SYNC_WITHIN
    for n in range(2, 40):  # more commits meanwhile share the same sync
        assert all(await store.enqueue([new("a", n, "ios")], NOW, 600))
    async with asyncio.timeout(30):  # generous: the promise is "within a second" of an idle machine
        while store.unsynced:
            await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    assert 1 <= store.syncs <= elapsed / commit.SYNC_WITHIN + 1
    assert store._sync_timer is None  # nothing left to sync: no timer runs


async def _loop_gap_while(work: Awaitable[object], hold: Callable[[], None], release_after: float) -> float:
    """The longest the event loop went without a turn while ``work`` ran, with a lock held by ``hold`` until
    ``release_after`` seconds in (``hold`` returns the function that releases it)."""
    ticks = [time.monotonic()]
    stop = asyncio.Event()

    async def tick() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.005)
            ticks.append(time.monotonic())

    release = hold()
    ticker = asyncio.ensure_future(tick())
    pending = asyncio.ensure_future(work)
    await asyncio.sleep(release_after)
    assert not pending.done(), "the op did not wait for the lock"
    release()
    await asyncio.wait_for(pending, timeout=10)
    stop.set()
    await ticker
    return max(b - a for a, b in itertools.pairwise(ticks))


async def test_a_delivery_stores_claims_and_ends_run_on_the_loop_thread_when_the_store_is_idle(
        open_store: OpenStore) -> None:
    """At everyday rates each claim, outcome and device-epoch read found the store idle and paid two thread
    wake-ups for a transaction of microseconds: a delivery process's store runs them inline instead (the
    same transactions); an acknowledging store (fsync per commit) never does."""
    acknowledging = await open_store()
    store = await open_store(acknowledges=False)
    assert all(await acknowledging.enqueue([new("ios-1", 1, "ios"), new("ios-1", 2, "ios")], NOW, 600))
    before = store.inline_ops
    (job,) = await store.claim(10, NOW, LEASE)
    assert await store.next_due() == NOW  # the token's second delivery, pending behind its head
    await store.device_epoch()
    await store.finish(job, EndState.SENT, "sent", NOW)
    assert store.inline_ops - before == 4
    (second,) = await store.claim(10, NOW, LEASE)  # the head moved to the token's next delivery
    assert second.data == b'{"n":2}'
    assert (await store.stats()).ended.get(EndState.SENT) == 1
    assert acknowledging.inline_ops == 0
    await acknowledging.claim(10, NOW, LEASE)
    assert acknowledging.inline_ops == 0


async def test_an_inline_claim_never_waits_on_the_loop_thread_for_the_relays_writer_lock(
        tmp_path: Path, open_store: OpenStore) -> None:
    """Another process's group commit holds the writers' flock: the claim waits for it on the store thread,
    and the event loop keeps turning (in-flight sends are answered meanwhile)."""
    import fcntl
    import os

    store = await open_store(acknowledges=False)
    acknowledging = await open_store()
    assert all(await acknowledging.enqueue([new("ios-1", 1, "ios")], NOW, 600))
    fd = os.open(schema.writer_lock_path(tmp_path / "relay.db"), os.O_RDWR | os.O_CREAT)

    def hold() -> Callable[[], None]:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return lambda: fcntl.flock(fd, fcntl.LOCK_UN)

    try:
        before = store.inline_ops
        gap = await _loop_gap_while(store.claim(10, NOW, LEASE), hold, release_after=0.5)
    finally:
        os.close(fd)
    assert gap < 0.25, f"the event loop stood still {gap:.3f} s"
    assert store.inline_ops == before  # it went to the store thread
    assert (await store.stats()).inflight == 1


async def test_an_inline_claim_does_not_wait_out_an_operator_commands_write_lock_on_the_loop_thread(
        tmp_path: Path, open_store: OpenStore) -> None:
    """A writer outside the relay's flock (an operator's sqlite3 shell in a write transaction) is waited for
    with SQLite's busy timeout on the store thread, never on the event loop's."""
    store = await open_store(acknowledges=False)
    acknowledging = await open_store()
    assert all(await acknowledging.enqueue([new("ios-1", 1, "ios")], NOW, 600))
    operator = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)

    def hold() -> Callable[[], None]:
        operator.execute("BEGIN IMMEDIATE")
        return lambda: operator.execute("COMMIT")

    try:
        gap = await _loop_gap_while(store.claim(10, NOW, LEASE), hold, release_after=0.5)
    finally:
        operator.close()
    assert gap < 0.25, f"the event loop stood still {gap:.3f} s"
    assert (await store.stats()).inflight == 1


async def test_a_busy_event_loop_leaves_quick_ops_to_the_store_thread(open_store: OpenStore) -> None:
    """Inline ops are for a loop with time to spare: once the loop's thread used most of a core (a drain, a
    saturating load), claims go to the store thread, where SQLite runs beside the loop and ops share
    transactions; an idle window later they run inline again."""
    store = await open_store(acknowledges=False)
    acknowledging = await open_store()
    assert all(await acknowledging.enqueue([new(f"ios-{n}", n, "ios") for n in range(3)], NOW, 600))
    await store.next_due()  # the loop's window starts
    spun = time.thread_time()
    while time.thread_time() - spun < 2 * commit.INLINE_WINDOW:
        pass  # the loop's thread busy: a saturating load
    before = store.inline_ops
    assert len(await store.claim(1, NOW, LEASE)) == 1
    assert store.inline_ops == before, "a claim ran inline on a busy loop"
    await asyncio.sleep(2 * commit.INLINE_WINDOW)
    assert len(await store.claim(1, NOW, LEASE)) == 1
    assert store.inline_ops == before + 1


async def test_the_delivery_role_runs_its_store_ops_inline_and_the_webhook_role_never_does(
        sandbox: Sandbox, aiohttp_client: Any) -> None:
    """Wired as the default process model wires its roles (``relay/runtime/roles.py``): the webhook process
    (listens, delivers nothing) commits each webhook with an fsync on its store thread; the delivery process
    (delivers, listens to nobody) claims and records the push inline, at the defaults an operator gets."""
    config = load_config(sandbox.write())
    webhooks = create_app(config, run_dispatcher=False, accepts_webhooks=True)
    delivery = create_app(config, run_dispatcher=True, accepts_webhooks=False)
    client = await aiohttp_client(webhooks)
    await aiohttp_client(delivery)
    answer = await client.post("/parley/webhook", json=sample("message", to=[IOS_TOKEN]),
                               headers={AUTH_HEADER: AUTH_VALUE})
    assert answer.status == 200
    store = delivery[RELAY_KEY].store
    assert isinstance(store, SqliteStore)
    async with asyncio.timeout(10):  # the delivery role polls the store within IDLE_POLL (no wake-up here)
        while (await store.stats()).ended.get(EndState.SENT) != 1:
            await asyncio.sleep(0.05)
    assert store.inline_ops >= 3  # at least its claim, the device-epoch read and the outcome
    webhook_store = webhooks[RELAY_KEY].store
    assert isinstance(webhook_store, SqliteStore) and webhook_store.inline_ops == 0
