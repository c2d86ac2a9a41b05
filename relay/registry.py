"""Registry stage: which app (and so platform and credentials) a Parley push token belongs to.

The YAML file (``devices:`` plus optional ``routing:`` rules) is the base; devices added or removed at run
time live in the store and overlay it. Lookups never touch the disk: the registry is an in-memory snapshot
that :meth:`Registry.replace` swaps whole on reload, so a bad new file leaves the old one in force.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config import App
from relay.config_reader import load_yaml
from relay.errors import ConfigError, ConfigProblem
from relay.registry_fast import read_flat_devices

APNS_TOKEN_RE = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True, slots=True)
class Device:
    """One registry entry: the Parley push token, its app, and the provider's device token."""

    token: str
    app: str
    device_token: str


@dataclass(frozen=True, slots=True)
class Route:
    """Where one delivery goes: the app (with credentials and policy) and the provider token."""

    app: App
    device_token: str


@dataclass(frozen=True, slots=True)
class Rule:
    """A routing rule for tokens without an entry: a pattern (regular expression) -> app."""

    pattern: re.Pattern[str]
    app: str

    def matches(self, token: str) -> bool:
        return self.pattern.fullmatch(token) is not None


_RULE_SHORTHANDS = {"apns-hex": r"[0-9a-fA-F]{64}", "any": r".+"}


@dataclass(frozen=True)
class RegistryFile:
    """The parsed registry YAML: devices (token -> (app, device_token or None)) and rules."""

    devices: Mapping[str, tuple[str, str | None]]
    rules: tuple[Rule, ...]


def _parse_devices(raw: Any, file: str, apps: Mapping[str, App],
                   problems: list[ConfigProblem]) -> dict[str, tuple[str, str | None]]:
    devices: dict[str, tuple[str, str | None]] = {}
    if not isinstance(raw, dict):
        problems.append(ConfigProblem(file, "devices", "must be a mapping of push token -> {app, device_token}"))
        return devices
    intern = sys.intern  # one string per app name, shared by every device (memory at 1M devices)
    for token, entry in raw.items():
        key = f"devices.{token}"
        if not isinstance(entry, dict):
            problems.append(ConfigProblem(file, key, "must be a mapping with app and optional device_token"))
            continue
        app = entry.get("app")
        device_token = entry.get("device_token")
        extra = set(entry) - {"app", "device_token"}
        if extra:
            problems.append(ConfigProblem(file, f"{key}.{sorted(extra)[0]}", "unknown key"))
        if app not in apps:
            problems.append(ConfigProblem(file, f"{key}.app", f"unknown app {app!r} (known: {', '.join(apps)})"))
            continue
        if device_token is not None and not isinstance(device_token, str):
            problems.append(ConfigProblem(file, f"{key}.device_token", "must be a string"))
            continue
        token = str(token)
        devices[token] = (intern(str(app)), None if device_token in (None, token) else str(device_token))
    return devices


def _parse_rules(raw: Any, file: str, apps: Mapping[str, App], problems: list[ConfigProblem]) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    if not isinstance(raw, list):
        problems.append(ConfigProblem(file, "routing", "must be a list of {match, app}"))
        return ()
    for i, rule in enumerate(raw):
        key = f"routing[{i}]"
        if not isinstance(rule, dict) or set(rule) != {"match", "app"}:
            problems.append(ConfigProblem(file, key, "must be {match: REGEX|apns-hex|any, app: NAME}"))
            continue
        if rule["app"] not in apps:
            problems.append(ConfigProblem(file, f"{key}.app", f"unknown app {rule['app']!r}"))
            continue
        try:
            pattern = re.compile(_RULE_SHORTHANDS.get(rule["match"], str(rule["match"])))
        except re.error as exc:
            problems.append(ConfigProblem(file, f"{key}.match", f"invalid regular expression: {exc}"))
            continue
        rules.append(Rule(pattern, rule["app"]))
    return tuple(rules)


def parse_registry(data: Any, source: Path, apps: Mapping[str, App]) -> RegistryFile:
    """Validate the registry YAML; every problem names the file and the key."""
    file = str(source)
    problems: list[ConfigProblem] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(file, "", "must be a mapping with a devices: key")])
    problems.extend(ConfigProblem(file, str(key), "unknown key") for key in data if key not in ("devices", "routing"))
    devices = _parse_devices(data.get("devices") or {}, file, apps, problems)
    rules = _parse_rules(data.get("routing") or [], file, apps, problems)
    if problems:
        raise ConfigError(problems)
    return RegistryFile(devices, rules)


def load_registry(path: Path, apps: Mapping[str, App]) -> RegistryFile:
    """Read and validate the registry file; a missing file is an error that names it."""
    if not path.is_file():
        raise ConfigError([ConfigProblem(str(path), "", "registry file not found")])
    try:
        flat = read_flat_devices(path, apps)  # large registries: the flat form without YAML nodes (10x faster)
    except (OSError, UnicodeDecodeError):
        flat = None  # the YAML loader reports it, naming the file
    if flat is not None:
        return RegistryFile(flat, ())
    return parse_registry(load_yaml(path), path, apps)


class Registry:
    """Token -> route lookups over the YAML snapshot, the run-time overlay, and routing rules."""

    def __init__(self, apps: Mapping[str, App], base: RegistryFile) -> None:
        self._apps = dict(apps)
        self._base = base
        self._overlay: dict[str, tuple[str, str | None]] = {}
        self._dead: set[str] = set()

    @property
    def apps(self) -> Mapping[str, App]:
        return self._apps

    def replace(self, apps: Mapping[str, App], base: RegistryFile) -> None:
        """Swap in a reloaded configuration (already validated)."""
        self._apps, self._base = dict(apps), base

    def load_overlay(self, devices: Iterable[Device], dead: Iterable[str]) -> None:
        """Install the store's run-time devices and dead tokens (at start and after reloads)."""
        self._overlay = {d.token: (d.app, None if d.device_token == d.token else d.device_token) for d in devices}
        self._dead = set(dead)

    def put(self, device: Device) -> None:
        """Add or replace a run-time device (already persisted by the caller); revives a dead token."""
        self._overlay[device.token] = (device.app, None if device.device_token == device.token else device.device_token)
        self._dead.discard(device.token)

    def remove(self, token: str) -> None:
        self._overlay.pop(token, None)

    def mark_dead(self, token: str) -> None:
        self._dead.add(token)

    def is_dead(self, token: str) -> bool:
        return token in self._dead

    def entry(self, token: str) -> Device | None:
        """The explicit entry for ``token`` (overlay first), without routing rules."""
        found = self._overlay.get(token) or self._base.devices.get(token)
        if found is None:
            return None
        app, device_token = found
        return Device(token, app, device_token or token)

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
            return Route(app, entry.device_token) if app is not None else None
        for rule in self._base.rules:
            if rule.matches(token):
                app = self._apps.get(rule.app)
                if app is not None:
                    return Route(app, token)
        return None

    def __len__(self) -> int:
        return len(self._base.devices) + sum(1 for t in self._overlay if t not in self._base.devices)
