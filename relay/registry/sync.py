"""How a process's copy of the store's device state follows the store: one mechanism, one place.

Every process (webhook, delivery, a single-process relay, an operator command) keeps the run-time devices,
dead marks and learned APNs environments in its :class:`~relay.registry.routing.Registry`, for lookups that
never wait on the store. The store bumps a change counter (its *device epoch*) in the same transaction as
every such change; :meth:`OverlaySync.refresh` reads that counter (one small read) and, when it moved, reads
what changed since the epoch it last saw, with the values those keys have now. The delivery process refreshes
once per claim round (after the claim: whatever was changed before a claimed delivery was stored is seen),
the webhook process once per webhook when ``reject_dead_tokens`` is on and once per device API request.
So a device change made anywhere (the API in another process, the CLI, another instance on one Redis) steers
the next push and the next answer; nothing else mutates the copy.
"""

from __future__ import annotations

import asyncio

from relay.registry.routing import Registry
from relay.store.base import DeviceChanges, Store


class OverlaySync:
    """Keeps ``registry``'s run-time overlay equal to ``store``'s device state at the epoch it holds."""

    def __init__(self, store: Store, registry: Registry) -> None:
        self._store, self._registry = store, registry
        self._epoch: int | None = None  # None: nothing loaded yet
        self._lock = asyncio.Lock()  # refreshes apply in the order they read: an older read never wins
        self._reading: asyncio.Task[int] | None = None  # the epoch read in flight
        self._next: asyncio.Task[int] | None = None  # the read that starts when it ends (shared by who waits)

    @property
    def epoch(self) -> int | None:
        """The store's device epoch the copy reflects (None before the first load)."""
        return self._epoch

    async def load(self) -> None:
        """Read everything (at start; a reload calls :meth:`install` with what it read before its swap)."""
        async with self._lock:
            self.install(await self._store.device_changes(None))

    def install(self, changes: DeviceChanges) -> None:
        """Apply what was read from the store and remember its epoch.

        Applying a delta that is older than what is installed is harmless: the epoch goes back with it, and
        the next refresh reads every key changed since then with its value now.
        """
        self._registry.apply(changes)
        self._epoch = changes.epoch

    async def refresh(self) -> bool:
        """Catch up with the store when its device epoch moved; True when something was applied.

        Costs one small read when nothing changed. Raises :class:`~relay.errors.StoreError` when the store
        cannot be read (the copy stays as it was).
        """
        epoch = await self._epoch_now()
        if epoch == self._epoch:
            return False
        async with self._lock:
            if epoch == self._epoch:  # another caller caught up while this one waited
                return False
            self.install(await self._store.device_changes(self._epoch))
            return True

    async def _epoch_now(self) -> int:
        """The store's device epoch, read after this call began.

        Callers that arrive while a read is in flight share the one that starts when it ends, so a burst of
        concurrent webhooks or requests costs two small reads, not one each, and none of them is answered from
        a read that began before it arrived.
        """
        if self._next is None:
            self._next = asyncio.get_running_loop().create_task(self._read_after(self._reading))
            self._next.add_done_callback(_retrieve)
        return await asyncio.shield(self._next)

    async def _read_after(self, previous: asyncio.Task[int] | None) -> int:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # its outcome is its own callers' concern
        self._reading, self._next = self._next, None  # whoever comes from now on waits for the next read
        return await self._store.device_epoch()


def _retrieve(task: asyncio.Task[int]) -> None:
    """Mark a shared read's failure as seen (each caller that still waits gets it raised)."""
    if not task.cancelled():
        task.exception()
