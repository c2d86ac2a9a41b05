"""Storage stage: the durable queue of deliveries, the device overlay, dedupe keys and dead letters.

One :class:`~relay.store.base.Store` protocol, two implementations: SQLite (embedded default) and Redis
(scale-out). :func:`open_store` picks one from the configuration.
"""

from __future__ import annotations

from relay.config import StoreSettings
from relay.store.base import DeadLetter, DeliveryRecord, Job, NewDelivery, Stats, Store


def create_store(settings: StoreSettings) -> Store:
    """The store the settings name (not yet opened)."""
    if settings.backend == "redis":
        from relay.store.redis import RedisStore

        # Until relay/store/redis.py is on the new interface (branch ``redis``); mypy flags this once it is.
        return RedisStore(settings)  # type: ignore[return-value]
    from relay.store.sqlite import SqliteStore

    return SqliteStore(settings)


__all__ = ["DeadLetter", "DeliveryRecord", "Job", "NewDelivery", "Stats", "Store", "create_store"]
