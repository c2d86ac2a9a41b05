"""The per-app circuit breakers of one dispatcher, with their metrics and log lines (SPEC §6).

:class:`~relay.delivery.policy.Breaker` decides; this module applies the decisions to every app and tells
the operator: ``app circuit opened`` / ``closed`` lines, the alarm and circuit gauges, probe counts. The
dispatcher does the store writes that follow (releasing an app's parked deliveries when it closes).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Collection
from dataclasses import replace

from relay.config import DeliverySettings
from relay.delivery.health import AppHealth, from_breakers
from relay.delivery.mismatch import Mismatches, Verdict
from relay.delivery.policy import Breaker, ProbePolicy, RetryPolicy
from relay.observability import Metrics, event
from relay.outcome import SendResult
from relay.registry.device import Route
from relay.store.base import Job

_CODE = re.compile(r"(?:\d{3} )?([A-Za-z_]+)")


def reason_code(reason: str) -> str:
    """The provider's code at the start of a reason (``403 InvalidProviderToken`` -> ``InvalidProviderToken``,
    ``SENDER_ID_MISMATCH: ...`` -> ``SENDER_ID_MISMATCH``): a metric label from a closed set, never free text."""
    found = _CODE.match(reason)
    return found.group(1)[:40] if found else "other"


class Circuits:
    """One breaker (and one body of mismatch evidence) per app, created on first use."""

    def __init__(self, metrics: Metrics, probes: ProbePolicy) -> None:
        self.metrics, self.probes = metrics, probes
        self.breakers: dict[str, Breaker] = {}
        # For the status endpoint (relay.delivery.health): the latest failure's reason and the wall time a
        # provider last answered, per app.
        self.reasons: dict[str, str] = {}
        self.successes: dict[str, float] = {}
        self.mismatches: dict[str, Mismatches] = {}

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

    def delivered(self, app: str, token: str) -> None:
        """A push reached ``token``: the app's credentials demonstrably work (evidence for mismatches)."""
        self.mismatches.setdefault(app, Mismatches()).succeeded(token)

    def mismatch(self, route: Route, job: Job, result: SendResult, now: float, settings: DeliverySettings,
                 policy: RetryPolicy) -> tuple[Verdict, float, str]:
        """A topic/sender mismatch judged against the app's other deliveries (:mod:`relay.delivery.mismatch`):
        the verdict, and for a kept delivery when it goes again and why.

        Held and alarmed deliveries back off (the attempt counts), so that a held token that keeps answering is
        not always the oldest delivery, hence the probe, of an alarmed app: another device's success clears a
        false alarm."""
        app = route.app.name
        evidence = self.mismatches.setdefault(app, Mismatches())
        verdict = evidence.judge(job.token)
        self.metrics.child(self.metrics.mismatches, route.app.platform, app, verdict.value).inc()
        backoff = now + policy.delay(job.attempts)
        if verdict is Verdict.APP_ALARM:
            alarm = replace(result, reason=(f"{result.reason} from {evidence.run()} devices, none delivered in "
                                            "between: the app's topic, key or service account is another app's"))
            return verdict, max(self.misconfigured(app, job, alarm, now, settings), backoff), alarm.reason
        self.release(job.id)
        return verdict, backoff, f"{result.reason}: held until the app delivers to another device"

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
            self._alarm_metrics(app, alarm, 0)
            event(logging.INFO, "app configuration alarm cleared", app=app)
        return True

    def _alarm_metrics(self, app: str, reason: str, value: int) -> None:
        self.metrics.alarms.labels(app).set(value)
        self.metrics.alarm_reason.labels(app, reason_code(reason)).set(value)

    def misconfigured(self, app: str, job: Job, result: SendResult, now: float, settings: DeliverySettings) -> float:
        """A config error: alarm (once per reason) and park the app; returns when it probes again."""
        breaker = self[app]
        if breaker.probe == job.id:
            self.metrics.probes.labels(app, "failed").inc()
        self.metrics.circuit_open.labels(app).set(1)
        previous = breaker.alarm
        if breaker.misconfigured(job.id, now, result.reason, settings.config_error_retry):
            if previous is not None:
                self._alarm_metrics(app, previous, 0)
            self._alarm_metrics(app, result.reason, 1)
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

    def clear(self, apps: Collection[str] | None = None) -> None:
        """After a reload: no alarm (a reload is the operator's "try again"); ``apps`` (default: every app) closed
        with no mismatch evidence (new credentials or a new endpoint get a fresh start; their deliveries are
        released by the reload's wake). Other apps keep an open circuit: a reload that changed nothing of theirs
        must not restart an outage's count, nor give its deliveries the backoff of attempts made meanwhile."""
        for app, breaker in self.breakers.items():
            if apps is not None and app not in apps and not breaker.alarm:
                continue
            if breaker.alarm:
                self._alarm_metrics(app, breaker.alarm, 0)
            if breaker.is_open:
                self.metrics.circuit_open.labels(app).set(0)
            breaker.reset()
        for app in list(self.mismatches):
            if apps is None or app in apps:
                del self.mismatches[app]
