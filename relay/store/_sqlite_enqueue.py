"""Message deliveries of many webhooks stored in a few statements (the SQLite store's merged enqueue).

A webhook process under load commits 20-60 webhooks per transaction. Stored one by one, each took five statements
(a savepoint, its dedupe key, two inserts, the release), and Python's sqlite3 gives the interpreter lock up
around every one: the store thread then waited for the event loop's thread to hand it back, while holding the
file's write lock that every claim of the delivery processes queues for. Here the calls queued for one
transaction share one statement per table, whatever their number: a savepoint, one read of their dedupe keys,
one insert each into ``dedupe``, ``deliveries`` and ``payloads``, the release.

Only messages are merged: an event dedupes and coalesces by its stream (:mod:`._sqlite_events`), one by one.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from relay.store import sqlite_schema as schema
from relay.store.base import NewDelivery

# Rows per statement: 9 parameters a delivery stays far below SQLite's 32,766 bound parameters.
ROWS_PER_STATEMENT = 500
_DELIVERY_VALUES = "(?, ?, ?, x'', ?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True, slots=True)
class EnqueueCall:
    """One webhook's messages, as :meth:`SqliteStore.enqueue` was called with them."""

    items: Sequence[NewDelivery]
    now: float
    dedupe_window: float


def _chunks(rows: list[tuple[object, ...]]) -> list[list[tuple[object, ...]]]:
    return [rows[i:i + ROWS_PER_STATEMENT] for i in range(0, len(rows), ROWS_PER_STATEMENT)]


def _live_keys(conn: sqlite3.Connection, digests: list[bytes]) -> dict[bytes, float]:
    """Expiry of each of ``digests`` already stored, read in one step per chunk (a JSON aggregate)."""
    live: dict[bytes, float] = {}
    for start in range(0, len(digests), ROWS_PER_STATEMENT):
        chunk = digests[start:start + ROWS_PER_STATEMENT]
        marks = ", ".join("?" * len(chunk))
        text = conn.execute(
            "SELECT json_group_array(json_array(hex(key), printf('%!.17g', expires_at))) FROM dedupe "
            f"WHERE key IN ({marks})", chunk).fetchone()[0]
        live.update((bytes.fromhex(key), float(expires)) for key, expires in json.loads(text))
    return live


def insert_messages(conn: sqlite3.Connection, calls: Sequence[EnqueueCall]) -> list[list[bool]]:
    """Store the message deliveries of ``calls`` in their order; per call, a flag per item (False: its dedupe
    key was seen within the window, by a stored key or an earlier item of these calls). Ids follow the order."""
    digests = [schema.dedupe_digest(item.dedupe_key) for call in calls if call.dedupe_window > 0
               for item in call.items]
    expiry = _live_keys(conn, list(dict.fromkeys(digests))) if digests else {}
    renewed: dict[bytes, float] = {}
    flags: list[list[bool]] = []
    rows: list[tuple[object, ...]] = []
    payloads: list[bytes] = []
    for call in calls:
        accepted: list[bool] = []
        for item in call.items:
            if call.dedupe_window > 0:
                key = schema.dedupe_digest(item.dedupe_key)
                if expiry.get(key, float("-inf")) >= call.now:  # a stored key expires when it is older
                    accepted.append(False)
                    continue
                expiry[key] = renewed[key] = call.now + call.dedupe_window
            rows.append((str(uuid.uuid4()), item.token, item.kind, call.now, item.expires_at, call.now, item.app,
                         item.request_id, item.message_id))
            payloads.append(item.data)
            accepted.append(True)
        flags.append(accepted)
    keys = list(renewed.items())
    for chunk in _chunks(keys):  # type: ignore[arg-type]
        conn.execute("INSERT INTO dedupe (key, expires_at) VALUES " + ", ".join(["(?, ?)"] * len(chunk))
                     + " ON CONFLICT(key) DO UPDATE SET expires_at = excluded.expires_at",
                     [value for row in chunk for value in row])
    done = 0
    for chunk in _chunks(rows):
        last = conn.execute(
            "INSERT INTO deliveries (delivery_id, token, kind, data, received_at, expires_at, next_at, app, "
            "request_id, message_id) VALUES " + ", ".join([_DELIVERY_VALUES] * len(chunk)),
            [value for row in chunk for value in row]).lastrowid
        # AUTOINCREMENT under the write lock: one statement's rows take consecutive ids, the last one's returned.
        first = int(last or 0) - len(chunk) + 1
        data = payloads[done:done + len(chunk)]
        conn.execute("INSERT INTO payloads (id, data) VALUES " + ", ".join(["(?, ?)"] * len(chunk)),
                     [value for i, blob in enumerate(data) for value in (first + i, blob)])
        done += len(chunk)
    return flags
