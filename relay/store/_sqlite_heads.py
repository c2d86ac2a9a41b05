"""Token heads of the SQLite store: the one delivery of each token that may be claimed, kept indexed.

Per-device order allows at most the oldest open (pending or in-flight) delivery of a token to be sent. Finding
those heads with ``MIN(id) ... GROUP BY token`` read every open row, inside the claim's write transaction: with a
provider's backlog parked, every claim (and every webhook commit queued behind it) paid for the whole backlog.
Instead each row carries ``head = 1`` while it is its token's oldest open delivery, kept by triggers (so that
every statement that opens or ends a delivery keeps it right, whoever writes it), and a partial index holds the
pending heads by app and due time. A claim reads, for each app with free slots, the first due heads of that
app's slice of the index: what it touches is what it returns, plus one index probe per app.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping

OPEN = "('pending', 'inflight')"

# The oldest open delivery of ``token`` becomes its head (a no-op when it already is). The index is named: left
# to itself the planner takes ``deliveries_token``, which also holds the token's finished rows, so every
# delivery's end walked its token's retained history (an hour of it by default) row by row.
_PROMOTE = f"""
    UPDATE deliveries SET head = 1 WHERE id = (
        SELECT id FROM deliveries INDEXED BY deliveries_open WHERE token = {{of}} AND state IN {OPEN}
        ORDER BY id LIMIT 1
    ) AND head IS NOT 1;
"""
HEAD_SCHEMA = (
    # Claimable heads by app, then due time: a claim reads the due front of each app's slice.
    "CREATE INDEX IF NOT EXISTS deliveries_heads ON deliveries (app, next_at, id) WHERE head = 1 "
    "AND state = 'pending'",
    # A new open delivery is its token's head when the token has no older open one.
    f"""
    CREATE TRIGGER IF NOT EXISTS deliveries_head_insert AFTER INSERT ON deliveries
    WHEN NEW.state IN {OPEN} BEGIN
        UPDATE deliveries SET head = 1 WHERE id = NEW.id AND NOT EXISTS (
            SELECT 1 FROM deliveries INDEXED BY deliveries_open
            WHERE token = NEW.token AND state IN {OPEN} AND id < NEW.id);
    END
    """,
    # A delivery ends (or leaves the queue otherwise): it is no head any more, and its token's next one is.
    f"""
    CREATE TRIGGER IF NOT EXISTS deliveries_head_end AFTER UPDATE OF state ON deliveries
    WHEN OLD.state IN {OPEN} AND NEW.state NOT IN {OPEN} BEGIN
        UPDATE deliveries SET head = NULL WHERE id = NEW.id AND head IS NOT NULL;
        {_PROMOTE.format(of="OLD.token")}
    END
    """,
    # A finished delivery opened again (not done by the relay today, but then still right).
    f"""
    CREATE TRIGGER IF NOT EXISTS deliveries_head_reopen AFTER UPDATE OF state ON deliveries
    WHEN OLD.state NOT IN {OPEN} AND NEW.state IN {OPEN} BEGIN
        UPDATE deliveries SET head = NULL WHERE token = NEW.token AND head = 1 AND id > NEW.id;
        {_PROMOTE.format(of="NEW.token")}
    END
    """,
    f"""
    CREATE TRIGGER IF NOT EXISTS deliveries_head_delete AFTER DELETE ON deliveries
    WHEN OLD.state IN {OPEN} BEGIN
        {_PROMOTE.format(of="OLD.token")}
    END
    """,
)


_TRIGGERS = ("deliveries_head_insert", "deliveries_head_end", "deliveries_head_reopen", "deliveries_head_delete")


def migrate_heads(conn: sqlite3.Connection) -> None:
    """Add the head column, its index and triggers to an earlier file, and mark its current heads; the triggers
    are made again (version 7's found a token's next head through the wrong index)."""
    if "head" not in {row[1] for row in conn.execute("PRAGMA table_info(deliveries)")}:
        conn.execute("ALTER TABLE deliveries ADD COLUMN head INTEGER")
        conn.execute(
            f"UPDATE deliveries SET head = 1 WHERE id IN (SELECT MIN(id) FROM deliveries WHERE state IN {OPEN} "
            "GROUP BY token)"
        )
    for trigger in _TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for statement in HEAD_SCHEMA:
        conn.execute(statement)


# Each statement comes back in one SQLite step, whatever its rows (see relay.store._sqlite_claims; a claim that
# fetched its rows one by one held the write lock 204-350 ms for 100 rows beside a busy thread, against
# 47-53 ms: bench/claim_lock.py).

# The distinct apps of the pending heads, one index probe each (a skip scan: apps are few, heads many).
_APPS = """
    WITH RECURSIVE apps(app) AS (
        SELECT (SELECT MIN(app) FROM deliveries WHERE head = 1 AND state = 'pending')
        UNION ALL
        SELECT (SELECT MIN(app) FROM deliveries WHERE head = 1 AND state = 'pending' AND app > apps.app)
        FROM apps WHERE apps.app IS NOT NULL
    )
    SELECT json_group_array(app) FROM apps WHERE app IS NOT NULL
"""
# An app's due heads, earliest first: [[id, next_at], ...] (next_at exact: JSON's own numbers keep 15 digits).
_DUE = """
    SELECT json_group_array(json_array(id, printf('%!.17g', next_at))) FROM (
        SELECT id, next_at FROM deliveries INDEXED BY deliveries_heads
        WHERE head = 1 AND state = 'pending' AND app {match} AND next_at <= :now ORDER BY next_at, id LIMIT :take
    )
"""
_DUE_OF_APP = _DUE.format(match="= :app")
_DUE_WITHOUT_APP = _DUE.format(match="IS NULL")
_TAKE = """
    UPDATE deliveries SET state = 'inflight', owner = :owner, lease_until = :lease, wait_reason = NULL
    WHERE id IN (SELECT value FROM json_each(:ids)) AND head = 1 AND state = 'pending'
"""


def claim_heads(conn: sqlite3.Connection, *, limit: int, now: float, lease_until: float, owner: str,
                app_limits: Mapping[str, int] | None) -> list[int]:
    """Take up to ``limit`` due heads, a fair share of each app's, at most ``app_limits[app]`` of a named app
    (none at 0; an app not named, or no hint, has no cap of its own), in the caller's write transaction; the
    ids taken (in flight for ``owner`` now), in one SQLite step per statement.

    Each app's due heads are read from the front of its slice of ``deliveries_heads``, at most as many as it
    may take, so one app's parked backlog costs another app's claim nothing. When they are more than
    ``limit``, every app gets its earliest due head before any app gets its second (then its third...), as the
    Redis store's claim passes do: an app whose backlog is older than another app's new push would otherwise
    fill whole claims while it has free slots, and that push would wait for the backlog.
    """
    caps = app_limits or {}
    ranked: list[tuple[int, float, int]] = []
    for app in [None, *json.loads(conn.execute(_APPS).fetchone()[0])]:
        take = limit if app is None or app not in caps else min(limit, caps[app])
        if take <= 0:
            continue
        params = {"now": now, "take": take, "app": app}
        due = json.loads(conn.execute(_DUE_WITHOUT_APP if app is None else _DUE_OF_APP, params).fetchone()[0])
        ranked += [(rank, float(next_at), row_id) for rank, (row_id, next_at) in enumerate(due)]  # earliest first
    if not ranked:
        return []
    ids = [row_id for _, _, row_id in sorted(ranked)[:limit]]
    conn.execute(_TAKE, {"owner": owner, "lease": lease_until, "ids": json.dumps(ids)})
    return ids
