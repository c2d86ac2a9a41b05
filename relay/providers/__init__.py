"""Provider stage: send one push to Apple or Google and classify the answer.

Every provider implements :class:`Provider`; nothing above this package sees an ``aioapns`` or
``firebase_admin`` type. Concurrency limits and timeouts are added by wrapping (:class:`Bounded`), not by a
base class.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Protocol

from relay.config import ApnsApp, App, FcmApp
from relay.outcome import Outcome, SendResult
from relay.push import Push


class Provider(Protocol):
    """Sends pushes of one app."""

    async def send(self, push: Push) -> SendResult:
        """Send one push; never raises for provider or network failures (they are classified)."""

    async def close(self) -> None:
        """Release connections."""


def fingerprint(app: App) -> str:
    """What a provider of ``app`` was built from: its settings and the bytes of every file it names (a rotated key
    keeps its path). Equal fingerprints: a reload changed nothing this app's sends depend on."""
    digest = hashlib.sha256(repr(app).encode())
    for value in vars(app).values():
        if isinstance(value, Path):
            try:
                digest.update(value.read_bytes())
            except OSError:
                digest.update(b"unreadable")
    return digest.hexdigest()


class Bounded:
    """A provider wrapped with a concurrency limit and a per-send timeout."""

    def __init__(self, inner: Provider, concurrency: int, timeout: float, built_from: str = "") -> None:
        self.inner = inner
        self.built_from = built_from  # the app's fingerprint when it was built
        self._slots = asyncio.Semaphore(concurrency)
        self._timeout = timeout
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def send(self, push: Push) -> SendResult:
        async with self._slots:
            self._in_flight += 1
            self._idle.clear()
            try:
                async with asyncio.timeout(self._timeout):
                    return await self.inner.send(push)
            except TimeoutError:
                return SendResult(Outcome.RETRY, f"timeout after {self._timeout:g}s")
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()

    async def close(self) -> None:
        await self.inner.close()

    async def retire(self) -> None:
        """Close once the sends in flight have finished (bounded by the send timeout): used on reload."""
        try:
            await asyncio.wait_for(self._idle.wait(), self._timeout)
        except TimeoutError:
            pass
        await self.inner.close()


async def create_provider(app: App, timeout: float) -> Bounded:
    """The provider for one app, built inside the running loop (aioapns requires it)."""
    built_from = fingerprint(app)  # before the provider reads its files: a rotation meanwhile is seen next time
    if isinstance(app, ApnsApp):
        from relay.providers.apns import ApnsProvider

        provider: Provider = ApnsProvider(app)
    else:
        assert isinstance(app, FcmApp)
        from relay.providers.fcm import FcmProvider

        provider = await FcmProvider.create(app, timeout)
    return Bounded(provider, app.concurrency, timeout, built_from)
