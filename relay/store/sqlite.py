"""SQLite store (embedded default): WAL, ``synchronous=FULL``, and group commit.

All SQL runs on one dedicated thread. Callers queue operations; whatever queued while the previous
transaction was committing is executed together in the next one (each op in its own SAVEPOINT, so one
failing op never aborts its neighbours). Under load many webhooks share one fsync; when idle, a single
webhook is committed at once, without waiting for a timer.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from relay.config import StoreSettings
from relay.errors import StoreError, StoreUnavailable
from relay.outcome import EndState
from relay.store._sqlite_devices import SqliteDevices, migrate_devices
from relay.store.base import DeadLetter, Job, NewDelivery, Stats

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order: per-token ordering follows it
    delivery_id TEXT NOT NULL,                      -- stable id for the delivery's whole life (apns-id)
    token       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    data        BLOB NOT NULL,
    received_at REAL NOT NULL,
    expires_at  REAL NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending',    -- pending | inflight | <EndState>
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL NOT NULL,
    lease_until REAL,
    reason      TEXT,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_open ON deliveries (token, id) WHERE state IN ('pending', 'inflight');
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_ended ON deliveries (state, finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS dedupe (key TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    token TEXT PRIMARY KEY, app TEXT NOT NULL, device_token TEXT NOT NULL, updated_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_tokens (
    token TEXT PRIMARY KEY, reason TEXT NOT NULL, since REAL NOT NULL
) WITHOUT ROWID;
-- Totals survive the pruning of old finished rows, so the stats invariant holds forever.
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""

_JOB_COLUMNS = "id, delivery_id, token, kind, data, received_at, expires_at, attempts"
_WAITING = ("unroutable", "config_error")
KEEP_FINISHED = 3600.0  # finished rows (but dead letters) are kept this long for inspection


def _job(row: Sequence[Any]) -> Job:
    return Job(str(row[0]), row[1], row[2], row[3], bytes(row[4]), row[5], row[6], row[7])


_BUMP = "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?"


class SqliteStore(SqliteDevices):
    """The embedded store; see the module docstring for its commit model."""

    def __init__(self, settings: StoreSettings) -> None:
        self._path = settings.path
        self._commit_interval = settings.commit_interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._conn: sqlite3.Connection | None = None
        self._queue: list[tuple[Op, bool, asyncio.Future[Any]]] = []
        self._op_counts: Counter[str] = Counter()  # counter changes of the op running on the store thread
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self._opened = False
        self.commits = 0  # for benchmarks: transactions (fsyncs) so far

    # -- the committer -------------------------------------------------------------------------

    def _connect(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged webhook survives power loss.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        migrate_devices(conn)
        self._conn = conn

    def _count(self, name: str, by: int = 1) -> None:
        """Change an end-state counter; applied once per transaction, only if the op succeeds."""
        self._op_counts[name] += by

    def _execute(self, batch: list[tuple[Op, bool]]) -> list[tuple[bool, Any]]:
        conn = self._conn
        if conn is None:
            raise StoreUnavailable("store is closed")
        results: list[tuple[bool, Any]] = []
        counts: Counter[str] = Counter()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op, isolated in batch:
                self._op_counts = Counter()
                if not isolated:
                    # One statement (or statements that cannot fail alone): SQLite undoes a failed statement
                    # itself, and any other failure aborts the whole transaction below.
                    results.append((True, op(conn)))
                    counts.update(self._op_counts)
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, op(conn)))
                    conn.execute("RELEASE op")
                    counts.update(self._op_counts)
                except Exception as exc:  # noqa: BLE001 - one op's failure is reported to its caller only
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, exc))
            if counts:
                conn.executemany(_BUMP, [(name, by, by) for name, by in counts.items() if by])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        return results

    async def _run(self, op: Callable[[sqlite3.Connection], T], *, isolated: bool = True) -> T:
        """Queue ``op`` for the next transaction; ``isolated`` ops run in a savepoint of their own."""
        if self._conn is None and self._opened:
            raise StoreUnavailable("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((op, isolated, future))
        if not self._draining:
            self._draining = True
            self._drain_task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                if self._commit_interval:
                    await asyncio.sleep(self._commit_interval)
                batch, self._queue = self._queue, []
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._execute, [(op, isolated) for op, isolated, _ in batch]
                    )
                except (sqlite3.Error, OSError, StoreError, RuntimeError) as exc:
                    error = exc if isinstance(exc, StoreError) else StoreUnavailable(f"sqlite: {exc}")
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, _, future), (ok, value) in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value if isinstance(value, StoreError) else StoreError(str(value)))
        finally:
            self._draining = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._connect)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open SQLite store {self._path}: {exc}") from exc
        self._opened = True

        def recover(conn: sqlite3.Connection) -> int:
            # One process owns an SQLite store: whatever it had in flight when it died is due again.
            count = conn.execute(
                "UPDATE deliveries SET state = 'pending', lease_until = NULL WHERE state = 'inflight'"
            ).rowcount
            self._count("redelivered", count)
            return count

        await self._run(recover)

    async def close(self) -> None:
        if self._conn is None:
            return
        while self._queue or self._draining:  # noqa: ASYNC110 - a few loop turns at close, not a poll
            await asyncio.sleep(0.005)
        conn, self._conn = self._conn, None
        await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- the queue -----------------------------------------------------------------------------

    async def enqueue(self, items: Sequence[NewDelivery], now: float, dedupe_window: float) -> list[bool]:
        def op(conn: sqlite3.Connection) -> list[bool]:
            accepted: list[bool] = []
            for item in items:
                if dedupe_window > 0:
                    row = conn.execute(
                        "INSERT INTO dedupe (key, expires_at) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET expires_at = excluded.expires_at WHERE expires_at < ? "
                        "RETURNING key",
                        (item.dedupe_key, now + dedupe_window, now),
                    ).fetchone()
                    if row is None:
                        accepted.append(False)
                        continue
                conn.execute(
                    "INSERT INTO deliveries (delivery_id, token, kind, data, received_at, expires_at, next_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (str(uuid.uuid4()), item.token, item.kind, item.data, now, item.expires_at, now),
                )
                accepted.append(True)
            self._count("accepted", sum(accepted))
            self._count("duplicates", len(accepted) - sum(accepted))
            return accepted

        return await self._run(op)

    async def claim(self, limit: int, now: float, lease: float) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                f"""
                UPDATE deliveries SET state = 'inflight', lease_until = :lease
                WHERE id IN (
                    SELECT d.id FROM (
                        SELECT MIN(id) AS id FROM deliveries
                        WHERE state IN ('pending', 'inflight') GROUP BY token
                    ) AS heads JOIN deliveries AS d ON d.id = heads.id
                    WHERE d.state = 'pending' AND d.next_at <= :now
                    ORDER BY d.id LIMIT :limit
                )
                RETURNING {_JOB_COLUMNS}
                """,
                {"lease": now + lease, "now": now, "limit": limit},
            ).fetchall()
            return sorted((_job(r) for r in rows), key=lambda j: int(j.id))

        return await self._run(op, isolated=False)

    async def finish(self, job: Job, end: EndState, reason: str, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # Delivered payloads are dropped; dead letters keep theirs for inspection and retry.
            changed = conn.execute(
                "UPDATE deliveries SET state = ?, reason = ?, finished_at = ?, lease_until = NULL, "
                "attempts = attempts + 1 WHERE id = ? AND state = 'inflight'",
                (end.value, reason[:500], now, int(job.id)),
            ).rowcount
            if changed:
                self._count(end.value)
            self._prune(conn, now)

        await self._run(op, isolated=False)

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        conn.execute(
            "DELETE FROM deliveries WHERE finished_at IS NOT NULL AND finished_at < ? AND state != 'dead_letter'",
            (now - KEEP_FINISHED,),
        )
        conn.execute("DELETE FROM dedupe WHERE expires_at < ?", (now,))

    async def retry(self, job: Job, at: float, reason: str, *, count_attempt: bool = True) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE deliveries SET state = 'pending', next_at = ?, reason = ?, lease_until = NULL, "
                "attempts = attempts + ? WHERE id = ? AND state = 'inflight'",
                (at, reason[:500], 1 if count_attempt else 0, int(job.id)),
            )

        await self._run(op, isolated=False)

    async def wake(self, tokens: Sequence[str] | None, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            waiting = "state = 'pending' AND reason IN ('unroutable', 'config_error') AND next_at > ?"
            if tokens is None:
                return conn.execute(f"UPDATE deliveries SET next_at = ? WHERE {waiting}", (now, now)).rowcount
            total = 0
            for token in tokens:
                total += conn.execute(
                    f"UPDATE deliveries SET next_at = ? WHERE {waiting} AND token = ?", (now, now, token)
                ).rowcount
            return total

        return await self._run(op)

    async def next_due(self) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            row = conn.execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'").fetchone()
            return None if row is None else row[0]

        return await self._run(op)

    # -- devices and dead tokens (run-time devices: relay/store/_sqlite_devices.py) ---------------

    async def mark_dead(self, token: str, reason: str, now: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "INSERT INTO dead_tokens (token, reason, since) VALUES (?, ?, ?) ON CONFLICT(token) DO NOTHING "
                "RETURNING token",
                (token, reason, now),
            ).fetchone()
            return row is not None

        return await self._run(op)

    async def dead_tokens(self) -> dict[str, str]:
        rows = await self._run(lambda c: c.execute("SELECT token, reason FROM dead_tokens").fetchall())
        return dict(rows)

    # -- dead letters and stats ------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT id, token, kind, data, reason, received_at, finished_at FROM deliveries "
                "WHERE state = 'dead_letter' ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [DeadLetter(str(r[0]), r[1], r[2], bytes(r[3]), r[4] or "", r[5], r[6]) for r in rows]

    async def retry_dead_letters(self, ids: Sequence[str] | None, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            # A retried dead letter queues behind its token's newer deliveries (a new row id keeps arrival
            # order), gets a fresh lifetime, and keeps its delivery id (the apns-id) for tracing.
            where = "state = 'dead_letter'" + ("" if ids is None else " AND id = :id")
            params = [{"now": now}] if ids is None else [{"now": now, "id": int(i)} for i in ids]
            count = 0
            for p in params:
                count += conn.execute(
                    "INSERT INTO deliveries (delivery_id, token, kind, data, received_at, expires_at, next_at, reason) "
                    "SELECT delivery_id, token, kind, data, :now, :now + (expires_at - received_at), :now, 'retried' "
                    f"FROM deliveries WHERE {where} ORDER BY id",
                    p,
                ).rowcount
                conn.execute(f"DELETE FROM deliveries WHERE {where}", p)
            self._count(EndState.DEAD_LETTER.value, -count)
            return count

        return await self._run(op)

    async def stats(self) -> Stats:
        def op(conn: sqlite3.Connection) -> Stats:
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
            open_rows = dict(
                conn.execute(
                    "SELECT state, COUNT(*) FROM deliveries WHERE state IN ('pending', 'inflight') GROUP BY state"
                ).fetchall()
            )
            dead = conn.execute("SELECT COUNT(*) FROM dead_tokens").fetchone()[0]
            devices = conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
            return Stats(
                accepted=counters.get("accepted", 0),
                duplicates=counters.get("duplicates", 0),
                pending=open_rows.get("pending", 0),
                inflight=open_rows.get("inflight", 0),
                ended={end: counters.get(end.value, 0) for end in EndState},
                dead_tokens=dead,
                devices=devices,
                redelivered=counters.get("redelivered", 0),
            )

        return await self._run(op)

