"""The registry YAML file: ``devices:`` entries and ``routing:`` rules, validated with every problem named.

The file's shape is a pydantic model (part of the shipped JSON Schema); whether an entry's app exists, and
is APNs where an environment is given, is checked against the configuration's apps (the validation context).
:func:`token_problems` applies the device API's token check to every entry, for ``check-config``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, TypeAdapter, ValidationError, ValidationInfo, model_validator
from pydantic.dataclasses import dataclass as model

from relay.config import App
from relay.config.fields import MODEL, problem
from relay.config.model import ApnsEnvironment
from relay.config.problems import YamlNodes, line_of, load_yaml, problems_from
from relay.errors import ConfigError, ConfigProblem
from relay.registry.device import APNS_TOKEN_PATTERN, device_token_problem
from relay.registry.fast import read_flat_devices


@dataclass(frozen=True, slots=True)
class Rule:
    """A routing rule for tokens without an entry: a pattern (regular expression) -> app."""

    pattern: re.Pattern[str]
    app: str

    def matches(self, token: str) -> bool:
        return self.pattern.fullmatch(token) is not None


_RULE_SHORTHANDS = {"apns-hex": APNS_TOKEN_PATTERN, "any": r".+"}


def _apps(info: ValidationInfo) -> Mapping[str, App]:
    apps: Mapping[str, App] = (info.context or {}).get("apps", {})
    return apps


def _known(app: str, info: ValidationInfo) -> None:
    apps = _apps(info)
    if apps and app not in apps:
        raise problem("app", f"unknown app {app!r} (known: {', '.join(apps)})")


@model(frozen=True, kw_only=True, config=MODEL)
class DeviceEntry:
    """One device: its app, the provider's token when it differs from the key, an APNs environment."""

    app: str = Field(description="the app this device belongs to (a name under apps)")
    device_token: str | None = Field(default=None, description="the APNs/FCM token (default: the key itself)")
    environment: ApnsEnvironment | None = Field(default=None, description="APNs only: sandbox for a development build")

    @model_validator(mode="after")
    def _app_fits(self, info: ValidationInfo) -> DeviceEntry:
        _known(self.app, info)
        app = _apps(info).get(self.app)
        if self.environment is not None and app is not None and app.platform != "apns":
            raise problem("environment", f"app {self.app!r} is FCM: only APNs devices have an environment")
        return self


@model(frozen=True, kw_only=True, config=MODEL)
class RoutingRule:
    match: str = Field(description="apns-hex (64 hex characters), any, or a regular expression")
    app: str

    @model_validator(mode="after")
    def _valid(self, info: ValidationInfo) -> RoutingRule:
        _known(self.app, info)
        try:
            re.compile(_RULE_SHORTHANDS.get(self.match, self.match))
        except re.error as exc:
            raise problem("match", f"invalid regular expression: {exc}") from None
        return self


@model(frozen=True, config=MODEL)
class DevicesFile:
    """The whole of ``devices.yaml``."""

    devices: dict[str, DeviceEntry] | None = Field(default=None, description="push token -> its device")
    routing: list[RoutingRule] | None = Field(default=None, description="tried in order for tokens without an entry")


DEVICES_FILE = TypeAdapter(DevicesFile)


@dataclass(frozen=True)
class RegistryFile:
    """The parsed registry YAML: devices (token -> (app, device_token or None)) and rules; ``environments``
    holds the APNs environment of the (few) devices that declare one, by token."""

    devices: Mapping[str, tuple[str, str | None]]
    rules: tuple[Rule, ...]
    environments: Mapping[str, ApnsEnvironment] = field(default_factory=dict)


def parse_registry(data: Any, source: Path, apps: Mapping[str, App]) -> RegistryFile:
    """Validate the registry YAML; every problem names the file and the key."""
    try:
        parsed = DEVICES_FILE.validate_python({} if data is None else data, context={"apps": apps})
    except ValidationError as exc:
        problems = problems_from(exc, DevicesFile, source)
        for i, p in enumerate(problems):  # name the choices where the app is missing
            if p.key.startswith("devices.") and p.key.endswith(".app") and p.message.startswith("is required"):
                problems[i] = ConfigProblem(p.file, p.key, "is required: the app this device belongs to "
                                            f"(one of: {', '.join(apps)})", p.line)
        raise ConfigError(problems) from None
    intern = sys.intern  # one string per app name, shared by every device (memory at 1M devices)
    devices = {token: (intern(entry.app), None if entry.device_token in (None, token) else entry.device_token)
                for token, entry in (parsed.devices or {}).items()}
    environments = {token: entry.environment for token, entry in (parsed.devices or {}).items()
                    if entry.environment is not None}
    rules = tuple(Rule(re.compile(_RULE_SHORTHANDS.get(r.match, r.match)), r.app) for r in parsed.routing or ())
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


def token_problems(registry: RegistryFile, source: Path, apps: Mapping[str, App]) -> list[ConfigProblem]:
    """Every entry whose device token its app's provider would refuse: the device API's check, with the line."""
    nodes = YamlNodes(source)
    problems = []
    for token, (app, device_token) in registry.devices.items():
        why = device_token_problem(apps[app], device_token or token)
        if why is not None:
            loc = ("devices", token) if device_token is None else ("devices", token, "device_token")
            key, value = nodes.find(loc)
            problems.append(ConfigProblem(str(source), ".".join(loc), why, line_of(key or value)))
    return problems
