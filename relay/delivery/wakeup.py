"""The dispatcher loop's wake-up flag: ``asyncio.Event`` with a timed wait, cut to what the loop needs.

``asyncio.wait_for(event.wait(), t)`` costs a task, a timer and a cancellation per loop turn, and the woken
loop resumes three loop iterations after :meth:`Wakeup.set`. Here a wait is one future and one timer, and the
loop resumes in the next iteration: a claim asked for by a delivery that just ended (its slot released, its
outcome queued in the same turn) reaches the store's queue before that queue's next transaction starts, so the
outcome and the next claim share one transaction (see :mod:`relay.store.sqlite_commit`).
"""

from __future__ import annotations

import asyncio


class Wakeup:
    """A flag the loop waits on with a timeout; set from callbacks and tasks of the same event loop."""

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        """Wake the waiting loop now (or make its next :meth:`wait` return at once)."""
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout: float) -> None:
        """Until :meth:`set` or ``timeout`` seconds, whichever comes first."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(max(0.0, timeout), _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
