"""Plumbing shared by the fake providers: a request log tests can wait on, and a server thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class RequestLog(Generic[T]):
    """A thread-safe append-only record that tests can wait on, from sync or async code."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._cond = threading.Condition()

    def append(self, item: T) -> None:
        """Record one item and wake waiters."""
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def snapshot(self) -> list[T]:
        """A copy of everything recorded so far."""
        with self._cond:
            return list(self._items)

    def since(self, start: int) -> list[T]:
        """A copy of what was recorded from position ``start`` on (a poller reads only what is new)."""
        with self._cond:
            return self._items[start:]

    def clear(self) -> None:
        """Forget everything recorded."""
        with self._cond:
            self._items.clear()

    def wait(self, n: int, timeout: float) -> list[T]:
        """Block until at least `n` items are recorded; return them all or raise `TimeoutError`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) >= n, timeout):
                got = len(self._items)
                raise TimeoutError(f"expected {n} requests within {timeout}s, got {got}")
            return list(self._items)

    async def wait_async(self, n: int, timeout: float) -> list[T]:
        """Like `wait`, without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if len(self._items) >= n:
                    return list(self._items)
                got = len(self._items)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"expected {n} requests within {timeout}s, got {got}")
            await asyncio.sleep(0.005)


class ServerThread:
    """Runs a server's `setup`/`teardown` coroutines on a private event loop in a daemon thread."""

    def __init__(
        self,
        name: str,
        setup: Callable[[], Awaitable[None]],
        teardown: Callable[[], Awaitable[None]],
    ) -> None:
        self._name = name
        self._setup = setup
        self._teardown = teardown
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start the thread and return once `setup` has finished (re-raising its error)."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self._name} did not start within {timeout}s")
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"{self._name} failed to start") from self._error

    def stop(self, timeout: float = 10.0) -> None:
        """Run `teardown`, stop the loop and join the thread. Idempotent."""
        loop, stopping, thread = self.loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        self._thread = None

    def run(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn` on the server loop and return its result (never call from the server loop)."""
        if self.loop is None:
            raise RuntimeError(f"{self._name} is not running")

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    def _run(self) -> None:
        # asyncio.run cancels what is left (hung handlers, delayed answers) and closes the loop.
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            await self._setup()
        except BaseException as exc:  # handed to start() in the caller's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopping.wait()
        await self._teardown()
