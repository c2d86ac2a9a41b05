"""Per-app admission: how many deliveries of each app may be claimed and in flight at once (SPEC §6).

Each configured app has its own slots (``apps.<name>.concurrency``, never more than ``delivery.concurrency``),
so one app's hung sends or backlog can fill only its own. Deliveries not (yet) routed to a configured app (no
app hint: unroutable, stored before hints existed, or an app since removed) share a small pool of their own;
they hold it only while being routed, then move to their app's slots or wait in the store. A claim asks the
store for each app's free slots (``app_limits``), and for none of an app whose circuit is open, so parked
deliveries stay in the store instead of being claimed and put back in a loop. An app whose backlog has the
delivery process to itself (no other app sending) may claim as many again as its slots, to wait claimed and
start the moment one of its sends is answered (:class:`FreeSlots`). One that waits half its claim's lease goes
back to the store instead (:meth:`Admission.take_stale`): once the lease ran out another claim could take it
too, and both copies would be sent.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from relay.config import App, DeliverySettings
from relay.delivery.policy import Breaker
from relay.store.base import Job

UNROUTED = ""  # the pool of deliveries without a configured app (app names are never empty)
UNROUTED_SHARE = 16  # the unrouted pool gets delivery.concurrency / 16 slots (at least 1)
# An app claims ahead only while every other app has been idle this long (seconds): claims ahead give a backlog
# the delivery process's spare time, which another app's pushes are served from (docs/performance.md).
AHEAD_QUIET = 1.0


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
                 on_change: Callable[[str, str, int], None] | None = None,
                 clock: Callable[[], float] = time.time, stale_after: float = math.inf) -> None:
        self.running: dict[str, int] = {}
        self.hungry: dict[str, bool] = {}  # the last claim filled this pool's allowance: more may be due
        # Claimed ahead, with when (``clock``, the claims' own): each starts when a slot of its app frees.
        self.waiting: dict[str, deque[tuple[Job, float]]] = {}
        self._clock, self._stale_after = clock, stale_after
        self._active_until: dict[str, float] = {}  # monotonic time until which a pool counts as sending
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

    def ahead(self, pool: str) -> int:
        """How many more of ``pool``'s deliveries may wait claimed ahead of a free slot (up to its slots): none
        while another app has a send running or started one within ``AHEAD_QUIET`` seconds."""
        if pool == UNROUTED or self.others_active(pool):
            return 0
        return max(0, self.limits.get(pool, 0) - len(self.waiting.get(pool, ())))

    def others_active(self, pool: str) -> bool:
        """Whether an app other than ``pool`` has a send running or started one within ``AHEAD_QUIET``."""
        now = time.monotonic()
        # A copy taken in one step: the store's thread reads this (FreeSlots) while the loop may add an app.
        active = tuple(self._active_until.items())
        return any(other not in (pool, UNROUTED) and (self.running.get(other, 0) > 0 or until > now)
                   for other, until in active)

    def claim_min(self, pool: str) -> int:
        """Freed slots worth a claim of their own: batches, not one claim per finished send."""
        return max(1, min(self.batch, self.limits.get(pool, 1)) // 8)

    def plan(self, breakers: Mapping[str, Breaker], now: float, *, ahead: bool = False) -> ClaimPlan:
        """Each app's free slots (one probe or none while its circuit is open); with ``ahead``, for an app
        whose backlog has the delivery process to itself, read when the store runs the claim and with room to
        claim ahead (:class:`FreeSlots`); the unrouted share; ``limit`` is what they could all be by then."""
        app_limits = FreeSlots(self, breakers, now, ahead)
        unrouted = self.free(UNROUTED)
        return ClaimPlan(min(self.batch, app_limits.ceiling() + unrouted), app_limits, unrouted)

    def claimed(self, jobs: list[Job], plan: ClaimPlan) -> list[tuple[Job, Slot]]:
        """Count claimed jobs in their pools: those with a free slot (and every unrouted one: a soft bound) are
        returned with it, to start now; the others wait claimed ahead (:meth:`next_waiting`). Notes which
        pools took all they were allowed."""
        starts: list[tuple[Job, Slot]] = []
        taken: dict[str, int] = {}
        now = self._clock()
        for job in jobs:
            pool = self.pool_of(job.app)
            taken[pool] = taken.get(pool, 0) + 1
            if pool == UNROUTED or self.free(pool) > 0:
                self._add(pool, 1)
                starts.append((job, Slot(pool)))
            else:
                self.waiting.setdefault(pool, deque()).append((job, now))
                self._changed("waiting", pool)
        full = len(jobs) >= plan.limit
        for pool in self.limits:
            allowed = plan.unrouted if pool == UNROUTED else plan.app_limits.get(pool, 0)
            self.hungry[pool] = full or (allowed > 0 and taken.get(pool, 0) >= allowed)
        # Each app's first before any app's second (then third...): another app's new push is not started
        # behind a backlog's refill of a whole claim.
        seen: dict[str, int] = {}
        ranked: list[tuple[int, int, Job, Slot]] = []
        for n, (job, slot) in enumerate(starts):
            seen[slot.pool] = seen.get(slot.pool, -1) + 1
            ranked.append((seen[slot.pool], n, job, slot))
        ranked.sort(key=lambda r: (r[0], r[1]))
        return [(job, slot) for _, _, job, slot in ranked]

    def next_waiting(self) -> tuple[Job, Slot] | None:
        """A delivery claimed ahead whose app has a free slot now, with that slot; None when there is none. One
        of an app a reload removed starts in the unrouted share (a soft bound), to be routed as it is now."""
        fresh_since = self._clock() - self._stale_after
        for pool, queue in self.waiting.items():
            # A stale one at the head is left for take_stale (the next claim round): never started late.
            if queue and (pool not in self.limits or self.free(pool) > 0) and queue[0][1] > fresh_since:
                into = pool if pool in self.limits else UNROUTED
                job, _ = queue.popleft()
                self._changed("waiting", pool)
                self._add(into, 1)
                return job, Slot(into)
        return None

    def take_waiting(self) -> list[Job]:
        """Every delivery claimed ahead and not started (a stop puts them back in the store)."""
        jobs = [job for queue in self.waiting.values() for job, _ in queue]
        for pool, queue in self.waiting.items():
            queue.clear()
            self._changed("waiting", pool)
        return jobs

    def take_stale(self) -> list[Job]:
        """Deliveries claimed ahead ``stale_after`` seconds ago or more and not started, taken out of the wait
        (to be given back to the store: see the module doc)."""
        before, stale = self._clock() - self._stale_after, []
        for pool, queue in self.waiting.items():
            if queue and queue[0][1] <= before:
                while queue and queue[0][1] <= before:  # claimed in order: the oldest are first
                    stale.append(queue.popleft()[0])
                self._changed("waiting", pool)
        return stale

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
        """Whether ``pool`` should claim now: it has no backlog, or a batch of its slots is free (counting the
        room to claim ahead)."""
        return not self.hungry.get(pool, False) or self.free(pool) + self.ahead(pool) >= self.claim_min(pool)

    def total(self) -> int:
        return sum(self.running.values())

    def _add(self, pool: str, n: int) -> None:
        self.running[pool] = self.running.get(pool, 0) + n
        if n > 0:
            self._active_until[pool] = time.monotonic() + AHEAD_QUIET
        self._changed("running", pool)

    def _changed(self, what: str, pool: str) -> None:
        """Tell ``on_change`` how many of the pool's deliveries are ``running`` or ``waiting`` (its metrics)."""
        if self._on_change is not None:
            count = self.running.get(pool, 0) if what == "running" else len(self.waiting.get(pool, ()))
            self._on_change(what, pool, count)


class FreeSlots(Mapping[str, int]):
    """Each app's claimable slots (:meth:`Breaker.claimable`): for an app whose backlog has the delivery process
    to itself (``ahead``, and no other app sending: :meth:`Admission.ahead`), its free slots and its room to
    wait claimed ahead, read when the store reads them; for the others, its free slots when the claim is made.

    A store runs a queued claim once the write lock is free, under a stream of webhooks after their commits:
    15-40 ms, about as long as an APNs answer takes. Counted when the claim was queued, the slots of the sends
    answered meanwhile stayed idle until the next claim (48 of 100 taken per claim, p50). Read when the claim
    runs, they are refilled by it. Each value is read once and kept, so the claim's bookkeeping
    (:meth:`Admission.claimed`) sees what the store was allowed; a slot taken between that read and the claim's
    return (routing moved a running delivery to this app) leaves the app one over its slots until a send ends,
    as a lowered limit does.
    """

    def __init__(self, admission: Admission, breakers: Mapping[str, Breaker], now: float, ahead: bool) -> None:
        self._admission, self._breakers, self._now = admission, breakers, now
        self._pools = [pool for pool in admission.limits if pool != UNROUTED]
        self._read: dict[str, int] = {}
        self._live = {pool for pool in self._pools if ahead and not admission.others_active(pool)}
        for pool in self._pools:
            if pool not in self._live:
                self._read[pool] = self._claimable(pool, admission.free(pool))

    def __getitem__(self, pool: str) -> int:
        if pool not in self._read:
            if pool not in self._pools:
                raise KeyError(pool)
            self._read[pool] = self._claimable(pool, self._admission.free(pool) + self._admission.ahead(pool))
        return self._read[pool]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    def ceiling(self) -> int:
        """What the apps could claim by the time the claim runs (each live app: all its slots and as many again)."""
        return sum(self._claimable(pool, 2 * self._admission.limits[pool]) if pool in self._live else self[pool]
                   for pool in self._pools)

    def _claimable(self, pool: str, free: int) -> int:
        breaker = self._breakers.get(pool)
        return breaker.claimable(self._now, free) if breaker is not None else free
