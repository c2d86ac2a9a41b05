"""The device half of the SQLite store: run-time devices, dead marks, learned APNs environments, and the
device epoch with its change log that keeps every process's copy current.

Kept apart from the queue (:mod:`relay.store.sqlite`), which it shares one connection and one group commit
with: :class:`SqliteDevices` is mixed into :class:`~relay.store.sqlite.SqliteStore` and runs its statements
through the store's ``_run``.

Every change bumps ``counters.device_epoch`` and records the changed key with that epoch in
``device_changes`` (one row per key, the latest epoch wins), in the change's own transaction. A reader that
last saw epoch ``e`` reads the keys changed after ``e`` and their values now, in one snapshot; a reader more
than :data:`CHANGE_LOG_KEEP` epochs behind reads everything instead (the log keeps only that many).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from relay.config.model import ApnsEnvironment
from relay.registry.device import Device, as_environment
from relay.registry.scope import DevicePut, Removal, Scope, removal
from relay.store.base import CHANGE_LOG_KEEP, DeviceChanges

T = TypeVar("T")

DEVICE_SCHEMA = """
CREATE TABLE IF NOT EXISTS apns_environments (
    device_token TEXT PRIMARY KEY, environment TEXT NOT NULL, learned_at REAL NOT NULL
) WITHOUT ROWID
"""
# key: "d:<token>" (run-time device), "x:<token>" (dead mark), "e:<device token>" (learned environment).
CHANGES_SCHEMA = "CREATE TABLE IF NOT EXISTS device_changes (key TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID"
CHANGES_INDEX = "CREATE INDEX IF NOT EXISTS device_changes_seq ON device_changes (seq)"
_EPOCH = "SELECT value FROM counters WHERE name = 'device_epoch'"


def migrate_devices(conn: sqlite3.Connection) -> None:
    """Bring the device tables of an earlier version up to date (idempotent; inside the schema migration's
    transaction, so one statement at a time: ``executescript`` would commit it)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(devices)")}
    if "environment" not in columns:
        conn.execute("ALTER TABLE devices ADD COLUMN environment TEXT")  # NULL: the app's environment
    conn.execute(DEVICE_SCHEMA)
    conn.execute(CHANGES_SCHEMA)
    conn.execute(CHANGES_INDEX)


def _device(row: tuple[str, str, str, str | None]) -> Device:
    return Device(row[0], row[1], row[2], as_environment(row[3]))


_DEVICE_COLUMNS = "token, app, device_token, environment"


def _changed(conn: sqlite3.Connection, *keys: str) -> None:
    """Bump the device epoch and log ``keys`` under it (inside the transaction of the change itself)."""
    epoch = conn.execute("INSERT INTO counters (name, value) VALUES ('device_epoch', 1) ON CONFLICT(name) "
                         "DO UPDATE SET value = value + 1 RETURNING value").fetchone()[0]
    conn.executemany("INSERT INTO device_changes (key, seq) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                     "seq = excluded.seq", [(key, epoch) for key in keys])
    if epoch > CHANGE_LOG_KEEP:  # one old row (or none) per change: the log stays bounded
        conn.execute("DELETE FROM device_changes WHERE seq <= ?", (epoch - CHANGE_LOG_KEEP,))


def _epoch(conn: sqlite3.Connection) -> int:
    row = conn.execute(_EPOCH).fetchone()
    return 0 if row is None else int(row[0])


def _stored(conn: sqlite3.Connection, token: str) -> Device | None:
    row = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE token = ?", (token,)).fetchone()
    return None if row is None else _device(row)


def _everything(conn: sqlite3.Connection, epoch: int) -> DeviceChanges:
    devices = {row[0]: _device(row) for row in conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices")}
    dead = {row[0]: True for row in conn.execute("SELECT token FROM dead_tokens")}
    environments: dict[str, ApnsEnvironment | None] = {
        token: as_environment(value) for token, value in conn.execute("SELECT device_token, environment FROM "
                                                                      "apns_environments")}
    return DeviceChanges(epoch, True, devices, dead, environments)


def read_changes(conn: sqlite3.Connection, since: int | None) -> DeviceChanges:
    """What changed after ``since`` (see :meth:`relay.store.base.Store.device_changes`); in a read snapshot."""
    epoch = _epoch(conn)
    if since is None or since > epoch or since < epoch - CHANGE_LOG_KEEP:
        return _everything(conn, epoch)
    devices: dict[str, Device | None] = {}
    dead: dict[str, bool] = {}
    environments: dict[str, ApnsEnvironment | None] = {}
    for (key,) in conn.execute("SELECT key FROM device_changes WHERE seq > ?", (since,)).fetchall():
        kind, name = key[:2], key[2:]
        if kind == "d:":
            devices[name] = _stored(conn, name)
        elif kind == "x:":
            dead[name] = conn.execute("SELECT 1 FROM dead_tokens WHERE token = ?", (name,)).fetchone() is not None
        elif kind == "e:":
            row = conn.execute("SELECT environment FROM apns_environments WHERE device_token = ?",
                               (name,)).fetchone()
            environments[name] = None if row is None else as_environment(row[0])
    return DeviceChanges(epoch, False, devices, dead, environments)


class SqliteDevices:
    """Device operations of the SQLite store (a mixin: the store provides ``_run``)."""

    async def _run(self, op: Callable[[sqlite3.Connection], T], *, isolated: bool = True, quick: bool = False) -> T:
        raise NotImplementedError  # provided by SqliteStore: a write in the group commit

    async def _read(self, op: Callable[[sqlite3.Connection], T], *, quick: bool = False) -> T:
        raise NotImplementedError  # provided by SqliteStore: a read that takes no write lock

    async def put_device(self, device: Device, now: float, scope: Scope | None = None) -> DevicePut:
        def op(conn: sqlite3.Connection) -> DevicePut:
            stored = _stored(conn, device.token)
            decided = device if scope is None else scope.decide(device, stored)
            if not isinstance(decided, Device):
                return DevicePut(None, stored, decided)
            conn.execute(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(token) DO UPDATE SET app = excluded.app, device_token = excluded.device_token, "
                "environment = excluded.environment, updated_at = excluded.updated_at",
                (decided.token, decided.app, decided.device_token, decided.environment, now),
            )
            conn.execute("DELETE FROM dead_tokens WHERE token = ?", (decided.token,))
            _changed(conn, "d:" + decided.token, "x:" + decided.token)
            return DevicePut(decided, stored)

        return await self._run(op)

    async def remove_device(self, token: str, scope: Scope | None = None) -> Removal:
        def op(conn: sqlite3.Connection) -> Removal:
            decided = removal(_stored(conn, token), scope)
            if decided is Removal.REMOVED:
                conn.execute("DELETE FROM devices WHERE token = ?", (token,))
                _changed(conn, "d:" + token)
            return decided

        return await self._run(op)

    async def get_device(self, token: str) -> Device | None:
        return await self._read(lambda c: _stored(c, token))

    async def list_devices(self) -> list[Device]:
        rows = await self._read(
            lambda c: c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY token").fetchall()
        )
        return [_device(row) for row in rows]

    async def remember_environment(self, device_token: str, environment: ApnsEnvironment, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "INSERT INTO apns_environments (device_token, environment, learned_at) VALUES (?, ?, ?) "
                "ON CONFLICT(device_token) DO UPDATE SET environment = excluded.environment, "
                "learned_at = excluded.learned_at WHERE environment IS NOT excluded.environment RETURNING 1",
                (device_token, environment, now),
            ).fetchone()
            if row is not None:  # learned again, the same: nothing for other processes to reload
                _changed(conn, "e:" + device_token)

        await self._run(op)

    async def learned_environments(self) -> dict[str, ApnsEnvironment]:
        rows = await self._read(lambda c: c.execute("SELECT device_token, environment FROM apns_environments")
                               .fetchall())
        return {token: env for token, value in rows if (env := as_environment(value)) is not None}

    async def mark_dead(self, token: str, reason: str, now: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "INSERT INTO dead_tokens (token, reason, since) VALUES (?, ?, ?) ON CONFLICT(token) DO NOTHING "
                "RETURNING token",
                (token, reason, now),
            ).fetchone()
            if row is not None:
                _changed(conn, "x:" + token)
            return row is not None

        return await self._run(op)

    async def dead_tokens(self) -> dict[str, str]:
        rows = await self._read(lambda c: c.execute("SELECT token, reason FROM dead_tokens").fetchall())
        return dict(rows)

    async def device_epoch(self) -> int:
        return await self._read(_epoch, quick=True)

    async def device_changes(self, since: int | None) -> DeviceChanges:
        return await self._read(lambda c: read_changes(c, since))
