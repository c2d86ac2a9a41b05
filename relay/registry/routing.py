"""Registry stage: which app (and so platform and credentials) a Parley push token belongs to.

The YAML file (``devices:`` plus optional ``routing:`` rules) is the base; devices added or removed at run
time live in the store and overlay it. Lookups never touch the disk: the registry is an in-memory snapshot
that :meth:`Registry.replace` swaps whole on reload, so a bad new file leaves the old one in force; the
overlay follows the store through :class:`relay.registry.sync.OverlaySync` alone.

APNs environments: a device may declare its host (registry file or device API); otherwise the environment
learned by an earlier sandbox fallback (kept in the store, by device token) routes it; otherwise the app's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from relay.config import App
from relay.config.model import ApnsEnvironment
from relay.registry.device import Device, Route
from relay.registry.file import RegistryFile
from relay.store.base import DeviceChanges


class Registry:
    """Token -> route lookups over the YAML snapshot, the run-time overlay, and routing rules."""

    def __init__(self, apps: Mapping[str, App], base: RegistryFile) -> None:
        self._apps = dict(apps)
        self._base = base
        self._overlay: dict[str, tuple[str, str | None]] = {}
        self._overlay_environments: dict[str, ApnsEnvironment] = {}  # declared by run-time devices (sparse)
        self._learned: dict[str, ApnsEnvironment] = {}  # device token -> host found by the sandbox fallback
        self._dead: set[str] = set()

    @property
    def apps(self) -> Mapping[str, App]:
        return self._apps

    def replace(self, apps: Mapping[str, App], base: RegistryFile) -> None:
        """Swap in a reloaded configuration (already validated)."""
        self._apps, self._base = dict(apps), base

    def apply(self, changes: DeviceChanges) -> None:
        """Install the store's run-time devices, dead marks and learned APNs environments: all of them
        (``changes.full``) or what changed since the copy's epoch. Only :class:`~relay.registry.sync.OverlaySync`
        calls it: every process's copy follows the store through that one path."""
        if changes.full:
            self._overlay, self._overlay_environments = {}, {}
            self._dead, self._learned = set(), {}
        for token, device in changes.devices.items():
            if device is None:
                self._overlay.pop(token, None)
                self._overlay_environments.pop(token, None)
                continue
            self._overlay[token] = (device.app, None if device.device_token == token else device.device_token)
            if device.environment is None:
                self._overlay_environments.pop(token, None)
            else:
                self._overlay_environments[token] = device.environment
        for token, dead in changes.dead.items():
            if dead:
                self._dead.add(token)
            else:
                self._dead.discard(token)
        for device_token, environment in changes.environments.items():
            if environment is None:
                self._learned.pop(device_token, None)
            else:
                self._learned[device_token] = environment

    def learned_environment(self, device_token: str) -> ApnsEnvironment | None:
        """The APNs host an earlier sandbox fallback found for ``device_token``, if any."""
        return self._learned.get(device_token)

    def is_dead(self, token: str) -> bool:
        return token in self._dead

    def entry(self, token: str) -> Device | None:
        """The explicit entry for ``token`` (overlay first), without routing rules."""
        found = self._overlay.get(token)
        if found is None:
            return self.file_entry(token)
        app, device_token = found
        environments = self._overlay_environments
        return Device(token, app, device_token or token, environments.get(token) if environments else None)

    def file_entry(self, token: str) -> Device | None:
        """The registry file's entry for ``token`` (what a run-time entry overlays), if any."""
        found = self._base.devices.get(token)
        if found is None:
            return None
        app, device_token = found
        environments = self._base.environments
        return Device(token, app, device_token or token, environments.get(token) if environments else None)

    def is_runtime(self, token: str) -> bool:
        """Whether ``token``'s entry was added at run time (and so can be removed at run time)."""
        return token in self._overlay

    def tokens(self) -> Iterator[tuple[str, str]]:
        """(token, app) of every explicit entry, run-time ones in place of the YAML ones they overlay (unordered)."""
        overlay = self._overlay
        for token, (app, _device_token) in overlay.items():
            yield token, app
        for token, (app, _device_token) in self._base.devices.items():
            if token not in overlay:
                yield token, app

    def lookup(self, token: str) -> Route | None:
        """Route for ``token``: explicit entries win over rules; ``None`` when nothing matches."""
        entry = self.entry(token)
        if entry is not None:
            app = self._apps.get(entry.app)
            if app is None:
                return None
            environment = entry.environment or (self._learned.get(entry.device_token) if self._learned else None)
            return Route(app, entry.device_token, environment)
        for rule in self._base.rules:
            if rule.matches(token):
                app = self._apps.get(rule.app)
                if app is not None:
                    return Route(app, token, self._learned.get(token) if self._learned else None)
        return None

    def __len__(self) -> int:
        return len(self._base.devices) + sum(1 for t in self._overlay if t not in self._base.devices)
