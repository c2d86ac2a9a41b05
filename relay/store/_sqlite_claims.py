"""Claimed deliveries of the SQLite store: the jobs a claim took, and the ends of a batch of them.

Both run under the write lock (the claim's transaction, or the one the outcomes share), where each statement
costs more than its SQLite work: Python's sqlite3 gives up the interpreter lock around every step (every row
fetched), and the store thread taking it back waits up to the switch interval (5 ms) whenever the event loop's
thread is running Python, while the webhooks' commits wait for the lock. So each statement here comes back in
one step whatever the number of rows: a JSON aggregate, or no rows at all (``bench/claim_lock.py``).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Sequence

from relay.outcome import EndState
from relay.store.base import Job

# A payload is in ``payloads`` (or, for a row of version 1, still in ``deliveries.data``).
DATA = "COALESCE((SELECT p.data FROM payloads AS p WHERE p.id = deliveries.id), deliveries.data)"

# Payloads in hex (JSON holds no bytes), times as 17-digit text (JSON's numbers keep 15 digits).
_JOBS = (
    "SELECT json_group_array(json_array(id, delivery_id, token, kind, hex(" + DATA + "), "
    "printf('%!.17g', received_at), printf('%!.17g', expires_at), attempts, app, request_id, message_id)) "
    "FROM deliveries WHERE id IN (SELECT value FROM json_each(?))"
)
_OWNED = ("SELECT json_group_array(id) FROM deliveries "
          "WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'inflight' AND owner = :owner")
_END = """
    UPDATE deliveries SET state = e.state, reason = e.reason, finished_at = e.at, lease_until = NULL, owner = NULL,
        wait_reason = NULL, attempts = attempts + 1,
        data = CASE WHEN e.state = 'dead_letter' THEN deliveries.data ELSE x'' END
    FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS state,
                 json_extract(value, '$[2]') AS reason, json_extract(value, '$[3]') AS at FROM json_each(:ends)) AS e
    WHERE deliveries.id = e.id AND deliveries.state = 'inflight' AND deliveries.owner = :owner
"""
_END_ONE = """
    UPDATE deliveries SET state = :state, reason = :reason, finished_at = :at, lease_until = NULL, owner = NULL,
        wait_reason = NULL, attempts = attempts + 1, data = CASE WHEN :state = 'dead_letter' THEN data ELSE x'' END
    WHERE id = :id AND state = 'inflight' AND owner = :owner
"""
_DROP = "DELETE FROM payloads WHERE id IN (SELECT value FROM json_each(?))"


def claimed_rows(conn: sqlite3.Connection, ids: Sequence[int]) -> str:
    """The rows ``ids`` as JSON text, for :func:`jobs_of` to read once the write lock is released."""
    return str(conn.execute(_JOBS, (json.dumps(ids),)).fetchone()[0])


def jobs_of(rows: str) -> list[Job]:
    """The jobs of :func:`claimed_rows`' text, in id order."""
    return sorted((Job(str(r[0]), r[1], r[2], r[3], bytes.fromhex(r[4]), float(r[5]), float(r[6]), r[7], r[8], r[9],
                       r[10]) for r in json.loads(rows)), key=lambda job: int(job.id))


def end_claims(conn: sqlite3.Connection, ends: Sequence[tuple[int, str, str, float]], owner: str) -> Counter[str]:
    """Record ``ends`` (id, end state, reason, time) in three statements, whatever their number (one end: two);
    how many deliveries went to each end state.

    Only the claim's owner records one (a late answer after a takeover changes nothing), and only a delivery's
    first end in the batch (a second changes nothing, as it would have after the first). Delivered payloads
    are dropped; dead letters keep theirs for inspection and retry.
    """
    first: dict[int, tuple[int, str, str, float]] = {}
    for end in ends:
        first.setdefault(end[0], end)
    if len(first) == 1:  # the everyday case (one send ended): two plain statements, no JSON to build and read
        row_id, state, reason, at = ends[0]
        params = {"id": row_id, "state": state, "reason": reason, "at": at, "owner": owner}
        if not conn.execute(_END_ONE, params).rowcount:
            return Counter()
        if state != EndState.DEAD_LETTER.value:
            conn.execute("DELETE FROM payloads WHERE id = ?", (row_id,))
        return Counter({state: 1})
    owned: list[int] = json.loads(conn.execute(_OWNED, {"ids": json.dumps(list(first)), "owner": owner})
                                  .fetchone()[0])
    if not owned:
        return Counter()
    conn.execute(_END, {"ends": json.dumps([first[i] for i in owned]), "owner": owner})
    conn.execute(_DROP, (json.dumps([i for i in owned if first[i][1] != EndState.DEAD_LETTER.value]),))
    return Counter(first[i][1] for i in owned)
