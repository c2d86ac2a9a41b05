"""Event streams of the SQLite store: resends of an event, and queued events a later one supersedes (SPEC §2).

An event has no id or time, so each stream (one push token, one agent, one topic: see
:class:`~relay.store.base.EventStream`) keeps only its last event: its body's fingerprint, until when a repeat
of it is a resend, and its delivery row. Every statement here runs inside the caller's transaction (the
enqueue's, or the retry's), so two webhook processes accepting events of one stream cannot interleave.
"""

from __future__ import annotations

import sqlite3

from relay.outcome import EndState
from relay.store.base import EventStream, Superseded

SUPERSEDED_REASON = "superseded by a later event for this token and agent"
KEEP_MARGIN = 60.0  # a stream is kept this much past its last event's deadline (that event may end a bit later)

EVENT_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS event_streams (
        key          TEXT PRIMARY KEY,  -- EventStream.key
        fingerprint  TEXT NOT NULL,     -- of the stream's last event
        dedupe_until REAL NOT NULL,     -- a repeat of it before this is a resend
        last_id      INTEGER NOT NULL,  -- deliveries.id of the last event
        keep_until   REAL NOT NULL      -- pruned after this (its last event has ended by then)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS event_streams_expiry ON event_streams (keep_until)",
)


def migrate_events(conn: sqlite3.Connection) -> None:
    """Add the stream table and each delivery's ``stream`` column to an earlier file."""
    if "stream" not in {row[1] for row in conn.execute("PRAGMA table_info(deliveries)")}:
        conn.execute("ALTER TABLE deliveries ADD COLUMN stream TEXT")  # EventStream.key of an event, else NULL
    for statement in EVENT_SCHEMA:
        conn.execute(statement)


def is_resend(conn: sqlite3.Connection, stream: EventStream, now: float) -> bool:
    """True when ``stream``'s last event has this fingerprint and its window is still open."""
    row = conn.execute("SELECT fingerprint, dedupe_until FROM event_streams WHERE key = ?", (stream.key,)).fetchone()
    return row is not None and row[0] == stream.fingerprint and now < row[1]


def follow(conn: sqlite3.Connection, stream: EventStream, row_id: int, now: float,
           expires_at: float) -> list[Superseded]:
    """Make delivery ``row_id`` its stream's last event; the previous one, if still queued, ends superseded."""
    conn.execute("UPDATE deliveries SET stream = ? WHERE id = ?", (stream.key, row_id))
    previous = conn.execute("SELECT last_id FROM event_streams WHERE key = ?", (stream.key,)).fetchone()
    conn.execute(
        "INSERT INTO event_streams (key, fingerprint, dedupe_until, last_id, keep_until) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(key) DO UPDATE SET fingerprint = excluded.fingerprint, dedupe_until = excluded.dedupe_until, "
        "last_id = excluded.last_id, keep_until = excluded.keep_until",
        (stream.key, stream.fingerprint, now + stream.window, row_id,
         max(now + stream.window, expires_at) + KEEP_MARGIN),
    )
    return [] if previous is None else end_queued(conn, previous[0], now)


def end_queued(conn: sqlite3.Connection, row_id: int, now: float) -> list[Superseded]:
    """End delivery ``row_id`` superseded if it is pending (never one in flight); its payload goes."""
    rows = conn.execute(
        "UPDATE deliveries SET state = :end, reason = :reason, finished_at = :now, wait_reason = NULL, "
        "lease_until = NULL, owner = NULL, data = x'' WHERE id = :id AND state = 'pending' "
        "RETURNING id, token, app, request_id, received_at, attempts",
        {"end": EndState.SUPERSEDED.value, "reason": SUPERSEDED_REASON, "now": now, "id": row_id},
    ).fetchall()
    for row in rows:
        conn.execute("DELETE FROM payloads WHERE id = ?", (row[0],))
    return [Superseded(str(r[0]), r[1], r[2], r[3] or "", r[4], r[5]) for r in rows]


def has_later(conn: sqlite3.Connection, row_id: int) -> bool:
    """True when delivery ``row_id`` is an event and a later event of its stream has been accepted."""
    row = conn.execute(
        "SELECT 1 FROM deliveries AS d JOIN event_streams AS s ON s.key = d.stream "
        "WHERE d.id = ? AND s.last_id > d.id", (row_id,),
    ).fetchone()
    return row is not None


def prune_streams(conn: sqlite3.Connection, now: float, limit: int) -> int:
    """Forget up to ``limit`` streams whose last event has ended (past ``keep_until``)."""
    return conn.execute(
        "DELETE FROM event_streams WHERE key IN (SELECT key FROM event_streams WHERE keep_until < ? LIMIT ?)",
        (now, limit),
    ).rowcount
