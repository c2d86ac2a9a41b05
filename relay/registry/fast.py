"""A fast path for large registry files: the documented one-line-per-device shape, read without building YAML nodes.

PyYAML (even with the C parser) composes a node tree with source marks for every scalar and then constructs
Python objects from it in pure Python: about 60 microseconds and over a kilobyte of short-lived memory per
device, so 100,000 devices took seconds and left the heap fragmented. A registry written by a tool (or by
``parley-relay devices``) is almost always the flat form::

    devices:
      0801fc577294c34e0b28ad2839435945e7b3c1d09a6f2e48b5c7d3a1f0e9b2c4: {app: ios-prod}
      'eJ9x...:APA91b...': {app: android, device_token: other-token}
      7f3a...: {app: ios-prod, environment: sandbox}

:func:`read_flat_devices` reads exactly that form line by line. It gives up (returns ``None``) on anything else
-- comments after values, other indentation, escapes, a ``routing:`` section, a scalar YAML would not read as
a string, an unknown app, an environment on a device that is not APNs -- and the caller then parses the file
with the full YAML loader, so the result and every error message are the same as before; only the common
case is faster.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml.resolver

from relay.config import App
from relay.config.model import ApnsEnvironment

_QUOTED = "'[^'\\n]*'|\"[^\"\\\\\\n]*\""
# A block key may contain ':' (FCM tokens do) but not end with it; flow values (inside {...}) take no ':' at all.
_KEY = rf"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.:/+=@-]*[A-Za-z0-9_./+=@-])?|{_QUOTED})"
_VALUE = rf"(?:[A-Za-z0-9_][A-Za-z0-9_./+=@-]*|{_QUOTED})"
_ENTRY = rf"  (?P<token>{_KEY}): \{{app: (?P<app>{_VALUE})(?:, device_token: (?P<device>{_VALUE}))?"
_LINE = re.compile(_ENTRY + r"\}\s*")
# The few devices that declare an APNs environment (development builds) are matched on their own, so that the
# common line costs what it did before environments existed.
_LINE_WITH_ENVIRONMENT = re.compile(_ENTRY + r", environment: (?P<environment>production|sandbox)\}\s*")
_STR_TAG = "tag:yaml.org,2002:str"
_RESOLVER = yaml.resolver.Resolver()
# Only plain scalars that start with one of these can resolve to anything but a string (int, float, bool,
# null, timestamp, merge, value): PyYAML indexes its implicit resolvers by first character.
_RESOLVABLE_FIRST = frozenset(ch for ch in _RESOLVER.yaml_implicit_resolvers if ch is not None)


def _string(scalar: str) -> str | None:
    """The string a YAML scalar matched by :data:`_LINE` denotes, or None when YAML would not read a string."""
    first = scalar[0]
    if first in "'\"":
        return scalar[1:-1]
    if first not in _RESOLVABLE_FIRST:
        return scalar
    tag = _RESOLVER.resolve(yaml.ScalarNode, scalar, (True, False))  # type: ignore[no-untyped-call]
    return scalar if tag == _STR_TAG else None


@dataclass(frozen=True, slots=True)
class FlatDevices:
    """What a flat file holds: token -> (app, device_token or None), and the declared APNs environments."""

    devices: dict[str, tuple[str, str | None]]
    environments: dict[str, ApnsEnvironment]


def read_flat_devices(path: Path, apps: Mapping[str, App]) -> FlatDevices | None:
    """The devices of a flat registry file, or None when the file is not (entirely) in the flat form."""
    devices: dict[str, tuple[str, str | None]] = {}
    environments: dict[str, ApnsEnvironment] = {}
    # Devices without their own device_token share one (app, None) tuple per app: 1M devices, a few tuples.
    shared: dict[str, tuple[str, None]] = {}
    match, match_with_environment = _LINE.fullmatch, _LINE_WITH_ENVIRONMENT.fullmatch
    with path.open(encoding="utf-8") as fh:
        header = next(fh, "")
        if header.rstrip() != "devices:":
            return None
        for line in fh:
            found = match(line)
            environment = None
            if found is None:
                found = match_with_environment(line)
                if found is None:
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    return None
                environment = found.group("environment")
            token_scalar, app_scalar, device_scalar = found.group("token", "app", "device")
            token = _string(token_scalar)
            value = shared.get(app_scalar)
            if value is None:
                app = _string(app_scalar)
                if app is None or app not in apps:
                    return None  # the full parser names the problem
                value = shared[app_scalar] = (app, None)
            if token is None:
                return None
            if environment is not None:
                if apps[value[0]].platform != "apns":
                    return None  # the full parser names the problem
                environments[token] = "sandbox" if environment == "sandbox" else "production"
            elif environments and token in environments:
                del environments[token]  # a repeated key: the last entry wins, as in YAML
            if device_scalar is None:
                devices[token] = value
                continue
            device_token = _string(device_scalar)
            if device_token is None:
                return None
            devices[token] = value if device_token == token else (value[0], device_token)
    return FlatDevices(devices, environments)
