"""Storage stage: the durable queue of deliveries, the device overlay, dedupe keys and dead letters.

One :class:`~relay.store.base.Store` protocol, two implementations: SQLite (embedded default) and Redis
(scale-out). :func:`open_store` picks one from the configuration.
"""

from __future__ import annotations

from relay.config import StoreSettings
from relay.store.base import DeadLetter, DeliveryRecord, Job, NewDelivery, Pruned, Stats, Store


def create_store(settings: StoreSettings, *, acknowledges: bool = True, read_only: bool = False) -> Store:
    """The store the settings name (not yet opened).

    ``acknowledges=False``: for a process that never answers a webhook (a delivery process), whose writes
    need not be durable on their own (see :func:`relay.store.sqlite_schema.connect`). ``read_only``: for an
    operator command that only reads; opening fails with "no store at PATH" instead of creating one (a Redis
    store's ``open`` only connects anyway).
    """
    if settings.backend == "redis":
        from relay.store.redis import RedisStore

        return RedisStore(settings)
    from relay.store.sqlite import SqliteStore

    return SqliteStore(settings, acknowledges=acknowledges, read_only=read_only)


def prepare_store(settings: StoreSettings) -> str | None:
    """Create or migrate a SQLite file once, before the processes that share it start (they would otherwise all
    switch its journal mode and migrate it at the same moment); why it cannot be opened, or None. Blocking."""
    if settings.backend != "sqlite":
        return None
    import sqlite3

    from relay.store.sqlite_schema import prepare

    try:
        prepare(settings.path)
    except (sqlite3.Error, OSError) as exc:
        return f"cannot open SQLite store {settings.path}: {exc}"
    return None


__all__ = ["DeadLetter", "DeliveryRecord", "Job", "NewDelivery", "Pruned", "Stats", "Store", "create_store",
           "prepare_store"]
