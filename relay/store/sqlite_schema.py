"""The SQLite store's file: schema, migrations, and who owns a claim.

A store file is opened by every role and every operator command, so opening writes nothing once the schema is
current (``user_version``). Claims carry an owner, ``host|pid|process start|instance``, so that a delivering
process starting up can tell a crashed owner from a live one (see :func:`owner_gone`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from relay.errors import StoreUnavailable
from relay.store._sqlite_devices import migrate_devices
from relay.store._sqlite_events import migrate_events
from relay.store._sqlite_heads import migrate_heads

# 3: devices.environment and apns_environments (relay.store._sqlite_devices); 4: app_open; 5: device_changes
# 6: event streams and deliveries.stream (relay.store._sqlite_events); `superseded` is a done state
# 7: token heads kept indexed (relay.store._sqlite_heads); dedupe keys stored as 16-byte digests
# 8: the head triggers find a token's next head in deliveries_open (not by walking its finished rows)
SCHEMA_VERSION = 8
BUSY_TIMEOUT_MS = 5000  # how long a writer outside the relay's flock (an operator command) is waited for
OPEN_RETRY = 30.0  # seconds a start keeps retrying what SQLite refuses at once (a lock it will not wait for)

_DEDUPE = "CREATE TABLE IF NOT EXISTS dedupe (key BLOB PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID"
# The columns past ``finished_at`` were added by version 2; a migrated file has them in this order too.
_TABLES = (
    """
    CREATE TABLE IF NOT EXISTS deliveries (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order: per-token ordering follows it
        delivery_id TEXT NOT NULL,                      -- stable id for the delivery's whole life (apns-id)
        token       TEXT NOT NULL,
        kind        TEXT NOT NULL,
        data        BLOB NOT NULL,                      -- version 1's payload; x'' since (see payloads)
        received_at REAL NOT NULL,
        expires_at  REAL NOT NULL,
        state       TEXT NOT NULL DEFAULT 'pending',    -- pending | inflight | <EndState>
        attempts    INTEGER NOT NULL DEFAULT 0,
        next_at     REAL NOT NULL,
        lease_until REAL,                               -- inflight: another process may take it after this
        reason      TEXT,                               -- the provider's words, or the end reason
        finished_at REAL,
        app         TEXT,                               -- the app hint (per-app claim limits)
        wait_reason TEXT,                               -- pending after a retry: a WaitReason value
        owner       TEXT,                               -- inflight: host|pid|start|instance of the claimer
        request_id  TEXT NOT NULL DEFAULT '',
        message_id  TEXT
    )
    """,
    # Payloads apart from the rows: a delivery's row shrinks little when it ends, but its payload (most of its
    # bytes) goes whole, so pages empty out and are reused (or given back) instead of staying two-thirds holes.
    "CREATE TABLE IF NOT EXISTS payloads (id INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    # A dedupe key is kept as its 16-byte digest (:func:`dedupe_digest`): a fixed ~30 bytes a key instead of
    # the key's text (a message id and a 64-character token), in the table and again in its expiry index.
    _DEDUPE,
    """
    CREATE TABLE IF NOT EXISTS devices (
        token TEXT PRIMARY KEY, app TEXT NOT NULL, device_token TEXT NOT NULL, updated_at REAL NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS dead_tokens (
        token TEXT PRIMARY KEY, reason TEXT NOT NULL, since REAL NOT NULL
    ) WITHOUT ROWID
    """,
    # Totals survive the pruning of old finished rows, so the stats invariant holds forever.
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
)
_ADDED_COLUMNS = {
    "app": "TEXT", "wait_reason": "TEXT", "owner": "TEXT", "request_id": "TEXT NOT NULL DEFAULT ''",
    "message_id": "TEXT",
}
# End states that drop their payload and get pruned.
DONE_STATES = "('sent', 'expired', 'token_dead', 'unroutable', 'superseded')"
_INDEXES = (
    # A token's open deliveries in order: its next head when one ends (relay.store._sqlite_heads).
    "CREATE INDEX IF NOT EXISTS deliveries_open ON deliveries (token, id) WHERE state IN ('pending', 'inflight')",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_at) WHERE state = 'pending'",
    # Each app's oldest waiting delivery (the status endpoint, `stats`): one seek per app.
    "CREATE INDEX IF NOT EXISTS deliveries_app_open ON deliveries (app, id) WHERE state IN ('pending', 'inflight')",
    # Lease expiry (every claim) and recovery look only at what is in flight.
    "CREATE INDEX IF NOT EXISTS deliveries_lease ON deliveries (lease_until, owner) WHERE state = 'inflight'",
    f"CREATE INDEX IF NOT EXISTS deliveries_done ON deliveries (finished_at) WHERE state IN {DONE_STATES}",
    "CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (id) WHERE state = 'dead_letter'",
    # Tracing (``deliveries``): newest first by token, request or message.
    "CREATE INDEX IF NOT EXISTS deliveries_token ON deliveries (token)",
    "CREATE INDEX IF NOT EXISTS deliveries_request ON deliveries (request_id)",
    "CREATE INDEX IF NOT EXISTS deliveries_message ON deliveries (message_id) WHERE message_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS dedupe_expiry ON dedupe (expires_at)",
)
# Version 1 parked deliveries with a word in ``reason``; version 2 types it in ``wait_reason``.
_TYPE_OLD_WAITS = """
    UPDATE deliveries SET wait_reason = CASE reason WHEN 'unroutable' THEN 'unroutable'
        WHEN 'config_error' THEN 'config_error' WHEN 'circuit_open' THEN 'circuit_open' ELSE 'retry' END
    WHERE state = 'pending' AND reason IS NOT NULL AND wait_reason IS NULL
"""


def dedupe_digest(key: str) -> bytes:
    """What the ``dedupe`` table stores for a key: its 16-byte BLAKE2b digest (collisions: ~2^-64 at 10^10 keys)."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def writer_lock_path(path: os.PathLike[str]) -> str:
    """The side file whose ``flock`` writers (and openers) of ``path`` queue on (see :mod:`.sqlite_commit`)."""
    return f"{os.fspath(path)}-writer"


@contextmanager
def writer_locked(fd: int) -> Iterator[None]:
    """Hold the writers' ``flock`` (the kernel queues the processes that wait for it)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def connect(path: os.PathLike[str], *, acknowledges: bool = True, writer_lock: int | None = None) -> sqlite3.Connection:
    """Open the file (creating it with incremental auto-vacuum) and bring its schema up to date.

    ``acknowledges``: this connection's commits are what a webhook's ``200`` promises, so each one is fsynced.
    A delivery process's commits (claims, outcomes) promise nothing to Parley: losing the last of them to a
    power cut only sends a push again (at least once), so they skip the fsync; the store syncs the WAL within a
    second of such a commit instead (:mod:`.sqlite_commit`), and the next acknowledging commit's fsync covers
    them too. The write lock, which the webhooks' group commit waits for, is not held across that fsync.

    Opening takes the writers' ``flock`` (``writer_lock``, or the side file's): processes starting together
    (the roles of one relay) switch the journal mode and migrate one after the other, never into each other;
    what SQLite still refuses at once instead of waiting for ``busy_timeout`` (a journal-mode switch or a lock
    upgrade it declines to avoid a deadlock, against a process outside the relay) is tried again for up to
    ``OPEN_RETRY`` seconds.
    """
    fd = writer_lock if writer_lock is not None else os.open(
        writer_lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + OPEN_RETRY
        delay = 0.01
        while True:
            try:
                with writer_locked(fd):
                    return _open(path, acknowledges)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
    finally:
        if writer_lock is None:
            os.close(fd)


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, in any of their extended forms."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)) if isinstance(code, int) else (
        "locked" in str(exc) or "busy" in str(exc))


def _open(path: os.PathLike[str], acknowledges: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        # Several processes (roles, operator commands) share the file: wait for the write lock, do not fail.
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # Only takes effect on a file without tables: new files can give space back (see ``prune``).
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged webhook survives power loss.
        conn.execute("PRAGMA synchronous=FULL" if acknowledges else "PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA journal_size_limit=67108864")  # a WAL grown by a burst is cut back to 64 MiB
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_read_only(path: Path) -> sqlite3.Connection:
    """Open an existing file for reading only (``mode=ro``): an operator command that only reads never
    creates a store where a path was mistyped, nor migrates one. Raises :class:`StoreUnavailable` when
    there is no file (or no relay schema in it)."""
    if not path.is_file():
        raise StoreUnavailable(f"no store at {path}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except BaseException:
        conn.close()
        raise
    if version == 0:
        conn.close()
        raise StoreUnavailable(f"no store at {path} (a file, but no parley-relay tables in it)")
    if version < SCHEMA_VERSION:
        conn.close()
        raise StoreUnavailable(f"the store at {path} has schema version {version}: start the relay (or any "
                               f"command that writes) once to upgrade it to {SCHEMA_VERSION}")
    return conn


def prepare(path: os.PathLike[str]) -> None:
    """Create or migrate the file once, before the processes that share it start (the supervisor's job)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    connect(path).close()


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")  # two processes opening an old file at once: one migrates, one sees it done
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            _migrate_dedupe(conn)
            for statement in _TABLES:
                conn.execute(statement)
            have = {row[1] for row in conn.execute("PRAGMA table_info(deliveries)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    conn.execute(f"ALTER TABLE deliveries ADD COLUMN {column} {kind}")
            conn.execute("DROP INDEX IF EXISTS deliveries_ended")  # version 1's, replaced by the two below
            conn.execute("DROP INDEX IF EXISTS deliveries_done")  # made again below: its DONE_STATES grew in 4
            for statement in _INDEXES:
                conn.execute(statement)
            conn.execute(_TYPE_OLD_WAITS)
            migrate_devices(conn)
            migrate_events(conn)
            migrate_heads(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _migrate_dedupe(conn: sqlite3.Connection) -> None:
    """Version 6 and earlier kept dedupe keys as text: keep each live key, as its digest."""
    columns = {row[1]: row[2] for row in conn.execute("PRAGMA table_info(dedupe)")}
    if columns.get("key", "BLOB").upper() == "BLOB":
        return
    conn.create_function("relay_dedupe_digest", 1, dedupe_digest, deterministic=True)
    conn.execute("DROP INDEX IF EXISTS dedupe_expiry")
    conn.execute("ALTER TABLE dedupe RENAME TO dedupe_text")
    conn.execute(_DEDUPE)
    conn.execute("INSERT OR REPLACE INTO dedupe (key, expires_at) "
                 "SELECT relay_dedupe_digest(key), expires_at FROM dedupe_text ORDER BY expires_at")
    conn.execute("DROP TABLE dedupe_text")


def needs_vacuum(conn: sqlite3.Connection) -> bool:
    """True for a file made before incremental auto-vacuum (it can only grow until it is rebuilt once)."""
    return int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2  # 2 = INCREMENTAL


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the file in use (what a VACUUM copies)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int(pages) * int(conn.execute("PRAGMA page_size").fetchone()[0])


def vacuum_into_incremental(conn: sqlite3.Connection) -> bool:
    """Rebuild the file once with incremental auto-vacuum (VACUUM runs outside any transaction); False when
    another process did it meanwhile (the caller holds the writers' lock, so the answer is current)."""
    if not needs_vacuum(conn):
        return False
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("VACUUM")
    return True


# -- owners ----------------------------------------------------------------------------------------------


def _start_of(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None when there is no such process.

    Comparing start times, not only pids, tells a restarted relay (a container's pid 1 again, a reused pid)
    from the process that made the claim.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        pass
    try:  # no /proc (not Linux): the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "-"


_HOST = socket.gethostname()
_STARTS: dict[int, str] = {}  # this process's start time, by pid (a forked child has its own)
LIVE: set[str] = set()  # owners of the stores open in this process


def _me() -> tuple[int, str]:
    pid = os.getpid()
    if pid not in _STARTS:
        _STARTS[pid] = _start_of(pid) or "-"
    return pid, _STARTS[pid]


def new_owner() -> str:
    """A fresh owner for one store instance of this process."""
    pid, start = _me()
    return f"{_HOST}|{pid}|{start}|{uuid.uuid4().hex[:12]}"


def owner_gone(owner: str | None) -> bool:
    """True when the process that made a claim is certainly gone; False when it lives or cannot be known.

    On another host only the lease can tell (``claim`` takes over expired leases). A claim without an owner
    was made by version 1, which ran alone: a delivering process starting up means it is gone.
    """
    if not owner:
        return True
    host, pid, start, _instance = [*owner.split("|"), "", "", "", ""][:4]
    if host != _HOST or not pid.isdigit():
        return False
    if (int(pid), start) == _me():
        return owner not in LIVE
    return _start_of(int(pid)) != start


def begin_at_once(conn: sqlite3.Connection, begin: str) -> bool:
    """Run ``begin`` (a BEGIN statement) unless SQLite would wait for a lock first: False then, at once,
    instead of after the busy timeout (this runs on the event loop's thread)."""
    conn.execute("PRAGMA busy_timeout=0")
    try:
        conn.execute(begin)
    except sqlite3.OperationalError as exc:
        if is_busy(exc):
            return False
        raise
    finally:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return True
