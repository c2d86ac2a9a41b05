"""Delivery stage: claim -> route -> translate -> send -> classify -> record.

The loop has arq's shape, cut small: :meth:`Dispatcher.run` claims due deliveries (at most the oldest open
one per token, which is what keeps per-device order, also across retries), :meth:`Dispatcher.deliver` runs
one under the provider's limits, and :meth:`Dispatcher.record` writes the outcome under ``asyncio.shield``
so that a cancelled task never leaves a send unrecorded. Time is injected (:class:`Clock`) so that tests
of backoff and expiry run in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from relay.config import DeliverySettings
from relay.delivery.policy import Breaker, Clock, RetryPolicy, SystemClock
from relay.delivery.translate import translate
from relay.errors import InvalidWebhook, StoreError, StoreUnavailable
from relay.inbound.parse import Event, load_notification
from relay.observability import Metrics, event, short_token
from relay.outcome import EndState, Outcome, SendResult, WaitReason
from relay.providers import Provider
from relay.registry.device import Route
from relay.registry.routing import Registry
from relay.store.base import Job, Store

T = TypeVar("T")

LEASE = 300.0
START_SLICE = 16  # claimed jobs started per event-loop turn
IDLE_POLL = 1.0


RETRY_TRIP = 5  # consecutive transient failures that open an app's circuit


class Dispatcher:
    """Moves stored deliveries to the providers until stopped."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        providers: Callable[[], Mapping[str, Provider]],
        settings: DeliverySettings,
        metrics: Metrics,
        clock: Clock | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.store, self.registry, self._providers = store, registry, providers
        self.settings, self.metrics = settings, metrics
        self.clock = clock or SystemClock()
        self.policy = policy or RetryPolicy(settings.backoff_initial, settings.backoff_max)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._concurrency = settings.concurrency
        self._running = 0  # deliveries started and not yet recorded
        self._claim_min = max(1, min(settings.batch_size, settings.concurrency) // 8)
        self._stopping = False
        self.breakers: dict[str, Breaker] = {}
        self.on_alarm: Callable[[str, str | None], Awaitable[None] | None] | None = None

    # -- the loop ----------------------------------------------------------------------------------

    def configure(self, settings: DeliverySettings) -> None:
        """Take reloaded delivery settings (backoff, ages, timeouts); ``concurrency`` applies after a restart."""
        self.settings = settings
        self.policy = RetryPolicy(settings.backoff_initial, settings.backoff_max, rng=self.policy.rng)

    def wake(self) -> None:
        """Something became due (a webhook, a registry change): claim now instead of at the next poll."""
        self._wake.set()

    @property
    def alarms(self) -> dict[str, str]:
        return {app: b.alarm for app, b in self.breakers.items() if b.alarm}

    async def run(self) -> None:
        """Claim and deliver until :meth:`stop`."""
        while not self._stopping:
            free = self._concurrency - self._running
            if free == 0 or (free < self._claim_min and free < self._concurrency):
                # Busy: claim in batches, not one job per finished send (each claim scans the token heads,
                # inside the store's group commit that webhooks wait on). A finished send wakes us.
                self._wake.clear()
                await self._wait(IDLE_POLL)
                continue
            self._wake.clear()
            try:
                jobs = await self.store.claim(min(free, self.settings.batch_size), self.clock.now(), LEASE)
            except StoreError as exc:
                event(logging.WARNING, "store unavailable, dispatcher paused", error=str(exc))
                await self._wait(1.0)
                continue
            for n, job in enumerate(jobs, 1):
                await self._start(job)
                if n % START_SLICE == 0:
                    await asyncio.sleep(0)  # let waiting webhooks in between: acks come before sends
            if not jobs:
                await self._wait(await self._idle_wait())

    async def _start(self, job: Job) -> None:
        await self._slots.acquire()  # released by _guarded when the delivery is recorded
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._guarded(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _idle_wait(self) -> float:
        try:
            due = await self.store.next_due()
        except StoreError:
            return IDLE_POLL
        if due is None:
            return IDLE_POLL * 5
        wait = due - self.clock.now()
        # Due but not claimed means blocked behind its token's in-flight head: that finish wakes us.
        return IDLE_POLL if wait <= 0 else min(wait, IDLE_POLL)

    async def _wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    async def run_until_idle(self, max_rounds: int = 10_000) -> None:
        """Test helper: deliver everything due now (following the fake clock), then return."""
        for _ in range(max_rounds):
            jobs = await self.store.claim(self.settings.batch_size, self.clock.now(), LEASE)
            if not jobs and not self._tasks:
                return
            for job in jobs:
                await self._start(job)
            if self._tasks:
                await asyncio.wait(set(self._tasks))

    async def stop(self, timeout: float) -> None:
        """Stop claiming; let in-flight sends finish within ``timeout``; the rest stays stored."""
        self._stopping = True
        self._wake.set()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)

    async def _guarded(self, job: Job) -> None:
        try:
            await self.deliver(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            event(logging.ERROR, "delivery failed unexpectedly", job=job.id, token=short_token(job.token))
            logging.getLogger(__name__).debug("delivery failure", exc_info=True)
        finally:
            self._running -= 1
            self._slots.release()
            self._wake.set()

    # -- one delivery --------------------------------------------------------------------------------

    async def deliver(self, job: Job) -> None:
        """Route, translate, send and record one claimed delivery."""
        now = self.clock.now()
        try:
            notification = load_notification(job.data)
        except (InvalidWebhook, ValueError) as exc:
            await self.record_end(job, EndState.DEAD_LETTER, f"unreadable stored notification: {exc}", None)
            return
        route = self.registry.lookup(job.token)
        if route is None and not self.registry.is_dead(job.token):
            # Another instance (or the CLI) may have registered it since our overlay was loaded.
            device = await self._persist(lambda: self.store.get_device(job.token))
            if device is not None:
                self.registry.put(device)
                route = self.registry.lookup(job.token)
        expires_at = job.expires_at
        if route is not None and isinstance(notification, Event):
            expires_at = min(expires_at, job.received_at + route.app.policy.event_ttl)
        if now >= expires_at:
            await self.record_end(job, EndState.EXPIRED, "expired before it could be sent", route)
            return
        if self.registry.is_dead(job.token):
            await self.record_end(job, EndState.TOKEN_DEAD, "token was reported dead earlier", route)
            return
        if route is None:
            await self._unroutable(job, now)
            return
        breaker = self.breakers.setdefault(route.app.name, Breaker())
        if not breaker.allows(now):
            at = max(breaker.open_until, now + 1.0)
            wait = WaitReason.CONFIG_ERROR if breaker.alarm else WaitReason.CIRCUIT_OPEN
            await self._persist(lambda: self.store.retry(job, at, wait, breaker.alarm or "", count_attempt=False))
            return
        provider = self._providers().get(route.app.name)
        if provider is None:
            at = now + self.settings.config_error_retry
            await self._persist(lambda: self.store.retry(job, at, WaitReason.CONFIG_ERROR, "no provider for the app",
                                                         count_attempt=False))
            return
        push = translate(notification, route, job.delivery_id, now, expires_at)
        self.metrics.inflight.inc()
        started = time.perf_counter()
        try:
            result = await provider.send(push)
        finally:
            self.metrics.inflight.dec()
            self.metrics.child(self.metrics.provider_latency, route.app.platform).observe(time.perf_counter() - started)
        # Each store write in record() is shielded on its own; a cancellation (stop() past its timeout) between
        # two of them leaves the job claimed, to be delivered again after the restart: at least once.
        await self.record(job, route, result, expires_at)

    async def _unroutable(self, job: Job, now: float) -> None:
        deadline = job.received_at + self.settings.unroutable_grace
        if now >= deadline:
            await self.record_end(job, EndState.UNROUTABLE, "no registry entry for this token", None)
        else:
            # Parked until the grace period ends; a registry reload or a new device wakes it sooner.
            await self._persist(lambda: self.store.retry(job, deadline, WaitReason.UNROUTABLE, count_attempt=False))

    async def record(self, job: Job, route: Route, result: SendResult, expires_at: float) -> None:
        """Turn a provider answer into a stored end state or a scheduled retry."""
        app, platform = route.app.name, route.app.platform
        self.metrics.child(self.metrics.sends, platform, app, job.kind, result.outcome.value).inc()
        breaker = self.breakers.setdefault(app, Breaker())
        now = self.clock.now()
        if result.outcome is Outcome.SENT:
            await self._close_breaker(app, breaker)
            self.metrics.child(self.metrics.delivery_latency, platform).observe(max(0.0, now - job.received_at))
            await self.record_end(job, EndState.SENT, "", route)
        elif result.outcome is Outcome.TOKEN_DEAD:
            await self._close_breaker(app, breaker)
            if await self._persist(lambda: self.store.mark_dead(job.token, result.reason, now)):
                self.metrics.dead_tokens.labels(platform, app).inc()
                event(logging.WARNING, "push token is dead", app=app, token=short_token(job.token),
                      reason=result.reason)
            self.registry.mark_dead(job.token)
            await self.record_end(job, EndState.TOKEN_DEAD, result.reason, route)
        elif result.outcome is Outcome.PERMANENT:
            await self._close_breaker(app, breaker)
            await self.record_end(job, EndState.DEAD_LETTER, result.reason, route)
        elif result.outcome is Outcome.CONFIG_ERROR:
            breaker.probing = False
            breaker.open_until = now + self.settings.config_error_retry
            if breaker.alarm != result.reason:
                breaker.alarm = result.reason
                self.metrics.alarms.labels(app).set(1)
                event(logging.ERROR, "app configuration alarm: deliveries kept until it is fixed", app=app,
                      reason=result.reason)
                await self._notify_alarm(app, result.reason)
            await self._retry(job, route, breaker.open_until, result.reason, count=False, expires_at=expires_at,
                              wait=WaitReason.CONFIG_ERROR)
        else:
            breaker.probing = False
            breaker.failures += 1
            if breaker.failures >= RETRY_TRIP:
                breaker.open_until = now + self.policy.delay(breaker.failures - RETRY_TRIP, result.retry_after)
            at = now + self.policy.delay(job.attempts, result.retry_after)
            await self._retry(job, route, at, result.reason, count=True, expires_at=expires_at, wait=WaitReason.RETRY)

    async def _retry(self, job: Job, route: Route, at: float, reason: str, *, count: bool, expires_at: float,
                     wait: WaitReason) -> None:
        if at >= expires_at:
            await self.record_end(job, EndState.EXPIRED, f"expired while retrying ({reason})", route)
            return
        self.metrics.retries.labels(route.app.platform, route.app.name, reason.split(" ")[0][:40]).inc()
        await self._persist(lambda: self.store.retry(job, at, wait, reason, count_attempt=count))

    async def _close_breaker(self, app: str, breaker: Breaker) -> None:
        breaker.failures, breaker.open_until, breaker.probing = 0, 0.0, False
        if breaker.alarm is not None:
            breaker.alarm = None
            self.metrics.alarms.labels(app).set(0)
            event(logging.INFO, "app configuration alarm cleared", app=app)
            await self._notify_alarm(app, None)
            await self._persist(lambda: self.store.wake(
                self.clock.now(), reasons={WaitReason.CONFIG_ERROR, WaitReason.CIRCUIT_OPEN}))

    async def _notify_alarm(self, app: str, reason: str | None) -> None:
        if self.on_alarm is not None:
            maybe = self.on_alarm(app, reason)
            if maybe is not None:
                await maybe

    def clear_alarms(self) -> None:
        """After a reload: let every app probe again at once."""
        for app, breaker in self.breakers.items():
            if breaker.alarm:
                self.metrics.alarms.labels(app).set(0)
            breaker.failures, breaker.open_until, breaker.probing, breaker.alarm = 0, 0.0, False, None

    async def record_end(self, job: Job, end: EndState, reason: str, route: Route | None) -> None:
        """Store an end state and count it."""
        platform = route.app.platform if route else "none"
        app = route.app.name if route else "none"
        self.metrics.child(self.metrics.ended, platform, app, job.kind, end.value).inc()
        now = self.clock.now()
        await self._persist(lambda: self.store.finish(job, end, reason, now))

    async def _persist(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a store write to completion: shielded from cancellation, retried while the store is down.

        Giving up would leave the job claimed until its lease ends and then send it again; waiting for
        the store costs nothing, since nothing else can progress without it either.
        """
        delay, warned = 0.2, False
        while True:
            try:
                return await asyncio.shield(op())
            except StoreUnavailable as exc:  # a logic error (other StoreError) is not retried
                if self._stopping:
                    raise
                if not warned:
                    event(logging.WARNING, "store unavailable while recording an outcome, retrying", error=str(exc))
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
