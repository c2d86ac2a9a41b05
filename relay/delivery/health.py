"""Per-app delivery health: is each app's traffic leaving, and if not, why (SPEC §8, the status endpoint).

The dispatcher's circuits (:mod:`relay.delivery.circuits`) know the circuit, the alarm and the reason of the
last failure, and when a provider last accepted a push; the store knows how old the oldest waiting delivery
is. This module turns both into one typed value per app, :class:`AppHealth`, and renders it for the three
places an operator looks: ``GET /status`` (JSON), ``parley-relay stats`` (a table) and systemd's ``STATUS=``
line (:func:`summary_line`). Delivery processes of a multi-process relay publish their part as JSON
(:func:`to_json`), and whoever answers merges the parts (:func:`merge`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from relay.delivery.policy import Breaker

CircuitState = Literal["closed", "open", "half-open"]
_SEVERITY: dict[CircuitState, int] = {"closed": 0, "half-open": 1, "open": 2}


@dataclass(frozen=True)
class AppHealth:
    """One app's delivery state. Times are Unix wall times; None where nothing is known (yet)."""

    app: str
    circuit: CircuitState = "closed"
    alarm: str | None = None  # a configuration alarm (the operator must act)
    reason: str | None = None  # why the circuit is open: the alarm, or the failure that opened it
    last_success: float | None = None  # a provider last accepted a push of this app (this run of the relay)
    oldest_waiting: float | None = None  # arrival of the oldest delivery still waiting (from the store)

    @property
    def delivering(self) -> bool:
        """False while the app's deliveries are parked (circuit not closed)."""
        return self.circuit == "closed"

    def as_dict(self, now: float) -> dict[str, Any]:
        """The ``/status`` shape: ages in seconds relative to ``now``."""
        return {
            "delivering": self.delivering,
            "circuit": self.circuit,
            "alarm": self.alarm,
            "reason": self.reason,
            "last_success": self.last_success,
            "last_success_age_seconds": _age(self.last_success, now),
            "oldest_waiting_age_seconds": _age(self.oldest_waiting, now),
        }


def _age(at: float | None, now: float) -> float | None:
    return None if at is None else round(max(0.0, now - at), 3)


def circuit_state(breaker: Breaker, now: float) -> CircuitState:
    """Closed; open (nothing is sent until the next probe); half-open (a probe is due or under way)."""
    if not breaker.is_open:
        return "closed"
    return "half-open" if breaker.probe is not None or now >= breaker.open_until else "open"


def from_breakers(breakers: Mapping[str, Breaker], reasons: Mapping[str, str], successes: Mapping[str, float],
                  now: float) -> dict[str, AppHealth]:
    """What one dispatcher knows, by app (apps it never saw are absent: :func:`for_apps` fills them in)."""
    found: dict[str, AppHealth] = {}
    for app in {*breakers, *successes}:
        breaker = breakers.get(app) or Breaker()
        state = circuit_state(breaker, now)
        reason = breaker.alarm or (reasons.get(app) if state != "closed" else None)
        found[app] = AppHealth(app, state, breaker.alarm, reason, successes.get(app))
    return found


def merge(parts: Iterable[Mapping[str, AppHealth]]) -> dict[str, AppHealth]:
    """Several delivery processes' views of the same apps: the worst circuit, any alarm, the latest success."""
    merged: dict[str, AppHealth] = {}
    for part in parts:
        for app, health in part.items():
            have = merged.get(app)
            if have is None:
                merged[app] = health
                continue
            worse = health if _SEVERITY[health.circuit] > _SEVERITY[have.circuit] else have
            successes = [t for t in (have.last_success, health.last_success) if t is not None]
            merged[app] = replace(worse, alarm=have.alarm or health.alarm, reason=worse.reason or have.reason,
                                  last_success=max(successes) if successes else None)
    return merged


def for_apps(apps: Iterable[str], known: Mapping[str, AppHealth],
             oldest: Mapping[str, float]) -> dict[str, AppHealth]:
    """Every configured app (closed when nobody saw it yet), with its oldest waiting delivery from the store."""
    return {app: replace(known.get(app) or AppHealth(app), oldest_waiting=oldest.get(app)) for app in sorted(apps)}


def to_json(healths: Mapping[str, AppHealth]) -> dict[str, Any]:
    """The shared-state form one delivery process publishes (no store fields: each reader asks the store)."""
    return {app: {"circuit": h.circuit, "alarm": h.alarm, "reason": h.reason, "last_success": h.last_success}
            for app, h in healths.items()}


def from_json(doc: Any) -> dict[str, AppHealth]:
    """The inverse of :func:`to_json`; entries of an unexpected shape are skipped (a newer writer)."""
    found: dict[str, AppHealth] = {}
    if not isinstance(doc, dict):
        return found
    for app, entry in doc.items():
        circuit = entry.get("circuit") if isinstance(entry, dict) else None
        if circuit not in _SEVERITY:
            continue
        last = entry.get("last_success")
        found[str(app)] = AppHealth(str(app), circuit, entry.get("alarm"), entry.get("reason"),
                                    float(last) if isinstance(last, int | float) else None)
    return found


def problems(healths: Mapping[str, AppHealth]) -> list[str]:
    """One sentence per app whose deliveries are not leaving, e.g. ``app ios: circuit open: cannot connect``."""
    return [f"app {h.app}: {'alarm' if h.alarm else 'circuit ' + h.circuit}: {h.reason or 'no reason recorded'}"
            for h in healths.values() if not h.delivering]


def summary_line(healths: Mapping[str, AppHealth], now: float) -> str:
    """A compact per-app summary for systemd's ``STATUS=``: ``ios OPEN (reason) waiting 42s; android ok``."""
    parts = []
    for h in healths.values():
        if h.delivering:
            text = f"{h.app} ok"
        else:
            text = f"{h.app} {'ALARM' if h.alarm else h.circuit.upper()} ({(h.reason or '-')[:80]})"
        if h.oldest_waiting is not None:
            text += f" waiting {_duration(now - h.oldest_waiting)}"
        parts.append(text)
    return "; ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"
