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

A store that acknowledges nothing (a delivery process) runs a quick op (a claim, an outcome, the device epoch
read: a few rows by key) on the event loop's own thread when nothing is queued or on the store thread and the
write lock is free at once. At everyday rates every such op found the store idle and paid two thread wake-ups
for a transaction of a few dozen microseconds, which cost more CPU than the transaction (``bench/README.md``).
The loop never waits for a lock: a taken ``flock``, or SQLite's lock held by an operator command, sends the op
to the store thread, where it waits as before. Nor does it take work the store thread does better: once the
loop's thread used more than ``INLINE_BUSY_LIMIT`` of a core over the last ``INLINE_WINDOW`` (a drain, a
saturating load), ops go to the store thread, whose SQLite work then runs beside the loop on another core and
many ops share a transaction. An acknowledging store never runs inline: its commit is an fsync.

Ops of one kind queued for one transaction may be merged into one call (``_run_merged``: many sends' outcomes,
many webhooks' messages): each statement costs the store thread a wait for the interpreter lock, taken back from
the loop's thread, while it holds the write lock. A merged item runs where its call was queued, maybe before ops
queued after it, unless ``adjacent``: it joins only a call queued last (a message stays before a later event).

A store that acknowledges nothing (a delivery process: ``synchronous=NORMAL``) does not fsync its commits; it
syncs the WAL file once, ``SYNC_WITHIN`` seconds after the first commit that is not yet synced (so at most once
a second, and only while there is something to sync). In WAL mode a commit is durable once the WAL's frames
are on disk: ``synchronous=FULL`` fsyncs the WAL at every commit, ``NORMAL`` only at checkpoints; an fsync of
the WAL file, without a checkpoint, is what FULL would have done, late.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from relay.errors import StoreError, StoreUnavailable
from relay.observability import event
from relay.store import sqlite_schema as schema

T = TypeVar("T")
Item = TypeVar("Item")
Op = Callable[[sqlite3.Connection], Any]

SYNC_WITHIN = 1.0  # seconds: the longest a non-acknowledging store's commit stays unsynced
INLINE_WINDOW = 0.1  # seconds over which the loop thread's CPU share is measured
INLINE_BUSY_LIMIT = 0.5  # the share of a core above which quick ops go to the store thread for the next window
# Every counter a transaction changed, in one statement (one SQLite step): ``?`` is a JSON object name -> change.
_BUMP = ("INSERT INTO counters (name, value) SELECT key, value FROM json_each(?) WHERE true "
         "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value")


class GroupCommit:
    """One connection on one thread; ops queued from the event loop are committed together."""

    def __init__(self, path: Path, commit_interval: float, *, acknowledges: bool = True) -> None:
        self._path = path
        self._acknowledges = acknowledges
        self._commit_interval = commit_interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._conn: sqlite3.Connection | None = None
        self._queue: list[tuple[Op, bool, asyncio.Future[Any]]] = []
        self._merging: dict[str, tuple[list[Any], asyncio.Future[Any]]] = {}  # key -> items of a queued op
        self._op_counts: Counter[str] = Counter()  # counter changes of the op running on the store thread
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        self._opened = False
        self.commits = 0  # for benchmarks: transactions (fsyncs) so far
        self._writer_lock: int | None = None  # descriptor of the side file writers queue on (see module doc)
        self.unsynced = 0  # commits not fsynced yet (a store that does not acknowledge webhooks)
        self.syncs = 0  # fsyncs of the WAL made for them
        self._sync_timer: asyncio.TimerHandle | None = None
        self._inline = not acknowledges  # quick ops may run on the loop's thread (see module doc)
        self._on_thread = 0  # calls given to the store thread and not finished (guarded by _thread_lock)
        self._thread_lock = threading.Lock()
        self.inline_ops = 0  # for tests and benchmarks: ops run on the loop's thread so far
        self._window: tuple[float, float] | None = None  # (monotonic, thread CPU) where the window began
        self._loop_has_time = True

    def _to_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on the store thread, counted so that an inline op never shares the connection with it."""
        with self._thread_lock:
            self._on_thread += 1

        def call() -> T:
            try:
                return fn(*args)
            finally:
                self._thread_done()

        submitted = self._executor.submit(call)
        submitted.add_done_callback(lambda f: self._thread_done() if f.cancelled() else None)  # never ran
        return asyncio.wrap_future(submitted)

    def _thread_done(self) -> None:
        with self._thread_lock:
            self._on_thread -= 1

    def _idle(self) -> bool:
        """Whether a quick op may run inline: nothing queued, nothing on the store thread, and the loop's
        thread has time to spare (called on that thread)."""
        return (self._inline and self._conn is not None and not self._queue and not self._draining
                and self._on_thread == 0 and self._spare_time())

    def _spare_time(self) -> bool:
        """Whether the loop's thread used at most ``INLINE_BUSY_LIMIT`` of a core in the last window."""
        now = time.monotonic()
        if self._window is None:
            self._window = (now, time.thread_time())
        elif now - self._window[0] >= INLINE_WINDOW:
            used = time.thread_time()
            self._loop_has_time = (used - self._window[1]) / (now - self._window[0]) <= INLINE_BUSY_LIMIT
            self._window = (now, used)
        return self._loop_has_time

    def _connect(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(schema.writer_lock_path(self._path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._conn = schema.connect(self._path, acknowledges=self._acknowledges, writer_lock=lock)
        except BaseException:
            os.close(lock)
            raise
        self._writer_lock = lock

    async def _open_connection(self) -> None:
        try:
            await self._to_thread(self._connect)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open SQLite store {self._path}: {exc}") from exc
        self._opened = True

    async def _close_connection(self) -> None:
        if self._conn is None:
            return
        while self._queue or self._draining:  # noqa: ASYNC110 - a few loop turns at close, not a poll
            await asyncio.sleep(0.005)
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self.unsynced:  # closing does not sync a WAL that another connection keeps open
            await self._to_thread(self._sync)
        conn, self._conn = self._conn, None
        await self._to_thread(conn.close)
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
            if self._writer_lock is None:
                return work(self._conn)
            with schema.writer_locked(self._writer_lock):  # e.g. a VACUUM: after the other processes' commits
                return work(self._conn)

        return await self._to_thread(call)

    async def _read(self, op: Callable[[sqlite3.Connection], T], *, quick: bool = False) -> T:
        """Run a read-only ``op`` in a transaction of its own that takes no write lock: an operator command
        reading the file never holds up the writes (and the webhooks' commits) of a live relay. A ``quick``
        one (a few rows by key) may run inline (see the module doc)."""
        if self._conn is None:
            raise StoreUnavailable("store is closed")
        if quick and self._idle():
            try:
                done = self._try_read_inline(self._conn, op)
            except (sqlite3.Error, OSError) as exc:
                raise StoreUnavailable(f"sqlite: {exc}") from exc
            if done is not None:
                return done[0]
        if self._queue:
            # Writes are waiting for the next transaction (the dispatcher's claim): read in it, after them, for
            # the cost of a savepoint instead of a thread hop of its own. It takes no lock they do not take.
            return await self._run(op)

        def call() -> T:
            conn = self._conn
            if conn is None:
                raise StoreUnavailable("store is closed")
            return self._read_now(conn, op)

        try:
            return await self._to_thread(call)
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    def _try_read_inline(self, conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], T]) -> tuple[T] | None:
        """``op`` read on this (the loop's) thread, or None when SQLite would make it wait (a reader waits only
        while another connection recovers the WAL after a crash)."""
        if not schema.begin_at_once(conn, "BEGIN"):
            return None
        self.inline_ops += 1
        try:
            return (op(conn),)
        finally:
            conn.execute("COMMIT")

    @staticmethod
    def _read_now(conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN")  # deferred: a WAL snapshot, no lock against writers
        try:
            return op(conn)
        finally:
            conn.execute("COMMIT")

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
            conn.execute("BEGIN IMMEDIATE")
            return self._in_transaction(conn, batch, results, counts)
        finally:
            if self._writer_lock is not None:
                fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    def _in_transaction(self, conn: sqlite3.Connection, batch: list[tuple[Op, bool]],
                        results: list[tuple[bool, Any]], counts: Counter[str]) -> list[tuple[bool, Any]]:
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
            if changed := {name: by for name, by in counts.items() if by}:
                conn.execute(_BUMP, (json.dumps(changed),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        if not self._acknowledges:
            self.unsynced += 1
        return results

    def _sync(self) -> None:
        """fsync the WAL file (on the store thread, between transactions): every commit so far is durable."""
        synced = self.unsynced
        wal = f"{self._path}-wal"
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # the last connection closed: SQLite checkpointed (and synced) and removed it
            self.unsynced -= synced
            return
        try:
            os.fsync(fd)
        except OSError as exc:  # tried again a SYNC_WITHIN later (see _sync_due)
            event(logging.WARNING, "could not sync the store's WAL file", path=wal, error=str(exc))
            return
        finally:
            os.close(fd)
        self.unsynced -= synced
        self.syncs += 1

    def _schedule_sync(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sync within ``SYNC_WITHIN`` of the first unsynced commit; one timer at a time (at most one sync a
        ``SYNC_WITHIN``)."""
        if self.unsynced and self._sync_timer is None and self._conn is not None:
            self._sync_timer = loop.call_later(SYNC_WITHIN, self._sync_due, loop)

    def _sync_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sync_timer = None
        if self._conn is None or not self.unsynced:
            return
        done = self._to_thread(self._sync)
        # Commits made meanwhile (or a sync that failed) get the next one, a SYNC_WITHIN later.
        done.add_done_callback(lambda _: self._schedule_sync(loop))

    def _try_inline(self, op: Op, isolated: bool) -> tuple[bool, Any] | None:
        """``op`` in a transaction of its own on this (the loop's) thread, or None when the write lock is taken:
        neither the relay's ``flock`` nor SQLite's lock (an operator command) is waited for here."""
        conn = self._conn
        assert conn is not None  # _idle() said so
        if self._writer_lock is not None:
            try:
                fcntl.flock(self._writer_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
        try:
            if not schema.begin_at_once(conn, "BEGIN IMMEDIATE"):
                return None
            self.inline_ops += 1
            return self._in_transaction(conn, [(op, isolated)], [], Counter())[0]
        finally:
            if self._writer_lock is not None:
                fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    async def _run(self, op: Callable[[sqlite3.Connection], T], *, isolated: bool = True, quick: bool = False) -> T:
        """Queue ``op`` for the next transaction; ``isolated`` ops run in a savepoint of their own, ``quick``
        ones (a few rows by key) may run inline when the store is idle (see the module doc)."""
        if self._conn is None and self._opened:
            raise StoreUnavailable("store is closed")
        if quick and self._idle():
            done = self._run_inline(op, isolated)
            if done is not None:
                return done[0]
        return await self._enqueue(op, isolated)

    async def _run_merged(self, key: str, item: Item,
                          op: Callable[[sqlite3.Connection, list[Item]], Sequence[T | StoreError]], *,
                          adjacent: bool = False) -> T:
        """Queue ``item`` for one call of ``op`` (quick, not isolated; see the module doc) with the items queued
        under ``key`` for the same transaction; ``op`` returns one result per item (a StoreError is raised)."""
        if self._conn is None and self._opened:
            raise StoreUnavailable("store is closed")
        done = self._run_inline(lambda conn: op(conn, [item]), False) if self._idle() else None
        if done is not None:
            results, index = done[0], 0
        else:
            queued = self._merging.get(key)
            if queued is None or (adjacent and self._queue[-1][2] is not queued[1]):
                items = [item]
                future = self._enqueue(lambda conn: op(conn, items), False)
                self._merging[key] = (items, future)
            else:
                items, future = queued
                items.append(item)
            index = len(items) - 1
            results = await asyncio.shield(future)  # shielded: one caller cancelled must not fail the others
        result = results[index]
        if isinstance(result, StoreError):
            raise result
        return result

    def _run_inline(self, op: Callable[[sqlite3.Connection], T], isolated: bool) -> tuple[T] | None:
        """``op``'s result if it ran on this thread (:meth:`_try_inline`); None: it must be queued."""
        try:
            done = self._try_inline(op, isolated)
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc
        if done is None:
            return None
        self._schedule_sync(asyncio.get_running_loop())
        ok, value = done
        if ok:
            return (value,)
        raise value if isinstance(value, StoreError) else StoreError(str(value))

    def _enqueue(self, op: Callable[[sqlite3.Connection], T], isolated: bool) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((op, isolated, future))
        if not self._draining:
            self._draining = True
            self._drain_task = loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            # One loop turn first: ops that the callbacks and tasks woken in this turn queue (a delivery's
            # outcome, then the dispatcher's next claim) join this transaction instead of waiting for the next.
            await asyncio.sleep(0)
            while self._queue:
                if self._commit_interval:
                    await asyncio.sleep(self._commit_interval)
                batch, self._queue = self._queue, []
                self._merging.clear()  # what is merged from now on goes to the next transaction
                try:
                    results = await self._to_thread(self._execute, [(op, isolated) for op, isolated, _ in batch])
                except (sqlite3.Error, OSError, StoreError, RuntimeError) as exc:
                    error = exc if isinstance(exc, StoreError) else StoreUnavailable(f"sqlite: {exc}")
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                self._schedule_sync(loop)
                for (_, _, future), (ok, value) in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value if isinstance(value, StoreError) else StoreError(str(value)))
        finally:
            self._draining = False

