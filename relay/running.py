"""The parts one running relay holds, and the app key through which HTTP handlers reach them.

Both sides import this small module: :mod:`relay.runtime` builds and swaps the parts, :mod:`relay.http`
reads them per request. Keeping the holder here (and not beside the builder) is what keeps ``http`` from
importing ``runtime``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from relay.config import Config
from relay.delivery.dispatcher import Dispatcher
from relay.delivery.health import AppHealth, for_apps
from relay.delivery.policy import Clock
from relay.inbound.auth import Authenticator
from relay.observability import Metrics
from relay.providers import Bounded
from relay.registry.routing import Registry
from relay.registry.sync import OverlaySync
from relay.store import Store


@dataclass
class Relay:
    """Everything one running relay holds; reachable from handlers through ``RELAY_KEY``."""

    config: Config
    store: Store
    registry: Registry
    metrics: Metrics
    clock: Clock
    auth: Authenticator
    providers: dict[str, Bounded] = field(default_factory=dict)
    dispatcher: Dispatcher | None = None
    started: bool = False
    draining: bool = False
    stop_deadline: float | None = None  # loop time by which a drain ends: one shutdown_timeout for every phase
    retiring: set[asyncio.Task[None]] = field(default_factory=set)
    # A multi-process relay: the delivery processes' merged view of their apps (relay.runtime.shared).
    peer_health: Callable[[], dict[str, AppHealth]] | None = None

    def own_health(self) -> dict[str, AppHealth]:
        """What this process's dispatcher knows of each app (nothing when it delivers nothing)."""
        if self.dispatcher is None:
            return {}
        return self.dispatcher.circuits.health(self.dispatcher.clock.now())

    async def app_health(self) -> dict[str, AppHealth]:
        """Every configured app's delivery state, with its oldest waiting delivery (StoreError propagates)."""
        known = self.peer_health() if self.peer_health is not None else self.own_health()
        oldest = await self.store.oldest_waiting(list(self.config.apps))
        return for_apps(self.config.apps, known, oldest)
    credentials: dict[Path, str] = field(default_factory=dict)  # SHA-256 of each systemd credential file read
    overlay: OverlaySync = field(init=False)  # how ``registry`` follows the store's device state

    def __post_init__(self) -> None:
        self.overlay = OverlaySync(self.store, self.registry)

    @property
    def ready_problems(self) -> list[str]:
        """Why ``/readyz`` answers 503 (empty when ready), store reachability aside: starting or draining.

        Never an app's alarm (SPEC §8): readiness says webhooks can be accepted and stored, and a load balancer
        that took every instance out for one app's bad key would make Parley delete every app's tokens.
        """
        problems = [] if self.started else ["starting"]
        if self.draining:
            problems.append("draining")
        return problems


RELAY_KEY = web.AppKey("relay", Relay)
