"""Message deliveries of many webhooks stored in a few statements (the SQLite store's merged enqueue).

A webhook process under load commits 20-60 webhooks per transaction. Stored one by one, each took five statements
(a savepoint, its dedupe key, two inserts, the release), and Python's sqlite3 gives the interpreter lock up
around every one: the store thread then waited for the event loop's thread to hand it back, while holding the
file's write lock that every claim of the delivery processes queues for. Here the calls queued for one
transaction share one statement per table, whatever their number: a savepoint, one read of their dedupe keys,
one insert each into ``dedupe``, ``deliveries`` and ``payloads``, the release.

Each statement's text is the same whatever the number of rows: the rows come as one JSON array, the blobs
(dedupe digests, payloads) as one concatenated blob cut by ``substr``. A ``VALUES`` list per row count made a
new statement for each size, and its preparation (about 100 µs for 30 rows, another release of the interpreter
lock) pushed the others out of sqlite3's statement cache.

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

_DIGEST = 16  # bytes of a dedupe key as stored (schema.dedupe_digest)
# ``:keys`` holds the digests back to back; ``json_each(:each)`` counts them (its ``key`` is the index).
_KEY = f"substr(:keys, {_DIGEST} * key + 1, {_DIGEST})"
_LIVE = f"""SELECT json_group_array(json_array(hex(key), printf('%!.17g', expires_at))) FROM dedupe
    WHERE key IN (SELECT {_KEY} FROM json_each(:each))"""
_RENEW = f"""INSERT INTO dedupe (key, expires_at) SELECT {_KEY}, value FROM json_each(:each) WHERE true
    ON CONFLICT(key) DO UPDATE SET expires_at = excluded.expires_at"""
# One row per element of ``:rows``, in its order (AUTOINCREMENT under the write lock: consecutive ids).
_DELIVERIES = """INSERT INTO deliveries (delivery_id, token, kind, data, received_at, expires_at, next_at, app,
    request_id, message_id)
    SELECT value->>0, value->>1, value->>2, x'', value->>3, value->>4, value->>3, value->>5, value->>6, value->>7
    FROM json_each(:rows) ORDER BY key"""
# ``:data`` holds the payloads back to back; ``:spans`` each one's [start (1-based), length].
_PAYLOADS = """INSERT INTO payloads (id, data)
    SELECT :first + key, substr(:data, value->>0, value->>1) FROM json_each(:spans)"""


@dataclass(frozen=True, slots=True)
class EnqueueCall:
    """One webhook's messages, as :meth:`SqliteStore.enqueue` was called with them."""

    items: Sequence[NewDelivery]
    now: float
    dedupe_window: float


def _live_keys(conn: sqlite3.Connection, digests: list[bytes]) -> dict[bytes, float]:
    """Expiry of each of ``digests`` already stored, read in one step (a JSON aggregate)."""
    text = conn.execute(_LIVE, {"keys": b"".join(digests), "each": json.dumps([0] * len(digests))}).fetchone()[0]
    return {bytes.fromhex(key): float(expires) for key, expires in json.loads(text)}


def insert_messages(conn: sqlite3.Connection, calls: Sequence[EnqueueCall]) -> list[list[bool]]:
    """Store the message deliveries of ``calls`` in their order; per call, a flag per item (False: its dedupe
    key was seen within the window, by a stored key or an earlier item of these calls). Ids follow the order."""
    keys = [[schema.dedupe_digest(item.dedupe_key) for item in call.items] if call.dedupe_window > 0 else []
            for call in calls]
    digests = list(dict.fromkeys(key for call_keys in keys for key in call_keys))
    expiry = _live_keys(conn, digests) if digests else {}
    renewed: dict[bytes, float] = {}
    flags: list[list[bool]] = []
    rows: list[tuple[object, ...]] = []
    payloads: list[bytes] = []
    for call, call_keys in zip(calls, keys, strict=True):
        accepted: list[bool] = []
        for n, item in enumerate(call.items):
            if call_keys:
                key = call_keys[n]
                if expiry.get(key, float("-inf")) >= call.now:  # a stored key expires when it is older
                    accepted.append(False)
                    continue
                expiry[key] = renewed[key] = call.now + call.dedupe_window
            rows.append((str(uuid.uuid4()), item.token, item.kind, call.now, item.expires_at, item.app,
                         item.request_id, item.message_id))
            payloads.append(item.data)
            accepted.append(True)
        flags.append(accepted)
    if renewed:
        conn.execute(_RENEW, {"keys": b"".join(renewed), "each": json.dumps(list(renewed.values()))})
    if rows:
        # Raw text, not \u escapes: a string sqlite3 cannot bind as UTF-8 (a lone surrogate) fails this statement,
        # and the call alone; escaped, SQLite would store bytes no reader can decode, and every claim would fail.
        last = conn.execute(_DELIVERIES, {"rows": json.dumps(rows, ensure_ascii=False)}).lastrowid
        spans, start = [], 1
        for blob in payloads:
            spans.append((start, len(blob)))
            start += len(blob)
        conn.execute(_PAYLOADS, {"first": int(last or 0) - len(rows) + 1, "data": b"".join(payloads),
                                 "spans": json.dumps(spans)})
    return flags
