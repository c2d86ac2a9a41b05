"""Translate and send one push; when the provider counts it too big, fit it again, smaller, and send it again.

SPEC §5: the budget counts each provider the most conservative plausible way, yet a provider may count otherwise
(Google does not publish FCM's count). Its "too big" answer (APNs ``413 PayloadTooLarge``, FCM ``Message is too
big``) is never the end of a push: the push is fitted again to half the size that was refused and sent, until it
is accepted or the skeleton (which no budget shortens) is refused too. Each refit is counted; the first of each
app is logged (a provider counting otherwise is worth one line, not one per push).
"""

from __future__ import annotations

import logging

from relay.delivery.translate import counted_size, translate
from relay.inbound.parse import Notification
from relay.observability import Metrics, event
from relay.outcome import Outcome, SendResult
from relay.providers import Provider
from relay.registry.device import Route


class Refitter:
    """Sends through a provider, refitting on "too big"; remembers which apps it has logged."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.logged: set[str] = set()

    async def send(self, provider: Provider, notification: Notification, route: Route, delivery_id: str,
                   now: float, expires_at: float) -> SendResult:
        """The provider's answer to the push, fitted again (smaller) as often as it answers "too big"."""
        push = translate(notification, route, delivery_id, now, expires_at)
        result = await provider.send(push)
        size = counted_size(push)
        while result.outcome is Outcome.TOO_BIG:
            smaller = translate(notification, route, delivery_id, now, expires_at, budget=size // 2)
            smaller_size = counted_size(smaller)
            if smaller_size >= size:  # only the skeleton is left: nothing more to take away
                break
            self._refitted(route, result, size, smaller_size)
            push, size = smaller, smaller_size
            result = await provider.send(push)
        return result

    def _refitted(self, route: Route, result: SendResult, size: int, smaller: int) -> None:
        app = route.app.name
        self.metrics.child(self.metrics.refits, route.app.platform, app).inc()
        if app not in self.logged:
            self.logged.add(app)
            event(logging.WARNING, "provider counted a push too big: fitted again smaller and resent (logged once "
                  "per app)", app=app, reason=result.reason, counted=size, refit_to=smaller)
