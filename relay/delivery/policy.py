"""Delivery policy: injected time, retry backoff, probe intervals, and the per-app circuit breaker.

Kept apart from the dispatcher loop so that the decisions (when to retry, when to park an app, when to probe
it again) can be read and tested without the machinery that claims and sends.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

RETRY_TRIP = 5  # consecutive transient failures that open an app's circuit


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


@dataclass(frozen=True)
class ProbePolicy:
    """How often an open circuit sends one probe: doubling from ``initial`` up to a small cap.

    Independent of the per-delivery backoff (which may reach minutes): the cap bounds how long a recovered
    provider goes unnoticed, whatever the outage length, at the cost of one request per interval (about 17 a
    minute at the default cap of 4 s). Jitter (down to 3/4 of the interval) keeps relays from probing in step.
    """

    initial: float = 1.0
    maximum: float = 4.0
    rng: Callable[[float, float], float] = field(default=random.uniform, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("probe interval needs 0 < initial <= maximum")

    def delay(self, failed_probes: int, retry_after: float | None = None) -> float:
        """Seconds from a failure of the open circuit to its next probe."""
        ceiling = min(self.maximum, self.initial * (2 ** min(failed_probes, 32)))
        return max(self.rng(ceiling * 0.75, ceiling), retry_after or 0.0)


@dataclass
class Breaker:
    """Per-app circuit: after repeated failures, park that app's deliveries and probe for recovery.

    Closed (``open_until == 0``): everything goes. Open: nothing is claimed until ``open_until``; then it is
    half-open and exactly one delivery (``probe``) is let through. A success closes it; a failure opens it
    again for the next probe interval. A config error opens it with an alarm until the operator reloads.
    """

    failures: int = 0  # consecutive transient failures while closed
    failed_probes: int = 0  # since it opened: sets the next probe interval
    open_until: float = 0.0
    probe: str | None = None  # the job id probing while half-open
    alarm: str | None = None  # set for config errors: the operator must act

    @property
    def is_open(self) -> bool:
        return self.open_until > 0

    def claimable(self, now: float, free: int) -> int:
        """How many of this app's deliveries a claim may take: all free slots, one probe, or none."""
        if not self.is_open:
            return free
        if now >= self.open_until and self.probe is None:
            return min(1, free)
        return 0

    def admit(self, job_id: str, now: float) -> bool:
        """May this claimed delivery be sent now? While half-open the first one asking becomes the probe."""
        if not self.is_open or self.probe == job_id:
            return True
        if self.probe is None and now >= self.open_until:
            self.probe = job_id
            return True
        return False

    def release(self, job_id: str) -> None:
        """The probe ended without a provider answer (an unexpected error, a shutdown): let another probe go."""
        if self.probe == job_id:
            self.probe = None

    def succeeded(self) -> bool:
        """The provider answered: close. True when it was open (its parked deliveries can be released)."""
        was_open = self.is_open
        self.failures, self.failed_probes, self.open_until, self.probe, self.alarm = 0, 0, 0.0, None, None
        return was_open

    def failed(self, job_id: str, now: float, probes: ProbePolicy, retry_after: float | None) -> bool:
        """A transient failure; True when this one opened the circuit."""
        if self.is_open:
            if self.probe == job_id:  # a send started before it opened changes nothing: only probes count
                self.probe = None
                self.failed_probes += 1
                self.open_until = now + probes.delay(self.failed_probes, retry_after)
            return False
        self.failures += 1
        if self.failures < RETRY_TRIP:
            return False
        self.failed_probes, self.probe = 0, None
        self.open_until = now + probes.delay(0, retry_after)
        return True

    def misconfigured(self, job_id: str, now: float, reason: str, wait: float) -> bool:
        """A config error: open with an alarm for ``wait`` seconds; True when the alarm is new."""
        self.release(job_id)
        self.open_until = now + wait
        fresh = self.alarm != reason
        self.alarm = reason
        return fresh

    def reset(self) -> None:
        """After a reload: closed, no alarm (new credentials get a fresh start)."""
        self.succeeded()
