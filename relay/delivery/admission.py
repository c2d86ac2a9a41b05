"""Per-app admission: how many deliveries of each app may be claimed and in flight at once (SPEC §6).

Each configured app has its own slots (``apps.<name>.concurrency``, never more than ``delivery.concurrency``),
so one app's hung sends or backlog can fill only its own. Deliveries not (yet) routed to a configured app (no
app hint: unroutable, stored before hints existed, or an app since removed) share a small pool of their own;
they hold it only while being routed, then move to their app's slots or wait in the store. A claim asks the
store for each app's free slots (``app_limits``), and for none of an app whose circuit is open, so parked
deliveries stay in the store instead of being claimed and put back in a loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from relay.config import App, DeliverySettings
from relay.delivery.policy import Breaker
from relay.store.base import Job

UNROUTED = ""  # the pool of deliveries without a configured app (app names are never empty)
UNROUTED_SHARE = 16  # the unrouted pool gets delivery.concurrency / 16 slots (at least 1)


@dataclass
class Slot:
    """The pool one running delivery is counted in; it moves when routing finds another app.

    A slot is given back once the provider has answered (``released``): recording the outcome is store work,
    and holding the app's slot through it would cap the sends in flight below the app's ``concurrency``.
    """

    pool: str
    released: bool = False


@dataclass(frozen=True)
class ClaimPlan:
    """What one claim may take: ``limit`` in all, at most ``app_limits[app]`` of each app.

    ``unrouted`` is the free share of deliveries without a configured app: the store lets those fill ``limit``,
    so it is a soft bound (they hold a slot only while being routed).
    """

    limit: int
    app_limits: Mapping[str, int]
    unrouted: int


class Admission:
    """Slots per app and for unrouted deliveries; counts what is running, never blocks."""

    def __init__(self, apps: Mapping[str, App], settings: DeliverySettings,
                 on_change: Callable[[str, int], None] | None = None) -> None:
        self.running: dict[str, int] = {}
        self.hungry: dict[str, bool] = {}  # the last claim filled this pool's allowance: more may be due
        self._on_change = on_change
        self.configure(apps, settings)

    def configure(self, apps: Mapping[str, App], settings: DeliverySettings) -> None:
        """New limits (a reload); deliveries running keep their slots, over the limit until they end."""
        self.limits = {name: max(1, min(app.concurrency, settings.concurrency)) for name, app in apps.items()}
        self.limits[UNROUTED] = max(1, settings.concurrency // UNROUTED_SHARE)
        self.batch = max(1, settings.batch_size)

    def pool_of(self, app: str | None) -> str:
        """The pool a delivery with this app hint is claimed into."""
        return app if app is not None and app in self.limits else UNROUTED

    def free(self, pool: str) -> int:
        return max(0, self.limits.get(pool, 0) - self.running.get(pool, 0))

    def claim_min(self, pool: str) -> int:
        """Freed slots worth a claim of their own: batches, not one claim per finished send."""
        return max(1, min(self.batch, self.limits.get(pool, 1)) // 8)

    def plan(self, breakers: Mapping[str, Breaker], now: float) -> ClaimPlan:
        """Each app's free slots (one probe or none while its circuit is open), and the unrouted share."""
        app_limits: dict[str, int] = {}
        for pool in self.limits:
            if pool == UNROUTED:
                continue
            breaker = breakers.get(pool)
            free = self.free(pool)
            app_limits[pool] = breaker.claimable(now, free) if breaker is not None else free
        unrouted = self.free(UNROUTED)
        return ClaimPlan(min(self.batch, sum(app_limits.values()) + unrouted), app_limits, unrouted)

    def claimed(self, jobs: list[Job], plan: ClaimPlan) -> list[Slot]:
        """Count claimed jobs in their pools; note which pools took all they were allowed."""
        slots = [Slot(self.pool_of(job.app)) for job in jobs]
        taken: dict[str, int] = {}
        for slot in slots:
            self._add(slot.pool, 1)
            taken[slot.pool] = taken.get(slot.pool, 0) + 1
        full = len(jobs) >= plan.limit
        for pool in self.limits:
            allowed = plan.unrouted if pool == UNROUTED else plan.app_limits.get(pool, 0)
            self.hungry[pool] = full or (allowed > 0 and taken.get(pool, 0) >= allowed)
        return slots

    def move(self, slot: Slot, pool: str) -> bool:
        """Move a running delivery to ``pool`` if it has a free slot (routing found another app)."""
        if slot.pool == pool:
            return True
        if self.free(pool) == 0:
            return False
        self._add(slot.pool, -1)
        self._add(pool, 1)
        slot.pool = pool
        return True

    def release(self, slot: Slot) -> bool:
        """Give the slot back (once: after the send, or when the delivery ends without one); True when a claim
        is worth it now.

        Its token's next delivery may be due now (per-device order holds it back until this one ends), so an
        app with room claims at once; an app with a backlog (its last claim took all it was allowed) claims
        when a batch of its slots is free, not once per finished send: each claim scans the due heads.
        """
        if not slot.released:
            slot.released = True
            self._add(slot.pool, -1)
        return self.worth_claiming(slot.pool)

    def worth_claiming(self, pool: str) -> bool:
        """Whether ``pool`` should claim now: it has no backlog, or a batch of its slots is free."""
        return not self.hungry.get(pool, False) or self.free(pool) >= self.claim_min(pool)

    def total(self) -> int:
        return sum(self.running.values())

    def _add(self, pool: str, n: int) -> None:
        value = self.running[pool] = self.running.get(pool, 0) + n
        if self._on_change is not None:
            self._on_change(pool, value)
