"""The per-app circuit breakers of one dispatcher, with their metrics and log lines (SPEC §6).

:class:`~relay.delivery.policy.Breaker` decides; this module applies the decisions to every app and tells
the operator: ``app circuit opened`` / ``closed`` lines, the alarm and circuit gauges, probe counts. The
dispatcher does the store writes that follow (releasing an app's parked deliveries when it closes).
"""

from __future__ import annotations

import logging
import time

from relay.config import DeliverySettings
from relay.delivery.health import AppHealth, from_breakers
from relay.delivery.policy import Breaker, ProbePolicy
from relay.observability import Metrics, event
from relay.outcome import SendResult
from relay.store.base import Job


class Circuits:
    """One breaker per app, created on first use."""

    def __init__(self, metrics: Metrics, probes: ProbePolicy) -> None:
        self.metrics, self.probes = metrics, probes
        self.breakers: dict[str, Breaker] = {}
        # For the status endpoint (relay.delivery.health): the latest failure's reason and the wall time a
        # provider last answered, per app.
        self.reasons: dict[str, str] = {}
        self.successes: dict[str, float] = {}

    def __getitem__(self, app: str) -> Breaker:
        found = self.breakers.get(app)
        if found is None:
            found = self.breakers[app] = Breaker()
        return found

    @property
    def alarms(self) -> dict[str, str]:
        """App -> the provider's reason, for every app with a configuration alarm."""
        return {app: b.alarm for app, b in self.breakers.items() if b.alarm}

    def health(self, now: float) -> dict[str, AppHealth]:
        """Each app's circuit, alarm, reason and last success as this dispatcher sees them."""
        return from_breakers(self.breakers, self.reasons, self.successes, now)

    def next_probe(self, now: float) -> float | None:
        """Seconds until the earliest open circuit may send its probe, or None when none is still to come.

        A probe already due is not counted: its claim finds a delivery or there is nothing to probe with
        (the next one due, or a webhook, wakes the dispatcher then).
        """
        waits = [b.open_until - now for b in self.breakers.values()
                 if b.is_open and b.probe is None and b.open_until > now]
        return min(waits) if waits else None

    def release(self, job_id: str) -> None:
        """A delivery ended without a provider answer: if it was a probe, another may go at once."""
        for breaker in self.breakers.values():
            breaker.release(job_id)

    def succeeded(self, app: str) -> bool:
        """The provider answered; True when this closed the circuit (its parked deliveries can be released)."""
        breaker = self[app]
        self.successes[app] = time.time()
        if not breaker.is_open:
            breaker.failures = 0
            return False
        alarm = breaker.alarm
        breaker.succeeded()
        self.metrics.probes.labels(app, "ok").inc()
        self.metrics.circuit_open.labels(app).set(0)
        if alarm is not None:
            self.metrics.alarms.labels(app).set(0)
            event(logging.INFO, "app configuration alarm cleared", app=app)
        return True

    def misconfigured(self, app: str, job: Job, result: SendResult, now: float, settings: DeliverySettings) -> float:
        """A config error: alarm (once per reason) and park the app; returns when it probes again."""
        breaker = self[app]
        if breaker.probe == job.id:
            self.metrics.probes.labels(app, "failed").inc()
        self.metrics.circuit_open.labels(app).set(1)
        if breaker.misconfigured(job.id, now, result.reason, settings.config_error_retry):
            self.metrics.alarms.labels(app).set(1)
            event(logging.ERROR, "app configuration alarm: deliveries kept until it is fixed", app=app,
                  reason=result.reason)
        return breaker.open_until

    def failed(self, app: str, job: Job, result: SendResult, now: float, settings: DeliverySettings) -> None:
        """A transient failure: counts towards opening the circuit, or sets an open one's next probe."""
        breaker = self[app]
        self.reasons[app] = result.reason
        if breaker.probe == job.id:
            self.metrics.probes.labels(app, "failed").inc()
        # Retry-After bounds the probe too (the provider asked for quiet), never past the backoff maximum.
        retry_after = min(result.retry_after, settings.backoff_max) if result.retry_after else None
        if breaker.failed(job.id, now, self.probes, retry_after):
            self.metrics.circuit_open.labels(app).set(1)
            event(logging.WARNING, "app circuit opened: deliveries parked, probing for recovery", app=app,
                  reason=result.reason, probe_in=round(breaker.open_until - now, 3))

    def clear(self) -> None:
        """After a reload: every app closed, no alarm (its deliveries are released by the reload's wake)."""
        for app, breaker in self.breakers.items():
            if breaker.alarm:
                self.metrics.alarms.labels(app).set(0)
            if breaker.is_open:
                self.metrics.circuit_open.labels(app).set(0)
            breaker.reset()
