"""The registry YAML file: ``devices:`` entries and ``routing:`` rules, validated with every problem named."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.config import App
from relay.config.model import APNS_ENVIRONMENTS, ApnsEnvironment
from relay.config.reader import load_yaml
from relay.errors import ConfigError, ConfigProblem
from relay.registry.fast import read_flat_devices


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
    """The parsed registry YAML: devices (token -> (app, device_token or None)) and rules; ``environments``
    holds the APNs environment of the (few) devices that declare one, by token."""

    devices: Mapping[str, tuple[str, str | None]]
    rules: tuple[Rule, ...]
    environments: Mapping[str, ApnsEnvironment] = field(default_factory=dict)


_DEVICE_KEYS = frozenset({"app", "device_token", "environment"})


def _environment(entry: dict[Any, Any], key: str, app: App, file: str,
                 problems: list[ConfigProblem]) -> ApnsEnvironment | None:
    """A device's optional ``environment``: sandbox or production, for APNs apps only."""
    value = entry.get("environment")
    if value is None:
        return None
    if app.platform != "apns":
        problems.append(ConfigProblem(file, f"{key}.environment", f"app {app.name!r} is FCM: only APNs devices "
                                                                  "have an environment"))
        return None
    for environment in APNS_ENVIRONMENTS:
        if value == environment:
            return environment
    problems.append(ConfigProblem(file, f"{key}.environment", f"must be one of {', '.join(APNS_ENVIRONMENTS)}, "
                                                              f"not {value!r}"))
    return None


def _parse_devices(raw: Any, file: str, apps: Mapping[str, App], problems: list[ConfigProblem],
                   environments: dict[str, ApnsEnvironment]) -> dict[str, tuple[str, str | None]]:
    devices: dict[str, tuple[str, str | None]] = {}
    if not isinstance(raw, dict):
        problems.append(ConfigProblem(file, "devices", "must be a mapping of push token -> {app, device_token}"))
        return devices
    intern = sys.intern  # one string per app name, shared by every device (memory at 1M devices)
    for token, entry in raw.items():
        key = f"devices.{token}"
        if not isinstance(entry, dict):
            problems.append(ConfigProblem(file, key, "must be a mapping with app, optional device_token and "
                                                     "environment"))
            continue
        app = entry.get("app")
        device_token = entry.get("device_token")
        extra = set(entry) - _DEVICE_KEYS
        if extra:
            problems.append(ConfigProblem(file, f"{key}.{sorted(extra)[0]}", "unknown key"))
        if app is None:
            problems.append(ConfigProblem(file, f"{key}.app", f"is required: the app this device belongs to "
                                                              f"(one of: {', '.join(apps)})"))
            continue
        if app not in apps:
            problems.append(ConfigProblem(file, f"{key}.app", f"unknown app {app!r} (known: {', '.join(apps)})"))
            continue
        if device_token is not None and not isinstance(device_token, str):
            problems.append(ConfigProblem(file, f"{key}.device_token", "must be a string"))
            continue
        token = str(token)
        devices[token] = (intern(str(app)), None if device_token in (None, token) else str(device_token))
        environment = _environment(entry, key, apps[str(app)], file, problems)
        if environment is not None:
            environments[token] = environment
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
    environments: dict[str, ApnsEnvironment] = {}
    devices = _parse_devices(data.get("devices") or {}, file, apps, problems, environments)
    rules = _parse_rules(data.get("routing") or [], file, apps, problems)
    if problems:
        raise ConfigError(problems)
    return RegistryFile(devices, rules, environments)


def load_registry(path: Path, apps: Mapping[str, App]) -> RegistryFile:
    """Read and validate the registry file; a missing file is an error that names it."""
    if not path.is_file():
        raise ConfigError([ConfigProblem(str(path), "", "registry file not found")])
    try:
        flat = read_flat_devices(path, apps)  # large registries: the flat form without YAML nodes (10x faster)
    except (OSError, UnicodeDecodeError):
        flat = None  # the YAML loader reports it, naming the file
    if flat is not None:
        return RegistryFile(flat.devices, (), flat.environments)
    return parse_registry(load_yaml(path), path, apps)
