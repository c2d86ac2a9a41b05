"""Delivery stage: claim -> route -> translate -> send -> classify -> record.

The loop has arq's shape, cut small: :meth:`Dispatcher.run` claims due deliveries (at most the oldest open
one per token, which is what keeps per-device order, also across retries) within each app's free slots
(:mod:`relay.delivery.admission`), :meth:`Dispatcher.deliver` runs one, and :meth:`Dispatcher.record` writes
the outcome under ``asyncio.shield`` so that a cancelled task never leaves a send unrecorded. Every claimed
delivery ends in exactly one recorded decision: an end state, or a wait until a time for a typed reason
(:class:`~relay.outcome.WaitReason`), also when something unexpected raised. Time is injected
(:class:`Clock`) so that tests of backoff, expiry and probing run in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TypeVar

from relay.config import DeliverySettings
from relay.delivery import trace
from relay.delivery.admission import Admission, Slot
from relay.delivery.circuits import Circuits
from relay.delivery.mismatch import Verdict
from relay.delivery.policy import Breaker, Clock, ProbePolicy, RetryPolicy, SystemClock
from relay.delivery.refit import Refitter
from relay.delivery.upkeep import Upkeep, persist
from relay.delivery.wakeup import IDLE_POLL, Wakeup, idle_wait
from relay.errors import InvalidWebhook, StoreError
from relay.inbound.accept import event_ttl
from relay.inbound.parse import Event, load_notification
from relay.observability import Metrics, event, short_token
from relay.outcome import EndState, Outcome, SendResult, WaitReason
from relay.providers import Provider
from relay.registry.device import Route
from relay.registry.routing import Registry
from relay.registry.sync import OverlaySync
from relay.store.base import Job, Store

T = TypeVar("T")

LEASE = 300.0
START_SLICE = 16  # claimed jobs started per event-loop turn
CANCEL_GRACE = 0.5  # at most this part of stop()'s timeout goes to recording the sends it had to cancel


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
        probes: ProbePolicy | None = None,
        sync: OverlaySync | None = None,
    ) -> None:
        self.store, self.registry, self._providers = store, registry, providers
        self.sync = sync or OverlaySync(store, registry)  # the registry's run-time part follows the store
        self.settings, self.metrics, self.clock = settings, metrics, clock or SystemClock()
        self.policy = policy or RetryPolicy(settings.backoff_initial, settings.backoff_max)
        self.admission = Admission(registry.apps, settings, self._slots_changed, self.clock.now, LEASE / 2)
        self._wake = Wakeup()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.upkeep = Upkeep(store, self.clock)
        self.circuits = Circuits(metrics, probes or ProbePolicy())
        self.refitter = Refitter(metrics)

    # -- the loop ----------------------------------------------------------------------------------

    def configure(self, settings: DeliverySettings) -> None:
        """Take reloaded delivery settings and the registry's (reloaded) apps: backoff, ages, timeouts, slots."""
        self.settings = settings
        self.policy = RetryPolicy(settings.backoff_initial, settings.backoff_max, rng=self.policy.rng)
        self.admission.configure(self.registry.apps, settings)
        self._slot_freed()  # raised limits (or a removed app) let deliveries claimed ahead start

    def wake(self) -> None:
        """Something became due (a webhook, a registry change, a reload): claim now instead of at the next poll."""
        self._wake.set()

    @property
    def alarms(self) -> dict[str, str]:
        """App -> reason of every configuration alarm (``/readyz`` lists them)."""
        return self.circuits.alarms

    @property
    def breakers(self) -> dict[str, Breaker]:
        return self.circuits.breakers

    async def run(self) -> None:
        """Recover what a dead process left claimed, then claim and deliver until :meth:`stop`."""
        await self.upkeep.recover(lambda: self._stopping)
        while not self._stopping:
            try:
                self.upkeep.prune_if_due()  # runs beside the loop: claims go on meanwhile
                self._wake.clear()
                full, due = await self._claim_round()
                if not full and not self._wake.is_set():  # woken meanwhile (a send ended): claim again now
                    now = self.clock.now()
                    await self._wake.wait(idle_wait(due, now, self.circuits.next_probe(now), busy=bool(self._tasks)))
            except Exception as exc:  # noqa: BLE001 - a dead loop would wedge every delivery: log, pause, go on
                event(logging.ERROR, "dispatcher loop error, retrying", error_type=type(exc).__name__)
                await self._wake.wait(IDLE_POLL)

    async def _claim_round(self) -> tuple[bool, float | StoreError | None]:
        """Claim within each app's free slots, start the jobs; (claim full, next due time). Claim and next-due
        read are queued together, behind the outcomes that sends ending in this loop turn queued: one store
        transaction records a delivery, claims its token's next one and reads the next wake-up time."""
        now = self.clock.now()
        if stale := self.admission.take_stale():  # waited half their lease (see relay.delivery.admission)
            self.upkeep.give_back(stale)
        plan = self.admission.plan(self.breakers, now, ahead=True)
        if plan.limit == 0:
            return False, await self._next_due()
        try:
            claimed, due = await asyncio.gather(
                self.store.claim(plan.limit, now, LEASE, app_limits=plan.app_limits), self._next_due())
        except StoreError as exc:
            event(logging.WARNING, "store unavailable, dispatcher paused", error=str(exc))
            return False, exc
        if claimed:
            await self._refresh()
        for n, (job, slot) in enumerate(self.admission.claimed(claimed, plan), 1):
            self._start(job, slot)
            if n % START_SLICE == 0:
                await asyncio.sleep(0)  # let waiting webhooks in between: acks come before sends
        return len(claimed) >= plan.limit, due

    async def _next_due(self) -> float | StoreError | None:
        try:
            return await self.store.next_due()
        except StoreError as exc:
            return exc

    async def _refresh(self) -> None:
        """Catch up with device changes made anywhere (after the claim: whatever changed before a claimed
        delivery was stored steers it); a store that cannot be read leaves the copy as it was."""
        try:
            await self.sync.refresh()
        except StoreError as exc:
            event(logging.WARNING, "device changes not read, routing with the copy in hand", error=str(exc))

    def _start(self, job: Job, slot: Slot) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(job, slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _slot_freed(self, slot: Slot | None = None) -> None:
        """Give ``slot`` back (None: one freed otherwise); deliveries claimed ahead start in free slots at once."""
        if slot is not None and self.admission.release(slot):
            self._wake.set()  # a batch of room is free: claim again
        while not self._stopping and (waiting := self.admission.next_waiting()) is not None:
            self._start(*waiting)

    async def run_until_idle(self, max_rounds: int = 10_000) -> None:
        """Test helper: deliver everything due now (following the fake clock), then return."""
        for _ in range(max_rounds):
            now = self.clock.now()
            plan = self.admission.plan(self.breakers, now)
            jobs = await self.store.claim(plan.limit, now, LEASE, app_limits=plan.app_limits) if plan.limit else []
            if not jobs and not self._tasks:
                return
            if jobs:
                await self._refresh()
            for job, slot in self.admission.claimed(jobs, plan):
                self._start(job, slot)
            if self._tasks:
                await asyncio.wait(set(self._tasks))

    async def stop(self, timeout: float) -> None:
        """Stop claiming; let in-flight sends finish within ``timeout`` overall; the rest stays stored."""
        self._stopping = True
        self._wake.set()
        await self.upkeep.stop()
        await self.upkeep.put_back(self.admission.take_waiting(), max(0.1, timeout / 4))  # claimed ahead
        if not self._tasks:
            return
        grace = min(CANCEL_GRACE, timeout / 4)
        _done, pending = await asyncio.wait(set(self._tasks), timeout=max(0.0, timeout - grace))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=grace)

    async def _guarded(self, job: Job, slot: Slot) -> None:
        try:
            await self.deliver(job, slot)
        except asyncio.CancelledError:
            await self._interrupted(job, slot)
            raise
        except Exception as exc:  # noqa: BLE001 - whatever it was, the delivery gets a recorded decision
            try:
                await self._failed(job, slot, exc)
            except Exception as second:  # noqa: BLE001 - the store refused even that: the lease brings it back
                event(logging.ERROR, "could not record a failed delivery; it stays claimed until recovered",
                      token=short_token(job.token), error_type=type(second).__name__)
        finally:
            # A slot given back after the send already woke the loop, whose claim was queued behind this
            # delivery's outcome (it sees the token's next delivery): another claim now would find nothing.
            if not slot.released:
                self._slot_freed(slot)

    async def _failed(self, job: Job, slot: Slot, exc: Exception) -> None:
        """An unexpected exception (a translate or provider bug): a logged wait with backoff, counted attempt."""
        now = self.clock.now()
        app = slot.pool or job.app
        self.circuits.release(job.id)  # a probe that raised must not leave its app parked
        self.metrics.delivery_errors.labels(app or "none", type(exc).__name__[:40]).inc()
        at = now + self.policy.delay(job.attempts)
        trace.delivery_error(job, exc, app, at, now)
        self._wake.set()
        if at >= job.expires_at:
            await self._persist(lambda: self.store.finish(job, EndState.EXPIRED, "expired after errors", now))
            return
        if (ended := await self._persist(lambda: self.store.retry(
                job, at, WaitReason.RETRY, f"unexpected {type(exc).__name__}", app=app, now=now))) is not None:
            trace.ended_in_store(self.metrics, job, ended, app, None, now, None)

    async def _interrupted(self, job: Job, slot: Slot) -> None:
        """Cancelled by stop() past its timeout: put the delivery back, due now, within the stop's grace."""
        self.circuits.release(job.id)
        put_back = self.store.retry(job, self.clock.now(), WaitReason.RETRY, "interrupted by shutdown",
                                    app=slot.pool or job.app, count_attempt=False)
        try:  # not recorded in time: it stays claimed, and store.recover() makes it due at the next start
            await asyncio.wait_for(asyncio.shield(put_back), CANCEL_GRACE)
        except (TimeoutError, StoreError, asyncio.CancelledError):
            pass

    def _slots_changed(self, what: str, pool: str, count: int) -> None:
        gauge = self.metrics.slots_in_use if what == "running" else self.metrics.claimed_ahead
        self.metrics.child(gauge, pool or "unrouted").set(count)

    # -- one delivery --------------------------------------------------------------------------------

    async def deliver(self, job: Job, slot: Slot | None = None) -> None:
        """Route, translate, send and record one claimed delivery (counted in ``slot``'s pool)."""
        slot = slot or Slot(self.admission.pool_of(job.app))
        now = self.clock.now()
        try:
            notification = load_notification(job.data)
        except (InvalidWebhook, ValueError) as exc:
            await self.record_end(job, EndState.DEAD_LETTER, f"unreadable stored notification: {exc}", None)
            return
        route = self.registry.lookup(job.token)
        expires_at = job.expires_at
        if route is not None and isinstance(notification, Event):  # now its app is known (or may have changed)
            expires_at = min(expires_at, job.received_at + event_ttl(route.app, self.registry.apps))
        if now >= expires_at:
            await self.record_end(job, EndState.EXPIRED, "expired before it could be sent", route)
            return
        if self.registry.is_dead(job.token):
            await self.record_end(job, EndState.TOKEN_DEAD, "token was reported dead earlier", route)
            return
        if route is None:
            await self._unroutable(job, now)
            return
        if not await self._admit(job, slot, route, now, expires_at):
            return
        provider = self._providers().get(route.app.name)
        if provider is None:
            self.circuits.release(job.id)
            await self.wait(job, now + self.settings.config_error_retry, WaitReason.CONFIG_ERROR,
                            "no provider for this app", route, count=False, expires_at=expires_at)
            return
        self.metrics.inflight.inc()
        started = time.perf_counter()
        try:
            result = await self.refitter.send(provider, notification, route, job.delivery_id, now, expires_at)
        finally:
            self.metrics.inflight.dec()
            self.metrics.child(self.metrics.provider_latency, route.app.platform).observe(time.perf_counter() - started)
            self._slot_freed(slot)  # the send is over: the app's slot serves its next delivery
        # Each store write in record() is shielded on its own; a cancellation (stop() past its timeout) between
        # two of them leaves the job claimed, to be delivered again after the restart: at least once.
        await self.record(job, route, result, expires_at,
                          replaced=self._providers().get(route.app.name) is not provider)

    async def _admit(self, job: Job, slot: Slot, route: Route, now: float, expires_at: float) -> bool:
        """The app's circuit and slots: False when the delivery was put back to wait instead."""
        app = route.app.name
        breaker = self.circuits[app]
        if not breaker.admit(job.id, now):
            reason = WaitReason.CONFIG_ERROR if breaker.alarm else WaitReason.CIRCUIT_OPEN
            await self.wait(job, max(breaker.open_until, now), reason, breaker.alarm or "circuit open", route,
                            count=False, expires_at=expires_at)
            return False
        if not self.admission.move(slot, app):
            # Claimed under another pool (no hint, or the device moved): it waits, due now, in its app's queue.
            breaker.release(job.id)
            await self.wait(job, now, WaitReason.RETRY, "waiting for a free slot of its app", route, count=False,
                            expires_at=expires_at)
            return False
        self._slot_freed()  # if it moved, its former pool has a free slot now
        return True

    async def _unroutable(self, job: Job, now: float) -> None:
        deadline = job.received_at + self.settings.unroutable_grace
        if now >= deadline:
            await self.record_end(job, EndState.UNROUTABLE, "no registry entry for this token", None)
        else:
            # Parked until the grace period ends; a registry reload or a device added releases it sooner.
            await self.wait(job, deadline, WaitReason.UNROUTABLE, "no registry entry yet", None, count=False)

    async def record(self, job: Job, route: Route, result: SendResult, expires_at: float, *,
                     replaced: bool = False) -> None:
        """Turn a provider answer into a stored end state or a scheduled wait.

        ``replaced``: a reload swapped the app's provider while this send was in flight. Its config error is
        about credentials no longer in use: no alarm, the delivery is tried again at once with the new ones.
        """
        app, platform = route.app.name, route.app.platform
        self.metrics.child(self.metrics.sends, platform, app, job.kind, result.outcome.value).inc()
        now = self.clock.now()
        if result.outcome is Outcome.SENT:
            self.circuits.delivered(app, job.token)
            await self._remember_environment(route, result)
            await self._succeeded(app)
            self.metrics.child(self.metrics.delivery_latency, platform).observe(max(0.0, now - job.received_at))
            await self.record_end(job, EndState.SENT, "", route, result.status)
        elif result.outcome is Outcome.TOKEN_DEAD:
            await self._succeeded(app)
            await self._token_dead(job, route, result, now)
        elif result.outcome in (Outcome.PERMANENT, Outcome.TOO_BIG):  # TOO_BIG here: refitting gave up
            await self._succeeded(app)
            await self.record_end(job, EndState.DEAD_LETTER, result.reason, route, result.status)
        elif result.outcome in (Outcome.CONFIG_ERROR, Outcome.MISMATCH) and replaced:
            self.circuits.release(job.id)
            await self.wait(job, now, WaitReason.CONFIG_ERROR, f"{result.reason} (replaced credentials)", route,
                            count=False, status=result.status, expires_at=expires_at)
        elif result.outcome is Outcome.MISMATCH:  # dead token or the app's mistake: judged in context
            verdict, at, reason = self.circuits.mismatch(route, job, result, now, self.settings, self.policy)
            if verdict is Verdict.TOKEN_DEAD:
                await self._token_dead(job, route, result, now)
            else:
                await self.wait(job, at, WaitReason.CONFIG_ERROR if verdict is Verdict.APP_ALARM else WaitReason.RETRY,
                                reason, route, count=True, status=result.status, expires_at=expires_at)
        elif result.outcome is Outcome.CONFIG_ERROR:
            at = self.circuits.misconfigured(app, job, result, now, self.settings)
            await self.wait(job, at, WaitReason.CONFIG_ERROR, result.reason, route, count=False,
                            status=result.status, expires_at=expires_at)
        else:
            breaker = self.circuits[app]
            # A failure while the circuit was already open (its probe, or a send that overlapped the opening) is
            # the circuit's, not the delivery's: the delivery's backoff counts from the circuit's opening.
            counts = not breaker.is_open
            self.circuits.failed(app, job, result, now, self.settings)
            if breaker.is_open:  # parked for the next probe: its own backoff must not hide a recovery
                wait, at = WaitReason.CIRCUIT_OPEN, breaker.open_until
            else:
                wait, at = WaitReason.RETRY, now + self.policy.delay(job.attempts, result.retry_after)
            await self.wait(job, at, wait, result.reason, route, count=counts, status=result.status,
                            expires_at=expires_at)

    async def _token_dead(self, job: Job, route: Route, result: SendResult, now: float) -> None:
        if await self._persist(lambda: self.store.mark_dead(job.token, result.reason, now)):
            self.metrics.dead_tokens.labels(route.app.platform, route.app.name).inc()
            event(logging.WARNING, "push token is dead", app=route.app.name, token=short_token(job.token),
                  reason=result.reason)
        await self.record_end(job, EndState.TOKEN_DEAD, result.reason, route, result.status)

    async def _remember_environment(self, route: Route, result: SendResult) -> None:
        """An APNs sandbox fallback found the device token's host: keep it (store: restarts and other instances;
        every process's copy at its next refresh), so that its later pushes go there without asking production
        first."""
        environment = result.learned_environment
        if environment is not None:
            await self._persist(lambda: self.store.remember_environment(route.device_token, environment,
                                                                       self.clock.now()))
            event(logging.INFO, "APNs environment of a device token learned and remembered", app=route.app.name,
                  token=short_token(route.device_token), environment=environment)

    async def _succeeded(self, app: str) -> None:
        """The provider answered: when that closes the app's circuit, release what it parked."""
        if not self.circuits.succeeded(app):
            return
        released = await self._persist(lambda: self.store.wake(self.clock.now(), apps={app}))
        event(logging.INFO, "app circuit closed, parked deliveries released", app=app, released=released)
        self._wake.set()

    async def wait(self, job: Job, at: float, reason: WaitReason, detail: str, route: Route | None, *,
                   count: bool, status: int | None = None, expires_at: float | None = None) -> None:
        """Put a claimed delivery back until ``at`` for a typed reason (or end it expired if that is too late)."""
        if at >= (job.expires_at if expires_at is None else expires_at):
            await self.record_end(job, EndState.EXPIRED, f"expired while waiting ({detail})"[:200], route, status)
            return
        app = route.app.name if route else None
        platform = route.app.platform if route else "none"
        now = self.clock.now()
        if (ended := await self._persist(lambda: self.store.retry(  # not None: superseded (never sent)
                job, at, reason, detail[:500], app=app, count_attempt=count, now=now))) is not None:
            trace.ended_in_store(self.metrics, job, ended, app, platform, now, status)
            return
        self.metrics.child(self.metrics.retries, platform, app or "none", reason.value).inc()
        trace.delivery_waits(job, reason, at, app, now, status, detail)

    def clear_alarms(self, changed: Collection[str] | None = None) -> None:
        """After a reload: every alarm cleared; the circuits of ``changed`` apps (default: all) closed, the others
        kept (an outage goes on whatever the reload; its deliveries are released by the reload's wake)."""
        self.circuits.clear(changed)
        self._wake.set()

    async def record_end(self, job: Job, end: EndState, reason: str, route: Route | None,
                         status: int | None = None) -> None:
        """Store an end state, count it and trace it."""
        platform = route.app.platform if route else "none"
        app = route.app.name if route else None
        self.metrics.child(self.metrics.ended, platform, app or "none", job.kind, end.value).inc()
        now = self.clock.now()
        trace.delivery_ended(job, end, app, now, status, reason)
        await self._persist(lambda: self.store.finish(job, end, reason, now))

    async def _persist(self, op: Callable[[], Awaitable[T]]) -> T:
        return await persist(op, lambda: self._stopping)
