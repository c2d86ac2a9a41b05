"""The store protocol and the values that cross it."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from relay.config.model import ApnsEnvironment
from relay.outcome import EndState, WaitReason
from relay.registry.device import Device
from relay.registry.scope import DevicePut, Removal, Scope


@dataclass(frozen=True, slots=True)
class EventStream:
    """Where an event stands among the events for one push token from one agent (SPEC §2).

    The store keeps each stream's last event: a repeat of it (same ``fingerprint``) within ``window`` seconds
    is a resend (a duplicate), anything else is a new event, which supersedes the stream's queued one.
    """

    key: str  # the push token, the agent and the event's topic (see relay.inbound.accept)
    fingerprint: str  # the event's canonical body: a resend repeats it
    window: float  # seconds a repeat of the last event counts as a resend (0: never)


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """One delivery to accept: a notification for one push token."""

    token: str
    kind: str  # "message" | "event"
    data: bytes  # canonical JSON of Parley's ``data``
    dedupe_key: str
    expires_at: float
    app: str | None = None  # routing hint at acceptance (admission per app); delivery routes again
    request_id: str = ""  # the webhook's request id, for tracing
    message_id: str | None = None  # Parley's object id of a message, for tracing
    stream: EventStream | None = None  # an event's stream: it dedupes and coalesces by it, not by dedupe_key


@dataclass(frozen=True, slots=True)
class Superseded:
    """A queued event that a later one for its push token and agent ended ``superseded`` (never sent)."""

    id: str
    token: str
    app: str | None
    request_id: str
    received_at: float
    attempts: int


class Enqueued(list[bool]):
    """What :meth:`Store.enqueue` did: a flag per item (False: a duplicate), and the queued events the new ones
    ended ``superseded`` (for their log lines and metrics)."""

    def __init__(self, flags: Sequence[bool] = (), superseded: Sequence[Superseded] = ()) -> None:
        super().__init__(flags)
        self.superseded: list[Superseded] = list(superseded)


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed delivery. ``delivery_id`` is stable for its whole life (the APNs ``apns-id``)."""

    id: str
    delivery_id: str
    token: str
    kind: str
    data: bytes
    received_at: float
    expires_at: float
    attempts: int
    app: str | None = None  # the app hint stored with the delivery (see ``NewDelivery.app``)
    request_id: str = ""
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One delivery as ``parley-relay deliveries`` shows it: where it is and how it got there."""

    id: str
    delivery_id: str
    token: str
    kind: str
    app: str | None
    state: str  # "pending" | "inflight" | an EndState value
    attempts: int
    reason: str  # the last provider answer or end reason ("" when none)
    wait_reason: WaitReason | None  # why a pending delivery waits, when it was put back
    received_at: float
    next_at: float | None  # when a pending delivery is due
    finished_at: float | None
    request_id: str
    message_id: str | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery that ended dead-lettered (or another end state kept for inspection)."""

    id: str
    token: str
    kind: str
    data: bytes
    reason: str
    received_at: float
    finished_at: float


CHANGE_LOG_KEEP = 20_000  # device epochs a reader may fall behind and still read only what changed


@dataclass(frozen=True, slots=True)
class DeviceChanges:
    """Run-time device state read in one snapshot with the store's device epoch at that moment.

    ``full``: every run-time device, dead mark and learned environment (a first load, or a reader too far
    behind the change log). Otherwise only what changed after the epoch asked for, with its value now: a
    device ``None`` was removed, a token ``False`` is no longer dead, an environment ``None`` was forgotten.
    """

    epoch: int
    full: bool
    devices: Mapping[str, Device | None] = field(default_factory=dict)
    dead: Mapping[str, bool] = field(default_factory=dict)
    environments: Mapping[str, ApnsEnvironment | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one slice of :meth:`Store.prune` removed (finished deliveries, dedupe keys, other records), and
    whether there is more to do now."""

    removed: int
    more: bool


@dataclass(frozen=True)
class Stats:
    """Counts of accepted deliveries by state; ``accepted == sum(ended) + pending + inflight``."""

    accepted: int
    duplicates: int
    pending: int
    inflight: int
    ended: Mapping[EndState, int] = field(default_factory=dict)
    dead_tokens: int = 0
    devices: int = 0
    redelivered: int = 0  # in flight when a process died, so possibly sent twice (at-least-once)

    @property
    def balanced(self) -> bool:
        """The invariant that proves nothing was lost."""
        return self.accepted == sum(self.ended.values()) + self.pending + self.inflight


class Store(Protocol):
    """What the server, dispatcher and CLI need from storage; both backends pass one behaviour suite."""

    async def open(self) -> None:
        """Connect/create. Changes no delivery state: operator commands and every role open the store."""

    async def recover(self, now: float) -> int:
        """Make deliveries claimed by an owner that is gone (a crashed process) claimable again; returns how many.

        Called by a process that delivers, when it starts. Never touches what a live process has in flight.
        """

    async def close(self) -> None:
        """Flush and release resources."""

    async def ping(self) -> None:
        """Raise :class:`~relay.errors.StoreUnavailable` when the store cannot be used."""

    async def enqueue(self, items: Sequence[NewDelivery], now: float, dedupe_window: float) -> Enqueued:
        """Durably accept ``items`` (True) unless they are resends (False), in one atomic step.

        A message (no ``stream``) is a resend when its dedupe key was seen within ``dedupe_window``. An event
        is one when it repeats its stream's last event within the stream's window; a new event ends its
        stream's queued (pending, not in flight) event ``superseded``.
        """

    async def claim(self, limit: int, now: float, lease: float, *,
                    app_limits: Mapping[str, int] | None = None) -> list[Job]:
        """Atomically take up to ``limit`` due deliveries, earliest due first, at most the oldest open one per
        token. Its cost follows what it takes, not how much is stored.

        ``app_limits`` caps how many of one app's deliveries (by their stored app hint) this claim may take;
        0 skips the app. Apps not named, and deliveries without a hint, share ``limit``. So one app's backlog
        or parked deliveries never fill a claim that another app's deliveries need.
        """

    async def finish(self, job: Job, end: EndState, reason: str, now: float) -> None:
        """Record the end state of a claimed delivery (a finished delivery keeps no payload but a dead letter's)."""

    async def retry(self, job: Job, at: float, reason: WaitReason, detail: str = "", *, app: str | None = None,
                    count_attempt: bool = True, now: float | None = None) -> EndState | None:
        """Put a claimed delivery back, due at ``at``, waiting for ``reason`` (``detail``: the provider's words).

        ``app`` updates the stored app hint (the route found at delivery may differ from the one at acceptance).
        An event that a later event of its stream arrived behind (while it was in flight) ends ``superseded``
        instead (at ``now``, default the wall clock): returns that end state, else None.
        """

    async def wake(self, now: float, *, reasons: Collection[WaitReason] | None = None,
                   tokens: Collection[str] | None = None, apps: Collection[str] | None = None) -> int:
        """Make waiting deliveries due now; each filter given narrows the selection. Returns how many.

        Whatever fixes a reason calls it: a reload (config errors, parked apps, unroutable tokens), a device
        added (``tokens`` waiting as unroutable), an app's circuit closing (``apps``).
        """

    async def prune(self, now: float) -> Pruned:
        """One bounded slice of dropping finished deliveries past their retention and expired dedupe keys (and
        keeping the file bounded): a short write, so the caller calls again while ``more``, letting other work
        (claims, webhook commits) in between."""

    async def deliveries(self, *, token: str | None = None, request_id: str | None = None,
                         message_id: str | None = None, limit: int = 50) -> list[DeliveryRecord]:
        """Recent deliveries matching every filter given, newest first (finished ones while retained)."""

    async def dead_letter(self, id: str) -> DeadLetter | None:
        """One dead letter with its payload, or None."""

    async def next_due(self) -> float | None:
        """Earliest due time of any pending delivery, or None when nothing is pending."""

    async def put_device(self, device: Device, now: float, scope: Scope | None = None) -> DevicePut:
        """Add or replace a run-time device, with its declared environment (and clear a dead mark on its token).

        With ``scope`` (an API key's), the write is conditional: decided by :meth:`Scope.decide`
        against the entry in the store in the same transaction as the write, so that no stale copy and no
        concurrent writer can slip past it; a refused write changes nothing.
        """

    async def remove_device(self, token: str, scope: Scope | None = None) -> Removal:
        """Remove a run-time device; with ``scope``, only as :meth:`Scope.decide_removal` allows (atomically)."""

    async def device_epoch(self) -> int:
        """The device change counter: bumped in the same transaction as every device put or removal, dead
        mark (set or cleared) and learned environment. One small read; every process checks it."""

    async def device_changes(self, since: int | None) -> DeviceChanges:
        """What changed after epoch ``since`` (everything when None or when the change log no longer
        reaches back that far), read in one snapshot together with the epoch it brings the reader to."""

    async def get_device(self, token: str) -> Device | None:
        """One run-time device (another instance may have added it since this one loaded its overlay)."""

    async def list_devices(self) -> list[Device]:
        """All run-time devices."""

    async def remember_environment(self, device_token: str, environment: ApnsEnvironment, now: float) -> None:
        """Keep the APNs host a sandbox fallback found for ``device_token`` (for restarts and other instances)."""

    async def learned_environments(self) -> dict[str, ApnsEnvironment]:
        """Device token -> APNs host found by sandbox fallbacks."""

    async def mark_dead(self, token: str, reason: str, now: float) -> bool:
        """Mark a push token dead; True when it was not dead before."""

    async def dead_tokens(self) -> dict[str, str]:
        """Dead push tokens and the provider's reason."""

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Dead-lettered deliveries, oldest first."""

    async def retry_dead_letters(self, ids: Sequence[str] | None, now: float) -> int:
        """Queue dead letters again (all when ``ids`` is None); returns how many."""

    async def oldest_waiting(self, apps: Collection[str]) -> dict[str, float]:
        """Arrival time of each app's oldest delivery still pending or in flight (apps with none are absent).

        Cheap enough for every status request: an index seek per app (SQLite), the app's heads (Redis)."""

    async def stats(self) -> Stats:
        """Counts by state: the open deliveries counted where they are kept, so ``balanced`` proves the end-state
        counters (an audit: on SQLite it reads every open row)."""

    async def summary(self) -> Stats:
        """The figures of :meth:`stats` in time that does not grow with the queue, for what runs periodically
        (status lines, metrics): the open deliveries are what the counters say was accepted and has not ended,
        less the ones in flight (counted: at most the claims' leases)."""
