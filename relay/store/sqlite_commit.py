"""Group commit for the SQLite store: every operation runs on one thread, many per transaction.

Callers queue operations; whatever queued while the previous transaction was committing is executed together
in the next one (each op in its own SAVEPOINT, so one failing op never aborts its neighbours). Under load many
webhooks share one fsync; when idle, a single webhook is committed at once, without waiting for a timer. Each
transaction starts with ``BEGIN IMMEDIATE``: it holds the file's write lock from its first read, so what it
reads (the token heads a claim picks) cannot change under it, whichever process writes next.

Processes that share the file (webhook and delivery roles) queue for the write lock on an ``flock`` of a
side file first. SQLite's own busy handler polls a taken lock with sleeps growing to 100 ms, so two busy
writers would hand the lock over late and unfairly; the kernel wakes the next waiter as soon as it is free.
The busy timeout stays for writers that do not take the side lock (an operator command).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from relay.errors import StoreError, StoreUnavailable
from relay.store import sqlite_schema as schema

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

_BUMP = "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?"


class GroupCommit:
    """One connection on one thread; ops queued from the event loop are committed together."""

    def __init__(self, path: Path, commit_interval: float, *, acknowledges: bool = True) -> None:
        self._path = path
        self._acknowledges = acknowledges
        self._commit_interval = commit_interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._conn: sqlite3.Connection | None = None
        self._queue: list[tuple[Op, bool, asyncio.Future[Any]]] = []
        self._op_counts: Counter[str] = Counter()  # counter changes of the op running on the store thread
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        self._opened = False
        self.commits = 0  # for benchmarks: transactions (fsyncs) so far
        self._writer_lock: int | None = None  # descriptor of the side file writers queue on (see module doc)

    def _connect(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = schema.connect(self._path, acknowledges=self._acknowledges)
        self._writer_lock = os.open(f"{self._path}-writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    async def _open_connection(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open SQLite store {self._path}: {exc}") from exc
        self._opened = True

    async def _close_connection(self) -> None:
        if self._conn is None:
            return
        while self._queue or self._draining:  # noqa: ASYNC110 - a few loop turns at close, not a poll
            await asyncio.sleep(0.005)
        conn, self._conn = self._conn, None
        await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)
        if self._writer_lock is not None:
            os.close(self._writer_lock)
            self._writer_lock = None

    async def _run_alone(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` on the store thread outside any transaction (e.g. VACUUM), once queued ops are done."""
        await self._run(lambda conn: None)

        def call() -> T:
            if self._conn is None:
                raise StoreUnavailable("store is closed")
            return work(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only ``op`` in a transaction of its own that takes no write lock: an operator command
        reading the file never holds up the writes (and the webhooks' commits) of a live relay."""
        if self._conn is None:
            raise StoreUnavailable("store is closed")

        def call() -> T:
            conn = self._conn
            if conn is None:
                raise StoreUnavailable("store is closed")
            conn.execute("BEGIN")  # deferred: a WAL snapshot, no lock against writers
            try:
                return op(conn)
            finally:
                conn.execute("COMMIT")

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    def _count(self, name: str, by: int = 1) -> None:
        """Change an end-state counter; applied once per transaction, only if the op succeeds."""
        self._op_counts[name] += by

    def _execute(self, batch: list[tuple[Op, bool]]) -> list[tuple[bool, Any]]:
        conn = self._conn
        if conn is None:
            raise StoreUnavailable("store is closed")
        results: list[tuple[bool, Any]] = []
        counts: Counter[str] = Counter()
        if self._writer_lock is not None:
            fcntl.flock(self._writer_lock, fcntl.LOCK_EX)  # released after COMMIT/ROLLBACK, below
        try:
            return self._execute_locked(conn, batch, results, counts)
        finally:
            if self._writer_lock is not None:
                fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    def _execute_locked(self, conn: sqlite3.Connection, batch: list[tuple[Op, bool]],
                        results: list[tuple[bool, Any]], counts: Counter[str]) -> list[tuple[bool, Any]]:
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
