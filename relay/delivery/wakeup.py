"""The dispatcher loop's wake-up flag: ``asyncio.Event`` with a timed wait, cut to what the loop needs.

``asyncio.wait_for(event.wait(), t)`` costs a task, a timer and a cancellation per loop turn, and the woken
loop resumes three loop iterations after :meth:`Wakeup.set`. Here a wait is one future and one timer, and the
loop resumes in the next iteration: a claim asked for by a delivery that just ended (its slot released, its
outcome queued in the same turn) reaches the store's queue before that queue's next transaction starts, so the
outcome and the next claim share one transaction (see :mod:`relay.store.sqlite_commit`).
"""

from __future__ import annotations

import asyncio

IDLE_POLL = 1.0  # the longest a due delivery (or a store change by another process) waits for a claim


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


def idle_wait(due: float | Exception | None, now: float, probe: float | None, *, busy: bool) -> float:
    """How long the loop sleeps after a claim that was not full: ``due`` is the store's next due time (an
    exception when it could not be read), ``probe`` the seconds until an open circuit's next probe, ``busy``
    whether sends are in flight (each one's end wakes the loop)."""
    if isinstance(due, Exception):
        return IDLE_POLL
    # Nothing pending or in flight: a webhook wakes us. Otherwise poll at least every IDLE_POLL, so that a change
    # made by another process (the CLI adding a device, another instance) is seen within it; due but not claimed
    # means blocked behind its token's head or its app's slots, whose finish wakes us sooner.
    if due is None:
        wait = IDLE_POLL if busy else IDLE_POLL * 5
    else:
        wait = IDLE_POLL if due <= now else min(due - now, IDLE_POLL)
    return max(0.0, wait if probe is None else min(wait, probe))
