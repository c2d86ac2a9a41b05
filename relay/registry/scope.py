"""Who may change a device entry: the API keys' scope policy, decided beside the data.

A ``register`` key is the kind an app ships (it can be extracted), so it may only register a push token as
itself: never map it to another device token, never take over an entry that maps elsewhere or belongs to
another app, never change a registered device's environment. A ``manage`` key (a backend's) may do all of
that within its apps. The stores call :meth:`Scope.decide` inside the same transaction (SQLite) or under
the same watch (Redis) as the write, against the entry as it is in the store at that moment, so two
processes (or two relays) with stale copies cannot race a ``register`` key past a ``manage`` mapping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relay.registry.device import Device


class Refusal(enum.Enum):
    """Why a conditional device write was refused (the device API answers 403 for each)."""

    OTHER_APP = "other_app"  # the entry belongs to an app the key may not manage
    NOT_ITSELF = "not_itself"  # scope register: the device token must be the push token itself
    TAKEN = "taken"  # scope register: the entry maps to another device token or app
    ENVIRONMENT = "environment"  # scope register: the entry's environment cannot be changed


class Removal(enum.Enum):
    """What a (conditional) removal did."""

    REMOVED = "removed"
    ABSENT = "absent"  # no run-time entry for this token
    OTHER_APP = "other_app"  # the run-time entry belongs to an app the key may not manage
    SCOPE = "scope"  # scope register: removing needs scope manage


@dataclass(frozen=True, slots=True)
class Scope:
    """What an API key may write: its scope and apps, and the registry file's entry for the token (the store
    knows only run-time entries; a file entry counts when no run-time one overlays it)."""

    manages: bool
    apps: frozenset[str]
    configured: frozenset[str]  # every app of the configuration: an entry of an app no longer there is no one's
    base: Device | None = None

    def decide(self, device: Device, stored: Device | None) -> Device | Refusal:
        """The device to store in place of ``stored`` (the run-time entry now in the store), or why not.

        Omitted by a ``register`` key, the environment of an entry it re-registers stays as it was.
        """
        existing = stored if stored is not None else self.base
        if existing is not None and existing.app not in self.apps and existing.app in self.configured:
            return Refusal.OTHER_APP
        if self.manages:
            return device
        if device.device_token != device.token:
            return Refusal.NOT_ITSELF
        if existing is None:
            return device
        if (existing.app, existing.device_token) != (device.app, device.token):
            return Refusal.TAKEN
        if device.environment is not None and device.environment != existing.environment:
            return Refusal.ENVIRONMENT
        return Device(device.token, device.app, device.device_token, existing.environment)

    def decide_removal(self, stored: Device | None) -> Removal:
        """Whether this key may remove ``stored``, the run-time entry now in the store."""
        if not self.manages:
            return Removal.SCOPE
        if stored is None:
            return Removal.ABSENT
        if stored.app not in self.apps and stored.app in self.configured:
            return Removal.OTHER_APP
        return Removal.REMOVED


@dataclass(frozen=True, slots=True)
class DevicePut:
    """The outcome of a (conditional) device write: the stored device and what it replaced, or the refusal."""

    device: Device | None
    replaced: Device | None = None  # the run-time entry the write replaced (None: a new run-time entry)
    refusal: Refusal | None = None


def removal(stored: Device | None, scope: Scope | None) -> Removal:
    """What removing ``stored`` (the run-time entry now in the store) does: as ``scope`` allows, or, without
    one (an operator command), whenever there is an entry."""
    if scope is not None:
        return scope.decide_removal(stored)
    return Removal.ABSENT if stored is None else Removal.REMOVED
