"""The delivering process's care of the store: writes that must complete, recovery at start, pruning.

Apart from the dispatcher loop because none of it decides anything about a delivery: it keeps the store usable
(a crashed process's claims freed once, finished rows dropped on a timer) and its writes recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from relay.delivery.policy import Clock
from relay.errors import StoreError, StoreUnavailable
from relay.observability import event
from relay.store.base import Store

T = TypeVar("T")

PRUNE_EVERY = 60.0  # seconds between store.prune() calls of a delivering process


async def persist(op: Callable[[], Awaitable[T]], stopping: Callable[[], bool]) -> T:
    """Run a store write to completion: shielded from cancellation, retried while the store is down.

    Giving up would leave the job claimed until its lease ends and then send it again; waiting for the store
    costs nothing, since nothing else can progress without it either. Not retried once ``stopping()``.
    """
    delay, warned = 0.2, False
    while True:
        try:
            return await asyncio.shield(op())
        except StoreUnavailable as exc:  # a logic error (other StoreError) is not retried
            if stopping():
                raise
            if not warned:
                event(logging.WARNING, "store unavailable while recording an outcome, retrying", error=str(exc))
                warned = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class Upkeep:
    """Recovery when delivery starts, then a prune every PRUNE_EVERY seconds (each cheap and bounded)."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store, self.clock = store, clock
        self._next_prune = 0.0

    async def recover(self, stopping: Callable[[], bool]) -> None:
        """Make what a dead process left in flight due again (never what a live one has)."""
        try:
            recovered = await persist(lambda: self.store.recover(self.clock.now()), stopping)
        except StoreError as exc:  # stopped while the store was down: nothing was changed
            event(logging.WARNING, "could not recover deliveries of a previous run", error=str(exc))
            return
        if recovered:
            event(logging.INFO, "deliveries left in flight by a stopped process are due again", count=recovered)

    async def prune_if_due(self) -> None:
        """Drop finished deliveries past their retention and expired dedupe keys, when the timer says so."""
        loop_now = asyncio.get_running_loop().time()
        if loop_now < self._next_prune:
            return
        self._next_prune = loop_now + PRUNE_EVERY
        try:
            pruned = await self.store.prune(self.clock.now())
        except StoreError as exc:
            event(logging.WARNING, "store prune failed, retried at the next interval", error=str(exc))
            return
        if pruned:
            event(logging.DEBUG, "store pruned", rows=pruned)
