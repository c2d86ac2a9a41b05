"""The delivering process's care of the store: writes that must complete, recovery at start, pruning.

Apart from the dispatcher loop because none of it decides anything about a delivery: it keeps the store usable
(a crashed process's claims freed once, finished rows dropped on a timer) and its writes recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from relay.delivery.policy import Clock
from relay.errors import StoreError, StoreUnavailable
from relay.observability import event
from relay.outcome import WaitReason
from relay.store.base import Job, Store

T = TypeVar("T")

PRUNE_EVERY = 60.0  # seconds between the prunes of a delivering process
SLICE_PAUSE = 0.002  # seconds between two prune slices
SLOW_SLICE = 0.05  # a slice holding the write lock longer than this is worth a warning
GIVE_BACK_WITHIN = 30.0  # seconds for writing back deliveries claimed ahead too long ago (then: their lease)
STOP_GIVE_BACK = 1.0  # seconds a stop waits for such a write still running
NOT_STARTED = "claimed, not started before the stop"  # the reasons `parley-relay deliveries` shows for them
WAITED_TOO_LONG = "claimed ahead, waited half its lease for a slot"
SLOW_PRUNE, LARGE_PRUNE = 10.0, 100_000  # a prune this long (seconds) or large (records) is logged at INFO


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
    """Recovery when delivery starts, then a prune every PRUNE_EVERY seconds, beside the delivery loop.

    A prune is a series of short slices (:meth:`Store.prune`), run as a task of its own: the delivery loop
    starts it and goes on claiming, and each slice holds the store's write lock for a few milliseconds only.
    """

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store, self.clock = store, clock
        self._next_prune = 0.0
        self._pruning: asyncio.Task[None] | None = None
        self._giving_back: set[asyncio.Task[None]] = set()

    async def put_back(self, jobs: list[Job], timeout: float, detail: str = NOT_STARTED) -> None:
        """Claimed deliveries this process will not start (a stop): due again now, no attempt counted, ``detail``
        their reason. Those not written within ``timeout`` stay claimed until the store's close gives them back
        (or their lease ends)."""
        if not jobs:
            return
        put_back = [self.store.retry(job, self.clock.now(), WaitReason.RETRY, detail, app=job.app, count_attempt=False)
                    for job in jobs]
        with contextlib.suppress(StoreError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(*put_back), timeout)

    def give_back(self, jobs: list[Job]) -> None:
        """Deliveries claimed ahead that waited too long for a slot (:meth:`Admission.take_stale`): back to the
        store, due now, no attempt counted; returns at once. One not written before its lease ends is claimed
        again like any other, and this process no longer holds it."""
        event(logging.WARNING, "deliveries claimed ahead waited half their lease for a slot, given back to the store",
              count=len(jobs), apps=sorted({job.app or "" for job in jobs}))
        task = asyncio.get_running_loop().create_task(self.put_back(jobs, GIVE_BACK_WITHIN, WAITED_TOO_LONG))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def recover(self, stopping: Callable[[], bool]) -> None:
        """Make what a dead process left in flight due again (never what a live one has)."""
        try:
            recovered = await persist(lambda: self.store.recover(self.clock.now()), stopping)
        except StoreError as exc:  # stopped while the store was down: nothing was changed
            event(logging.WARNING, "could not recover deliveries of a previous run", error=str(exc))
            return
        if recovered:
            event(logging.INFO, "deliveries left in flight by a stopped process are due again", count=recovered)

    def prune_if_due(self) -> None:
        """Start a prune when the timer says so and none is running; returns at once."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_prune or (self._pruning is not None and not self._pruning.done()):
            return
        self._next_prune = loop.time() + PRUNE_EVERY
        self._pruning = loop.create_task(self._prune(), name="prune")

    @property
    def pruning(self) -> bool:
        """A prune is running (started by :meth:`prune_if_due` and not finished)."""
        return self._pruning is not None and not self._pruning.done()

    async def stop(self) -> None:
        """Stop a prune between two slices (what is left waits for the next run); let give-backs finish."""
        if self._pruning is not None:
            self._pruning.cancel()
            await asyncio.gather(self._pruning, return_exceptions=True)
        if self._giving_back:  # a give-back not written by then is claimed again after its lease
            await asyncio.wait(set(self._giving_back), timeout=STOP_GIVE_BACK)

    async def _prune(self) -> None:
        """Drop finished deliveries past their retention and expired dedupe keys, slice by slice."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        removed = slices = 0
        slowest = 0.0
        while True:
            began = loop.time()
            try:
                pruned = await self.store.prune(self.clock.now())
            except StoreError as exc:
                event(logging.WARNING, "store prune failed, retried at the next interval", error=str(exc))
                return
            slowest = max(slowest, loop.time() - began)
            removed, slices = removed + pruned.removed, slices + 1
            if not pruned.more:
                break
            await asyncio.sleep(SLICE_PAUSE)  # the other processes' writers take the lock in between
        seconds = loop.time() - started
        # Quiet at DEBUG when it is small and quick; above that the operator sees what the prune cost.
        level = logging.WARNING if slowest > SLOW_SLICE else (
            logging.INFO if removed >= LARGE_PRUNE or seconds > SLOW_PRUNE else logging.DEBUG)
        if removed or level > logging.DEBUG:
            event(level, "store pruned", removed=removed, slices=slices, seconds=round(seconds, 3),
                  slowest_slice_ms=round(slowest * 1000, 1))
