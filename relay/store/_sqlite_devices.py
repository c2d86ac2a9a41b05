"""The device half of the SQLite store: run-time devices and learned APNs environments.

Kept apart from the queue (:mod:`relay.store.sqlite`), which it shares one connection and one group commit
with: :class:`SqliteDevices` is mixed into :class:`~relay.store.sqlite.SqliteStore` and runs its statements
through the store's ``_run``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from relay.config.model import ApnsEnvironment
from relay.registry.device import Device, as_environment

T = TypeVar("T")

DEVICE_SCHEMA = """
CREATE TABLE IF NOT EXISTS apns_environments (
    device_token TEXT PRIMARY KEY, environment TEXT NOT NULL, learned_at REAL NOT NULL
) WITHOUT ROWID
"""


def migrate_devices(conn: sqlite3.Connection) -> None:
    """Bring the device tables of an earlier version up to date (idempotent; inside the schema migration's
    transaction, so one statement at a time: ``executescript`` would commit it)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(devices)")}
    if "environment" not in columns:
        conn.execute("ALTER TABLE devices ADD COLUMN environment TEXT")  # NULL: the app's environment
    conn.execute(DEVICE_SCHEMA)


def _device(row: tuple[str, str, str, str | None]) -> Device:
    return Device(row[0], row[1], row[2], as_environment(row[3]))


_DEVICE_COLUMNS = "token, app, device_token, environment"


class SqliteDevices:
    """Device operations of the SQLite store (a mixin: the store provides ``_run``)."""

    async def _run(self, op: Callable[[sqlite3.Connection], T], *, isolated: bool = True) -> T:
        raise NotImplementedError  # provided by SqliteStore: a write in the group commit

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError  # provided by SqliteStore: a read that takes no write lock

    async def put_device(self, device: Device, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(token) DO UPDATE SET app = excluded.app, device_token = excluded.device_token, "
                "environment = excluded.environment, updated_at = excluded.updated_at",
                (device.token, device.app, device.device_token, device.environment, now),
            )
            conn.execute("DELETE FROM dead_tokens WHERE token = ?", (device.token,))

        await self._run(op)

    async def remove_device(self, token: str) -> bool:
        return bool(await self._run(lambda c: c.execute("DELETE FROM devices WHERE token = ?", (token,)).rowcount))

    async def get_device(self, token: str) -> Device | None:
        row = await self._read(
            lambda c: c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE token = ?", (token,)).fetchone()
        )
        return None if row is None else _device(row)

    async def list_devices(self) -> list[Device]:
        rows = await self._read(
            lambda c: c.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY token").fetchall()
        )
        return [_device(row) for row in rows]

    async def remember_environment(self, device_token: str, environment: ApnsEnvironment, now: float) -> None:
        await self._run(lambda c: c.execute(
            "INSERT INTO apns_environments (device_token, environment, learned_at) VALUES (?, ?, ?) "
            "ON CONFLICT(device_token) DO UPDATE SET environment = excluded.environment, "
            "learned_at = excluded.learned_at",
            (device_token, environment, now),
        ))

    async def learned_environments(self) -> dict[str, ApnsEnvironment]:
        rows = await self._read(lambda c: c.execute("SELECT device_token, environment FROM apns_environments")
                               .fetchall())
        return {token: env for token, value in rows if (env := as_environment(value)) is not None}
