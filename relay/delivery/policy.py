"""Delivery policy: injected time, retry backoff, and the per-app circuit breaker.

Kept apart from the dispatcher loop so that the decisions (when to retry, when to park an app) can be read
and tested without the machinery that claims and sends.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Wall-clock time (stored times are absolute so that they survive restarts)."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, never sooner than the provider's ``Retry-After``."""

    initial: float = 1.0
    maximum: float = 300.0
    rng: Callable[[float, float], float] = field(default=random.uniform, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempts + 1``."""
        ceiling = min(self.maximum, self.initial * (2 ** min(attempts, 32)))
        jittered = self.rng(self.initial / 2, ceiling)
        return max(jittered, retry_after or 0.0)


@dataclass
class Breaker:
    """Per-app circuit: after repeated failures, park that app's deliveries and probe for recovery."""

    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    alarm: str | None = None  # set for config errors: the operator must act

    def allows(self, now: float) -> bool:
        if now < self.open_until:
            return False
        if self.open_until and self.probing:
            return False  # one probe at a time while half-open
        if self.open_until:
            self.probing = True
        return True
